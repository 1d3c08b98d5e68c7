"""One state machine per stream: a stream that left, was refused or lost can never act as its rank again, and
every message a state does not allow is refused with a code. Raw protocol clients beside honest worker
processes; the honest run's x must equal the simulation's."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from ef21.engine.config import RunConfig
from ef21.engine.simulate import simulate
from ef21_server.coordinator import MasterOptions
from ef21_wire.v1 import ef21_pb2 as pb

from .helpers import eventually, finish, running_master, spawn_worker
from .rawclient import Ended, RawClient, garbage_update

CFG = RunConfig(workers=4, method="ef21", k=2, stepsize_mult=64, x0="normal:0", rounds=30)


async def test_a_stream_that_left_before_the_start_cannot_take_its_rank_back(tmp_path):
    """Issue 21's first reproduction: join as rank 1, Leave before the run starts; an honest worker takes rank 1
    and the run goes; the old stream then sends Setup. It must be refused, and the run stay exact."""
    async with running_master(MasterOptions(CFG, out=tmp_path / "x.npy")) as master:
        async with grpc.aio.insecure_channel(master.address) as ch:
            rogue = RawClient(ch, CFG)
            welcome = await rogue.hello(1)
            assert isinstance(welcome, pb.MasterMessage) and welcome.welcome.rank == 1
            await rogue.send(leave=pb.Leave(reason="rank 1: going away"))
            await eventually(lambda: 1 in master.coord.free_ranks(), what="rank 1 free again")
            honest = [await spawn_worker(master.address, "--rank", str(r), "--delay", "0.005") for r in range(4)]
            await eventually(lambda: master.coord.round >= 5, what="round 5")
            await rogue.setup(1)
            reply = await rogue.recv(timeout=10.0)
            # Today: a Start with x, g and rank 1's g_i, after which the rogue's Updates count as rank 1's.
            assert isinstance(reply, Ended), (f"the stream that left got a {reply.WhichOneof('kind')}"
                                              + (f" of round {reply.start.round}" if reply.HasField("start") else "")
                                              if isinstance(reply, pb.MasterMessage) else f"{reply}")
            await rogue.send(update=garbage_update(master.coord.round))
            results = await finish(honest, timeout=120)
        assert [c for c, _ in results] == [0, 0, 0, 0], results
        await asyncio.wait_for(master.wait(), 10)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), simulate(CFG).x)


async def test_setup_after_leave_gets_an_answer_never_a_hang():
    """Issue 21's second reproduction: Leave before Setup, then Setup. Today the stream hangs open."""
    cfg = RunConfig(workers=2, rounds=10, k=2)
    async with running_master(MasterOptions(cfg)) as master:
        async with grpc.aio.insecure_channel(master.address) as ch:
            c = RawClient(ch, cfg)
            assert isinstance(await c.hello(0), pb.MasterMessage)
            await c.send(leave=pb.Leave(reason="rank 0: going away"))
            await c.setup(0)
            end = await c.recv(timeout=5.0)
            assert isinstance(end, Ended), f"expected the stream's end, got {end!r}"
            assert end.code == grpc.StatusCode.CANCELLED and "rank 0 left the run: rank 0: going away" in end.details
        assert master.coord.free_ranks() == [0, 1] and master.coord.state == "waiting"


KINDS = {
    "hello": lambda c: c.hello_message(-1),
    "setup": lambda c: pb.WorkerMessage(setup=c.setup_message(0)).SerializeToString(),
    "update": lambda c: pb.WorkerMessage(update=garbage_update(0)).SerializeToString(),
    "eval": lambda c: pb.WorkerMessage(eval=pb.Eval(round=0)).SerializeToString(),
    "resync_request": lambda c: pb.WorkerMessage(resync_request=pb.ResyncRequest(round=0)).SerializeToString(),
    "power_reply": lambda c: pb.WorkerMessage(power_reply=pb.PowerReply(iteration=0)).SerializeToString(),
    "leave": lambda c: pb.WorkerMessage(leave=pb.Leave(reason="bye")).SerializeToString(),
    "empty": lambda c: b"",
}
FP, IA = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT
EXPECTED = {
    # state → kind → the stream's end (None: the message is the state's own, taken)
    "connected": {**{k: FP for k in KINDS}, "hello": None, "empty": IA},
    "joined": {**{k: FP for k in KINDS}, "setup": None, "leave": grpc.StatusCode.CANCELLED, "empty": IA},
    "set_up": {**{k: FP for k in KINDS}, "leave": grpc.StatusCode.CANCELLED, "empty": IA},
}


async def _end_of(c: RawClient, raw: bytes) -> grpc.StatusCode | None:
    await c.write(raw)
    reply = await c.recv(timeout=5.0)
    assert not (reply is None or isinstance(reply, pb.MasterMessage) and reply.HasField("start")), reply
    return reply.code if isinstance(reply, Ended) else None


