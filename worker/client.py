"""The worker process: join, load the shard, then one stream of rounds.

Data path, top to bottom: replica x → local gradient → method step (compressor) → codec → stream → … →
RoundResult → apply to the replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import socket
import time
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from ef21.codec import CodecError, decode, encode, fits_float32
from ef21.config import RunConfig
from ef21.data import Dataset, fingerprint, load_dataset
from ef21.errors import UserError
from ef21.engine import WorkerNode, WorkerReport
from ef21.sparse import SparseVector
from ef21.methods import Downlink
from ef21.problem import local_objective, quadratic_fingerprint
from ef21.simulate import resolve_method
from ef21_wire.protocol import PROTOCOL_VERSION, TRAIN_METHOD, is_eval_round
from ef21_wire.fastwire import RoundResultIn
from ef21_wire.serde import (
    fill_vector, read_round_result_fast, round_result_from_proto, state_checksum, update_to_bytes, vector_from_proto,
)
from ef21_wire.v1 import ef21_pb2 as pb
from ef21_wire.v1.ef21_pb2_grpc import MasterStub

from .channel import ClientSecurity, open_channel

log = logging.getLogger("ef21.worker")


class WorkerFailure(Exception):
    """The worker cannot go on (refused, master gone, protocol broken); the message says why."""


class RunStopped(Exception):
    """The master ended the run; the argument is its reason."""


@dataclass(frozen=True)
class WorkerOptions:
    master: str
    rank: int = -1
    """Rank to ask for; -1 takes any free rank."""
    data: str | None = None
    """Path of the data on this machine, overriding the run configuration's."""
    connect_timeout: float = 120.0
    """How long to keep retrying (with backoff) while the master is not up."""
    reply_timeout: float = 3600.0
    """Longest wait for the master's next message (a round waits for the slowest worker)."""
    hostname: str = dataclasses.field(default_factory=socket.gethostname)
    delay: float = 0.0
    """Testing aid: sleep a random time in [0, delay] s before each Update (a straggler, random arrival order)."""
    security: ClientSecurity = dataclasses.field(default_factory=ClientSecurity)


async def join_with_backoff(stub: MasterStub, opts: WorkerOptions) -> pb.JoinReply:
    deadline = time.monotonic() + opts.connect_timeout
    delay = 0.1
    while True:
        try:
            return await stub.Join(pb.JoinRequest(hostname=opts.hostname, protocol_version=PROTOCOL_VERSION),
                                   timeout=10.0, wait_for_ready=False, metadata=opts.security.metadata())
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise WorkerFailure(f"join refused: {exc.code().name}: {exc.details()}") from None
            if time.monotonic() + delay > deadline:
                raise WorkerFailure(f"master {opts.master} unreachable for {opts.connect_timeout:g} s "
                                    f"({exc.details()})") from None
            log.info("master %s not reachable yet; retrying in %.1f s", opts.master, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def load_worker_data(cfg: RunConfig) -> tuple[Dataset | None, str, int, int]:
    if cfg.problem == "quadratic":
        return None, quadratic_fingerprint(cfg), cfg.dim, 0
    ds = load_dataset(cfg.data, problem=cfg.problem)
    return ds, fingerprint(ds.A, ds.y), ds.d, ds.n_rows


class Stream:
    """The Train stream as raw bytes in and out.

    A reader task pulls the master's messages as they arrive, so a Stop is seen even while this worker is busy
    computing or its next write fails because the master already closed the stream. Every read has a timeout
    (the master is a peer too).
    """

    def __init__(self, call: grpc.aio.StreamStreamCall, reply_timeout: float) -> None:
        self.call = call
        self.reply_timeout = reply_timeout
        self._inbox: asyncio.Queue[pb.MasterMessage | RoundResultIn | BaseException] = asyncio.Queue()
        self._reader = asyncio.create_task(self._pump(), name="stream-reader")

    async def _pump(self) -> None:
        try:
            while True:
                raw = await self.call.read()
                if raw is grpc.aio.EOF:
                    code = await self.call.code()
                    details = await self.call.details()
                    if code == grpc.StatusCode.OK or code in RETRYABLE:
                        raise Reconnect(f"the master ended the stream ({code.name}) without stopping the run")
                    raise WorkerFailure(f"refused by the master: {code.name}: {details}")
                item: pb.MasterMessage | RoundResultIn | None = read_round_result_fast(raw)
                if item is None:
                    item = pb.MasterMessage()
                    try:
                        item.ParseFromString(raw)
                    except DecodeError as exc:
                        raise WorkerFailure(f"malformed message from the master: {exc}") from None
                await self._inbox.put(item)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which raises it in its own task
            await self._inbox.put(exc)

    async def close(self) -> None:
        self._reader.cancel()
        try:
            await self._reader
        except (asyncio.CancelledError, Exception):
            pass

    async def send(self, msg: pb.WorkerMessage | bytes) -> int:
        raw = msg if isinstance(msg, bytes) else msg.SerializeToString()
        try:
            await self.call.write(raw)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            # The master may have ended the stream (with a Stop already received) while we were computing.
            stop = await self._pending_stop()
            if stop is not None:
                raise RunStopped(stop) from None
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in RETRYABLE:
                raise WorkerFailure(f"refused by the master: {exc.code().name}: {exc.details()}") from None
            raise Reconnect(f"cannot send to the master: {exc}") from None
        return len(raw)

    async def _pending_stop(self) -> str | None:
        """A Stop among the messages received but not yet consumed (waiting briefly for the reader to finish)."""
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), 2.0)
        except (asyncio.TimeoutError, Exception):
            pass
        while not self._inbox.empty():
            item = self._inbox.get_nowait()
            if isinstance(item, pb.MasterMessage) and item.WhichOneof("kind") == "stop":
                return item.stop.reason
        return None

    async def recv(self) -> pb.MasterMessage | RoundResultIn:
        try:
            async with asyncio.timeout(self.reply_timeout):  # no extra task per read, unlike wait_for
                item = await self._inbox.get()
        except TimeoutError:
            raise Reconnect(f"no message from the master in {self.reply_timeout:g} s") from None
        if isinstance(item, BaseException):
            raise item
        return item

    async def recv_proto(self) -> pb.MasterMessage:
        """The next message where a RoundResult is not expected (handshake, resync)."""
        item = await self.recv()
        if isinstance(item, RoundResultIn):
            raise WorkerFailure(f"unexpected RoundResult of round {item.round}")
        return item


