"""The Train protocol driven by hand from this process: resync, and refusals of messages out of order."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from ef21.compression import kernels
from ef21.compression.sparse import SparseVector
from ef21.engine.config import RunConfig
from ef21.problems.data import data_info, load_dataset
from ef21.problems.problem import (
    build_problem,
    global_power_iteration,
    global_smoothness,
    local_objective,
    smoothness_from_lambda,
    sum_in_rank_order,
)
from ef21_server.coordinator import MasterOptions
from ef21_wire import compiled, serde
from ef21_wire.protocol import PROTOCOL_VERSION, TRAIN_METHOD
from ef21_wire.serde import dense_to_proto, lean_from_proto, state_checksum, vector_from_proto, vector_to_proto
from ef21_wire.v1 import ef21_pb2 as pb
from ef21_wire.v1.ef21_pb2_grpc import MasterStub

from .helpers import eventually, finish, running_master, spawn_worker
from .rawclient import RawClient


class HandClient:
    """A worker written out message by message."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.call = channel.stream_stream(TRAIN_METHOD)()

    async def send(self, **kind) -> None:
        await self.call.write(pb.WorkerMessage(**kind).SerializeToString())

    async def recv(self) -> pb.MasterMessage:
        raw = await self.call.read()
        assert raw is not grpc.aio.EOF, (await self.call.code(), await self.call.details())
        return pb.MasterMessage.FromString(raw)

    async def set_up(self, cfg: RunConfig, rank: int) -> object:
        """Join, Hello, Setup (saying the shard has a Gram); returns the shard's objective."""
        reply = await MasterStub(self.channel).Join(pb.JoinRequest(hostname="hand", protocol_version=PROTOCOL_VERSION))
        ds = load_dataset(cfg.data)
        await self.send(hello=pb.Hello(run_id=reply.run_id, requested_rank=rank, hostname="hand",
                                       data_fingerprint=data_info(cfg.data).fingerprint, dim=ds.d,
                                       n_rows=ds.n_rows))
        assert (await self.recv()).welcome.rank == rank
        obj = local_objective(cfg, rank, ds)
        await self.send(setup=pb.Setup(rank=rank, smoothness=obj.smoothness(), shard_rows=obj.n_rows, has_gram=True))
        return obj

    async def send_gram(self, obj, attempt: int) -> None:  # type: ignore[no-untyped-def]
        await self.send(gram_reply=pb.GramReply(gram=obj.gram().astype("<f8").tobytes(), attempt=attempt))

    async def handshake(self, cfg: RunConfig, rank: int) -> tuple[pb.Start, object]:
        obj = await self.set_up(cfg, rank)
        req = (await self.recv()).gram_request
        assert req.attempt >= 1
        await self.send_gram(obj, req.attempt)
        return (await self.recv()).start, obj


async def test_resync_sends_the_masters_dense_state():
    cfg = RunConfig(workers=1, rounds=10, k=2)
    async with running_master(MasterOptions(cfg, checksum_every=1)) as master:
        async with grpc.aio.insecure_channel(master.address) as ch:
            c = HandClient(ch)
            start, obj = await c.handshake(cfg, 0)
            x0 = lean_from_proto(start.x, 112)
            g0 = obj.grad(x0)
            await c.send(update=pb.Update(round=0, message=vector_to_proto(SparseVector.dense(g0)), replace=True))
            await c.send(eval=pb.Eval(round=0, grad=vector_to_proto(SparseVector.dense(g0)), f=obj.value(x0)))
            rr = (await c.recv()).round_result
            # The checksum is of the state round 0 started from: x0 and g = 0.
            assert rr.round == 0 and rr.checksum == state_checksum(x0, np.zeros(112))
            await c.send(resync_request=pb.ResyncRequest(round=1))
            rs = (await c.recv()).resync
            np.testing.assert_array_equal(vector_from_proto(rs.x, expected_dim=112).values, master.coord.master.x)
            np.testing.assert_array_equal(vector_from_proto(rs.g, expected_dim=112).values, g0)