async def test_every_message_kind_in_every_state_is_refused_with_a_code_and_nothing_is_applied(tmp_path, caplog):
    """Each WorkerMessage kind on a stream that is connected (never joined), joined, set up, that left, was
    refused or lost: refused with its code (or, the one kind a state takes, taken), the rank free again, nothing
    applied; a reconnect that claims a rank another stream holds is refused and logged with its identity; and
    the honest run beside it all ends with the simulation's x."""
    cfg = RunConfig(workers=2, method="ef21", k=2, stepsize_mult=64, x0="normal:0", rounds=200)
    async with running_master(MasterOptions(cfg, out=tmp_path / "x.npy", max_faults=10**6)) as master:
        coord = master.coord
        async with grpc.aio.insecure_channel(master.address) as ch:
            ds = RawClient(ch, cfg).ds

            async def client(state: str) -> RawClient:
                c = RawClient(ch, cfg, ds)
                c.known_run_id = coord.run_id
                if state != "connected":
                    assert isinstance(await c.hello(-1), pb.MasterMessage)
                if state == "set_up":
                    await c.setup()
                    await eventually(lambda: coord.sessions[c.rank].state == "set_up", what="set up")
                return c

            for state, expected in EXPECTED.items():  # before the run: a rank is there to take
                for kind, make in KINDS.items():
                    c = await client(state)
                    if expected[kind] is None:  # the state's own message: taken (Hello → joined, Setup → set up)
                        await c.write(make(c))
                        await eventually(lambda: any(s.state in ("joined", "set_up") for s in coord.members.live),
                                         what=f"{kind} taken")
                    else:
                        code = await _end_of(c, make(c))
                        assert code == expected[kind], (state, kind, code)
                    c.cancel()
                    await eventually(lambda: coord.free_ranks() == [0, 1], what=f"ranks free after {state} {kind}")
                    assert coord.state == "waiting" and not coord.members.ready.is_set()
            for how in ("left", "refused", "lost"):  # a stream that has ended, then anything at all
                for kind, make in KINDS.items():
                    c = await client("joined")
                    if how == "left":
                        await c.send(leave=pb.Leave(reason="bye"))
                    elif how == "refused":
                        await c.send(update=garbage_update(0))
                    else:
                        c.cancel()
                        await eventually(lambda: coord.free_ranks() == [0, 1], what="the lost stream's rank free")
                        c = await client("connected")  # the worker's next stream, without a Hello
                    if how in ("left", "refused"):
                        # Leave (or the refusal) ends the stream at once, with its code; what the client writes after
                        # that races the close on the transport (a write into a closed HTTP/2 stream may be answered
                        # with its RST_STREAM instead of the status), so the end is read first: nothing more gets
                        # through.
                        end = await c.recv(timeout=5.0)
                        want = grpc.StatusCode.CANCELLED if how == "left" else FP
                        assert isinstance(end, Ended) and end.code == want, (how, kind, end)
                        assert not await c.write(make(c)), (how, kind)
                    else:
                        code = await _end_of(c, make(c))
                        assert code == EXPECTED["connected"][kind], (how, kind, code)
                    c.cancel()
                    await eventually(lambda: coord.free_ranks() == [0, 1], what=f"ranks free after {how} {kind}")
            assert coord.state == "waiting" and coord.round == 0

            # Paced (~20 ms a round) so that the run is still going while the strangers below knock.
            honest = [await spawn_worker(master.address, "--rank", str(r), "--delay", "0.03") for r in range(2)]
            await eventually(lambda: coord.round >= 5, what="round 5")
            for kind, make in KINDS.items():  # while the run goes: no rank to take, nothing to touch
                c = await client("connected")
                want = grpc.StatusCode.RESOURCE_EXHAUSTED if kind == "hello" else EXPECTED["connected"][kind]
                assert await _end_of(c, make(c)) == want, kind
            thief = RawClient(ch, cfg, ds)  # a reconnect that claims rank 0, which an honest worker holds
            end = await thief.hello(0)
            assert isinstance(end, Ended) and end.code == grpc.StatusCode.ALREADY_EXISTS, end
            for kind, make in KINDS.items():
                assert await _end_of(thief, make(thief)) == grpc.StatusCode.ALREADY_EXISTS, kind
            assert coord.state == "running", "the run ended before the checks that need it running"
            results = await finish(honest, timeout=120)
        assert [c for c, _ in results] == [0, 0], results
        await asyncio.wait_for(master.wait(), 10)
    claims = [r.getMessage() for r in caplog.records if "rank 0 is taken" in r.getMessage()]
    assert claims and all("(host ipv4:127.0.0.1)" in m for m in claims), claims
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), simulate(cfg).x)