# Stream endings after which joining again makes sense: the master went away or restarted, or our rank is still
# held by our own previous connection. Anything else (refused data, bad token, run over) is final.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED, grpc.StatusCode.ALREADY_EXISTS,
}


class Reconnect(Exception):
    """The stream broke in a way that joining again can fix."""


async def run_worker(opts: WorkerOptions) -> str:
    """Take part in one run until the master stops it; returns the master's stop reason.

    When the connection breaks (the master restarted, the network dropped) the worker joins again with the same
    rank and continues from the state the master sends; its data stays loaded.
    """
    loaded: dict[str, tuple[Dataset | None, str, int, int]] = {}
    rank = opts.rank
    async with open_channel(opts.master, opts.security) as channel:
        stub = MasterStub(channel)
        last_break = 0.0
        delay = 0.2
        unstarted_since: float | None = None  # since when attempts fail before this worker gets a Start
        while True:
            reply = await join_with_backoff(stub, opts)
            if reply.ended:
                return reply.ended  # e.g. the Stop was lost with a broken stream: the run is over all the same
            if rank >= reply.workers:
                raise UserError(f"--rank {rank} is out of range: the run has {reply.workers} workers "
                                f"(ranks 0..{reply.workers - 1})")
            cfg = RunConfig.from_dict(json.loads(reply.config_json))
            if opts.data is not None:
                cfg = dataclasses.replace(cfg, data=opts.data)
            key = f"{cfg.problem}:{cfg.data}:{cfg.dim}:{cfg.seed}:{cfg.lam}"
            if key not in loaded:
                loaded[key] = await asyncio.to_thread(load_worker_data, cfg)
            ds, fp, d, n_rows = loaded[key]
            call = channel.stream_stream(TRAIN_METHOD)(metadata=opts.security.metadata())
            session = _Session(rank)
            stream = Stream(call, opts.reply_timeout)
            try:
                return await _train(stream, cfg, reply.run_id, ds, fp, d, n_rows, opts, session)
            except RunStopped as stop:
                return str(stop)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise WorkerFailure(f"refused by the master: {exc.code().name}: {exc.details()}") from None
                why = f"{exc.code().name}: {exc.details()}"
            except Reconnect as exc:
                why = str(exc)
            finally:
                call.cancel()
                await stream.close()
            rank = session.rank if session.rank is not None else rank
            if session.started:
                unstarted_since = None
            elif unstarted_since is None:
                unstarted_since = time.monotonic()
            elif time.monotonic() - unstarted_since > opts.connect_timeout:
                raise WorkerFailure(f"could not take part in the run for {opts.connect_timeout:g} s: {why}")
            # Back off when the breaks come fast (e.g. our rank is still held by the connection that just died).
            delay = min(delay * 2, 5.0) if time.monotonic() - last_break < 10 else 0.2
            last_break = time.monotonic()
            log.warning("lost the master (%s); joining again as rank %s in %.1f s", why, rank, delay)
            await asyncio.sleep(delay)


@dataclass
class _Session:
    rank: int | None
    started: bool = False