BAD_MESSAGES = [
    (dict(update=pb.Update(round=3)), grpc.StatusCode.FAILED_PRECONDITION, "current round is 0"),
    (dict(update=pb.Update(round=0, message=pb.SparseVector(dim=5, dense=True))), grpc.StatusCode.INVALID_ARGUMENT,
     "dimension 5 != 112"),
    (dict(update=pb.Update(round=0, message=pb.SparseVector(
        dim=112, indices=np.array([3, 3], "<u4").tobytes(), values=np.zeros(2).tobytes()))),
     grpc.StatusCode.INVALID_ARGUMENT, "strictly increasing"),
    (dict(update=pb.Update(round=0, message=pb.SparseVector(
        dim=112, indices=np.array([200], "<u4").tobytes(), values=np.zeros(1).tobytes()))),
     grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
    (dict(update=pb.Update(round=0, message=pb.SparseVector(
        dim=112, indices=np.array([1], "<u4").tobytes(), values=np.array([np.nan]).tobytes()))),
     grpc.StatusCode.INVALID_ARGUMENT, "non-finite"),
    # One value for three indices would otherwise land on all three coordinates (numpy broadcasts).
    (dict(update=pb.Update(round=0, message=pb.SparseVector(
        dim=112, indices=np.array([1, 4, 7], "<u4").tobytes(), values=np.ones(1).tobytes()))),
     grpc.StatusCode.INVALID_ARGUMENT, "3 indices but 1 values"),
    (dict(update=pb.Update(round=0, message=pb.SparseVector(dim=112, dense=True, values=np.ones(5).tobytes()))),
     grpc.StatusCode.INVALID_ARGUMENT, "dense vector has 5 values, expected 112"),
    (dict(hello=pb.Hello()), grpc.StatusCode.FAILED_PRECONDITION, "hello is not allowed on a stream that is running"),
]


@pytest.mark.parametrize("bad,code,match", BAD_MESSAGES)
async def test_bad_messages_are_refused_and_the_master_keeps_serving(bad, code, match):
    cfg = RunConfig(workers=1, rounds=10, k=2)
    async with running_master(MasterOptions(cfg)) as master:
        async with grpc.aio.insecure_channel(master.address) as ch:
            c = HandClient(ch)
            await c.handshake(cfg, 0)
            await c.send(**bad)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.recv()
            assert err.value.code() == code
            assert match in err.value.details()
        assert master.coord.sessions[0].state == "refused"
        async with grpc.aio.insecure_channel(master.address) as ch:
            doc = json.loads((await MasterStub(ch).Status(pb.StatusRequest())).json)
        assert doc["state"] == "running" and doc["workers"][0]["state"] == "refused"


@pytest.mark.skipif(compiled._compile() is None, reason="numba is not installed (pip install -e '.[fast]')")
@pytest.mark.parametrize("bad,code,match", [c for c in BAD_MESSAGES if c[0].get("update", pb.Update()).message.dim])
async def test_bad_vectors_are_refused_the_same_by_the_compiled_reader_and_check(bad, code, match, monkeypatch):
    """The same malformed vectors, with the master reading every Update by the compiled reader and checking it by
    the compiled pass (their size thresholds lowered to 0: large messages take these paths): the same refusals,
    word for word, and the master keeps serving."""
    monkeypatch.setattr(serde, "HAND_PATH_MIN_BYTES", 0)
    monkeypatch.setattr(compiled, "MIN_BYTES", 0)
    monkeypatch.setattr(kernels, "MIN_ENTRIES", 0)
    taken = []
    own = compiled.read_update
    monkeypatch.setattr(compiled, "read_update", lambda raw: taken.append(own(raw)) or taken[-1])
    await test_bad_messages_are_refused_and_the_master_keeps_serving(bad, code, match)
    assert taken and taken[-1] is not None  # the compiled reader read the bad Update


async def test_first_message_must_be_hello():
    async with running_master(MasterOptions(RunConfig(workers=1))) as master:
        async with grpc.aio.insecure_channel(master.address) as ch:
            c = HandClient(ch)
            await c.send(update=pb.Update(round=0))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.recv()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_garbage_bytes_are_invalid_argument():
    async with running_master(MasterOptions(RunConfig(workers=1))) as master:
        async with grpc.aio.insecure_channel(master.address) as ch:
            call = ch.stream_stream(TRAIN_METHOD)()
            await call.write(b"\xff\xff\xff\xff\x0f")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "init,bad_round,bad,match",
    [
        # --init full: round 0 carries the dense g_i⁰; after it, Top-2 gives at most 2 entries.
        ("full", 1, SparseVector(112, np.array([1, 5, 9], dtype="<u4"), np.ones(3)), "3 entries, at most 2 allowed"),
        ("full", 1, SparseVector.dense(np.ones(112)), "112 entries, at most 2 allowed"),
        # --init compressed: even round 0 is C(∇f_i(x⁰)).
        ("compressed", 0, SparseVector.dense(np.ones(112)), "112 entries, at most 2 allowed"),
    ],
)
async def test_an_update_larger_than_the_compressor_makes_is_refused(init, bad_round, bad, match):
    cfg = RunConfig(workers=1, rounds=10, k=2, init=init)
    async with running_master(MasterOptions(cfg, eval_every=100)) as master:
        async with grpc.aio.insecure_channel(master.address) as ch:
            c = HandClient(ch)
            start, obj = await c.handshake(cfg, 0)
            if bad_round == 1:
                x0 = lean_from_proto(start.x, 112)
                await c.send(update=pb.Update(round=0, message=vector_to_proto(SparseVector.dense(obj.grad(x0)))))
                await c.send(eval=pb.Eval(round=0, grad=vector_to_proto(SparseVector.dense(obj.grad(x0)))))
                assert (await c.recv()).round_result.round == 0  # the dense g_i⁰ was accepted
            await c.send(update=pb.Update(round=bad_round, message=vector_to_proto(bad)))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.recv()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"Update round {bad_round}: {match}" in err.value.details()
        assert master.coord.sessions[0].state == "refused" and master.coord.state == "running"