async def _train(st: Stream, cfg: RunConfig, run_id: str, ds: Dataset | None, fp: str, d: int, n_rows: int,
                 opts: WorkerOptions, session: _Session) -> str:
    await st.send(pb.WorkerMessage(hello=pb.Hello(
        run_id=run_id, requested_rank=-1 if session.rank is None else session.rank, hostname=opts.hostname,
        data_fingerprint=fp, dim=d, n_rows=n_rows)))
    first = await st.recv_proto()
    if first.WhichOneof("kind") != "welcome":
        raise WorkerFailure(f"expected Welcome, got {first.WhichOneof('kind')}")
    rank = session.rank = first.welcome.rank
    log.info("joined as rank %d of %d", rank, first.welcome.workers)
    obj = local_objective(cfg, rank, ds)
    gram, diag = obj.gram(), obj.diagonal()
    await st.send(pb.WorkerMessage(setup=pb.Setup(
        rank=rank, smoothness=obj.smoothness(), shard_rows=getattr(obj, "n_rows", 0),
        gram=b"" if gram is None else np.ascontiguousarray(gram, dtype="<f8").tobytes(),
        diagonal=b"" if diag is None else np.ascontiguousarray(diag, dtype="<f8").tobytes())))
    msg = await st.recv_proto()
    if msg.WhichOneof("kind") == "stop":
        return msg.stop.reason
    if msg.WhichOneof("kind") != "start":
        raise WorkerFailure(f"expected Start, got {msg.WhichOneof('kind')}")
    node = _node_from_start(msg.start, cfg, obj, rank, d)
    session.started = True
    eval_every = max(1, msg.start.eval_every)
    compact = cfg.encoding == "compact"
    pause = random.Random(f"{rank}:{time.time_ns()}")
    while True:
        report = node.step()
        m = report.message
        if opts.delay > 0:
            await asyncio.sleep(pause.uniform(0.0, opts.delay))
        await st.send(update_message(report, compact=compact))
        if is_eval_round(report.round, eval_every, cfg.rounds):
            ev = pb.WorkerMessage()
            ev.eval.round = report.round
            fill_vector(ev.eval.grad, SparseVector.dense(report.grad))
            await st.send(ev)
        got = await st.recv()
        if isinstance(got, RoundResultIn):
            rr = got
        elif got.WhichOneof("kind") == "stop":
            return got.stop.reason
        elif got.WhichOneof("kind") == "round_result":
            rr = round_result_from_proto(got.round_result)
        else:
            raise WorkerFailure(f"expected the result of round {node.round}, got {got.WhichOneof('kind')}")
        if rr.round != node.round:
            raise WorkerFailure(f"expected the result of round {node.round}, got round {rr.round}'s")
        try:
            agg = decode(rr.aggregate, expected_dim=d)
        except CodecError as exc:
            raise WorkerFailure(f"bad aggregate from the master: {exc}") from None
        # The checksum is of the state the round started from: the replica as it is before applying the result.
        in_sync = not rr.checksum or rr.checksum == state_checksum(node.replica.x, node.replica.g)
        # Left out of the round (a straggler): keep the previous g_i, exactly as the master does.
        node.apply(Downlink(agg, "replace" if rr.replace else "add", rr.scale), included=rank not in rr.missing)
        if not in_sync:
            await _resync(st, node, d)


def update_message(report: WorkerReport, *, compact: bool = False) -> bytes:
    """The uplink of one round, serialized (large vectors by ``fastwire``: their buffers copied once).
    Compact: Elias–Fano indices, and float32 values — the compressor already rounded them; round 0's
    uncompressed g_i⁰ is not rounded and goes as float64."""
    v = report.message.vector
    vec = encode(v, float32=compact and fits_float32(v.values), packed=compact)
    return update_to_bytes(report.round, vec, report.message.replace, report.f, report.distortion)


def _node_from_start(start: pb.Start, cfg: RunConfig, obj: object, rank: int, d: int) -> WorkerNode:
    method, comp = resolve_method(cfg, d)
    x = vector_from_proto(start.x, expected_dim=d).values
    g = vector_from_proto(start.g, expected_dim=d).values if start.HasField("g") else None
    state = vector_from_proto(start.worker_state, expected_dim=d).values if start.HasField("worker_state") else None
    node = WorkerNode(method, comp, obj, rank, gamma=start.gamma, x0=x, init=cfg.init,  # type: ignore[arg-type]
                      seed=cfg.seed, g=g, state=state, round_=start.round)
    if node.replica.x_step != start.x_step:
        raise WorkerFailure(f"step mismatch: master uses {start.x_step}, this worker {node.replica.x_step}")
    return node


async def _resync(st: Stream, node: WorkerNode, d: int) -> None:
    log.warning("replica out of sync after round %d: asking the master for its state", node.round - 1)
    await st.send(pb.WorkerMessage(resync_request=pb.ResyncRequest(round=node.round)))
    msg = await st.recv_proto()
    if msg.WhichOneof("kind") != "resync":
        raise WorkerFailure(f"expected Resync, got {msg.WhichOneof('kind')}")
    node.replica.x[:] = vector_from_proto(msg.resync.x, expected_dim=d).values
    node.replica.g[:] = vector_from_proto(msg.resync.g, expected_dim=d).values