async def test_a_worker_refuses_an_aggregate_larger_than_n_messages_make():
    """A rogue master whose round-1 result carries 5 entries: 2 workers' Top-2 messages sum to at most 4."""
    cfg = RunConfig(workers=2, k=2, rounds=10)
    zeros = dense_to_proto(np.zeros(112))
    results = {0: pb.RoundResult(round=0, aggregate=dense_to_proto(np.ones(112)), scale=0.5),  # g_i⁰: dense is fine
               1: pb.RoundResult(round=1, aggregate=vector_to_proto(SparseVector(
                   112, np.arange(5, dtype="<u4"), np.ones(5))), scale=0.5)}

    async def join(request, context):
        return pb.JoinReply(run_id="rogue", config_json=json.dumps(cfg.to_dict()), workers=2,
                            protocol_version=PROTOCOL_VERSION)

    async def train(requests, context):
        async for raw in requests:
            kind = pb.WorkerMessage.FromString(raw)
            if kind.HasField("hello"):
                yield pb.MasterMessage(welcome=pb.Welcome(rank=0, workers=2)).SerializeToString()
            elif kind.HasField("setup"):
                yield pb.MasterMessage(start=pb.Start(gamma=0.1, x_step=0.1, x=zeros, g=zeros, eval_every=100,
                                                      round=0)).SerializeToString()
            elif kind.HasField("update"):
                yield pb.MasterMessage(round_result=results[kind.update.round]).SerializeToString()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("ef21.v1.Master", {
        "Join": grpc.unary_unary_rpc_method_handler(join, request_deserializer=pb.JoinRequest.FromString,
                                                    response_serializer=pb.JoinReply.SerializeToString),
        "Train": grpc.stream_stream_rpc_method_handler(train)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        (code, err), = await finish([await spawn_worker(f"127.0.0.1:{port}", "--connect-timeout", "10")])
    finally:
        await server.stop(0)
    assert code == 1 and "bad aggregate from the master: 5 entries, at most 4 allowed" in err, err


async def _refused(c: HandClient) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await c.recv()
    return err.value


async def test_grams_are_asked_in_rank_order_and_a_gram_nobody_asked_for_is_refused():
    """The master asks for two Grams at a time, in rank order. A Gram sent unasked is refused (and its sender's
    loss interrupts the set-up); the next attempt asks again, an answer to the interrupted attempt arriving late is
    dropped without harm, and L is the one the simulator computes from the same Grams."""
    cfg = RunConfig(workers=3, rounds=10, k=2)
    async with running_master(MasterOptions(cfg)) as master:
        async with grpc.aio.insecure_channel(master.address) as ch:
            c = [HandClient(ch) for _ in range(4)]
            objs = [await c[r].set_up(cfg, r) for r in range(3)]
            assert [(await c[r].recv()).gram_request.attempt for r in (0, 1)] == [1, 1]
            await c[2].send_gram(objs[2], 1)  # rank 2 was not asked yet
            err = await _refused(c[2])
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "unexpected GramReply" in err.details()
            objs[2] = await c[3].set_up(cfg, 2)  # a new worker takes rank 2: the set-up begins again
            assert [(await c[r].recv()).gram_request.attempt for r in (0, 1)] == [2, 2]
            await c[0].send_gram(objs[0], 1)  # late, for the interrupted attempt: dropped
            for r in (0, 1):
                await c[r].send_gram(objs[r], 2)
            assert (await c[3].recv()).gram_request.attempt == 2
            await c[3].send_gram(objs[2], 2)
            starts = [(await c[r].recv()).start for r in (0, 1, 3)]
            assert len({s.gamma for s in starts}) == 1 and starts[0].gamma > 0
        expected = global_smoothness(cfg, build_problem(cfg).objectives, load_dataset(cfg.data).n_rows)
        assert master.coord.constants.L == expected  # the same bits


async def _power_step(c: RawClient) -> pb.PowerStep:
    msg = await c.recv()
    assert isinstance(msg, pb.MasterMessage) and msg.WhichOneof("kind") == "power_step", msg
    return msg.power_step


async def test_late_answers_to_an_interrupted_power_iteration_are_dropped():
    """L by power iteration, which a lost worker interrupts: the next attempt starts again from iteration 0, so a
    late answer to the old attempt's step 0 has the new step's iteration number. Both late answers here — one that
    comes while the master waits for a replacement, one that comes after the new attempt began — are scaled by 10⁶:
    taken for the new step, either would change L (or, before the steps carried an attempt, get the honest answer
    that follows refused as a second one and the worker thrown out). They are dropped, and L is the simulator's to
    the last bit (and λ_max of the pooled Gram's to 1e-9)."""
    cfg = RunConfig(workers=3, rounds=10, k=2)
    async with running_master(MasterOptions(cfg)) as master:
        async with grpc.aio.insecure_channel(master.address) as ch:
            ds = load_dataset(cfg.data)
            c = [RawClient(ch, cfg, ds) for _ in range(4)]
            for r in range(3):
                assert (await c[r].hello(r)).welcome.rank == r  # type: ignore[union-attr]
                await c[r].setup(power_iteration=True)
            old = [await _power_step(c[r]) for r in range(3)]
            assert [(s.iteration, s.attempt) for s in old] == [(0, 1)] * 3
            c[1].cancel()  # rank 1 is lost before anyone answers: the set-up waits for n workers again
            await eventually(lambda: master.coord.curvature is None and master.coord.setup_attempts == 1,
                             timeout=10, what="the interrupted set-up")
            assert await c[0].write(c[0].power_reply(old[0], scale=1e6))  # late, while the master waits
            assert (await c[3].hello(1)).welcome.rank == 1  # type: ignore[union-attr]
            await c[3].setup(power_iteration=True)
            clients = [c[0], c[3], c[2]]  # ranks 0, 1, 2
            steps = [await _power_step(x) for x in clients]
            assert [(s.iteration, s.attempt) for s in steps] == [(0, 2)] * 3
            assert await c[2].write(c[2].power_reply(old[2], scale=1e6))  # late, and its iteration is the new one's
            products = 0
            while True:
                for x, step in zip(clients, steps):
                    assert await x.write(x.power_reply(step))
                products += 1
                first = await clients[0].recv()
                assert isinstance(first, pb.MasterMessage), first
                if first.WhichOneof("kind") == "start":
                    break
                steps = [first.power_step] + [await _power_step(x) for x in clients[1:]]
                assert {(s.iteration, s.attempt) for s in steps} == {(products, 2)}
            for x in clients[1:]:
                msg = await x.recv()
                assert isinstance(msg, pb.MasterMessage) and msg.WhichOneof("kind") == "start", msg
        objs = build_problem(cfg).objectives
        pi = global_power_iteration(ds.d)
        lam = pi.run(lambda v: sum_in_rank_order([o.gram_matvec(v) for o in objs]))
        assert products == pi.iterations > 1
        assert master.coord.constants.L == smoothness_from_lambda(cfg, lam, ds.n_rows)  # the simulator's bits
        assert master.coord.constants.L == pytest.approx(global_smoothness(cfg, objs, ds.n_rows), rel=1e-9)


async def test_a_gram_of_the_wrong_size_is_refused():
    cfg = RunConfig(workers=1, rounds=10, k=2)
    async with running_master(MasterOptions(cfg)) as master:
        async with grpc.aio.insecure_channel(master.address) as ch:
            c = HandClient(ch)
            await c.set_up(cfg, 0)
            attempt = (await c.recv()).gram_request.attempt
            await c.send(gram_reply=pb.GramReply(gram=b"\0" * 64, attempt=attempt))
            err = await _refused(c)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "GramReply: 64 bytes" in err.details()
