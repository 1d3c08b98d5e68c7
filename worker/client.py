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
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from ef21.cli.exits import EXIT_FAILED, EXIT_JOIN_TIMEOUT, EXIT_USAGE
from ef21.compression.codec import CodecError, decode, encode, fits_float32
from ef21.compression.compressors import max_entries
from ef21.compression.sparse import SparseVector
from ef21.engine.config import RunConfig, make_x0
from ef21.engine.nodes import WorkerNode, WorkerReport, WorkerSetting, sends_eval_grad
from ef21.engine.plan import resolve_method, worker_rule
from ef21.errors import UserError
from ef21.methods import Downlink
from ef21.methods.base import InPlace, committed
from ef21.methods.estimators import batch_size_for, make_estimator
from ef21.methods.participation import participation_count
from ef21.problems.data import DataInfo, Dataset, data_info, load_dataset
from ef21.problems.objectives import offers_gram
from ef21.problems.problem import local_objective, quadratic_fingerprint, streams_shards
from ef21_wire.fastwire import RoundResultIn, eval_bytes, gram_reply_bytes, power_reply_bytes
from ef21_wire.protocol import PROTOCOL_VERSION, TRAIN_METHOD, is_eval_round, version_mismatch
from ef21_wire.serde import (
    fill_vector,
    lean_from_proto,
    read_round_result_fast,
    round_result_from_proto,
    state_checksum,
    state_from_proto,
    update_to_bytes,
    vector_digest,
    vector_from_proto,
)
from ef21_wire.v1 import ef21_pb2 as pb
from ef21_wire.v1.ef21_pb2_grpc import MasterStub

from .channel import ClientSecurity, open_channel
from .memory import release_free_heap

log = logging.getLogger("ef21.worker")


class WorkerFailure(Exception):
    """The worker cannot go on (refused, master gone, protocol broken); the message says why, ``code`` is the exit
    status (``ef21.cli.exits``), ``status`` the gRPC status of the master's refusal, when it was one."""

    def __init__(self, message: str, code: int = EXIT_FAILED, *, status: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class RunStopped(Exception):
    """The master ended the run; the argument is its reason."""


@dataclass(frozen=True)
class WorkerOptions:
    master: str
    rank: int = -1
    """Rank to ask for; -1 takes any free rank."""
    data: str | None = None
    """Path of the data on this machine, overriding the run configuration's."""
    objective: str | None = None
    """Path of the user objective's file on this machine (FILE.py:FUNC), overriding the run configuration's."""
    connect_timeout: float = 120.0
    """How long to keep trying to join while the master cannot be reached: before the run, and again whenever the
    worker has lost its master during it (then it exits with ``EXIT_JOIN_TIMEOUT``)."""
    reply_timeout: float = 3600.0
    """Longest wait for the master's next message (a round waits for the slowest worker)."""
    hostname: str = dataclasses.field(default_factory=socket.gethostname)
    delay: float = 0.0
    """Testing aid: sleep a random time in [0, delay] s before each Update (a straggler, random arrival order)."""
    security: ClientSecurity = dataclasses.field(default_factory=ClientSecurity)


RETRY_CAP_S = 1.0
"""The longest pause between two tries to reach the master: a worker whose link comes back is back in the run
within about a second (the channel's own reconnect backoff is capped the same way, worker/channel.py)."""


JOIN_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
"""Join answers that say nothing about this worker, only that the call did not get through: the master's own
refusals are FAILED_PRECONDITION (protocol version) and UNAUTHENTICATED. CANCELLED and INTERNAL ("Internal
error from Core") come from gRPC itself when a master takes a storm of a thousand joins at once: seen in
benchmarks/capacity.py at n ≥ 1024, where a worker that gave up on them left the run waiting for --join-timeout."""


async def join_with_backoff(stub: MasterStub, opts: WorkerOptions) -> pb.JoinReply:
    deadline = time.monotonic() + opts.connect_timeout
    delay = 0.1
    while True:
        try:
            reply = await stub.Join(pb.JoinRequest(hostname=opts.hostname, protocol_version=PROTOCOL_VERSION),
                                    timeout=10.0, wait_for_ready=False, metadata=opts.security.metadata())
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                # The master's only refusal of a Join that is not about the token: another protocol version. Starting
                # again would not help (exit 2, as for a bad flag); the master's message names both versions.
                raise WorkerFailure(f"join refused: {exc.details()}", EXIT_USAGE, status=exc.code()) from None
            if exc.code() not in JOIN_RETRYABLE:
                raise WorkerFailure(f"join refused: {exc.code().name}: {exc.details()}") from None
            if time.monotonic() + delay > deadline:
                raise WorkerFailure(f"master {opts.master} unreachable for {opts.connect_timeout:g} s "
                                    f"({exc.details()})", EXIT_JOIN_TIMEOUT) from None
            log.info("master %s not reachable yet; retrying in %.1f s", opts.master, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_CAP_S)
            continue
        if reply.protocol_version != PROTOCOL_VERSION:  # a master of protocol 8 or later that let us in all the same
            raise WorkerFailure(f"join refused: {version_mismatch(PROTOCOL_VERSION, reply.protocol_version)}",
                                EXIT_USAGE)
        return reply


@dataclass(frozen=True, eq=False)
class WorkerData:
    """What a worker knows of the run's data before it has a rank: its facts (for Hello) and, for the small
    datasets that are read whole, the dataset itself (large files are read shard by shard once the rank is
    known)."""

    fingerprint: str
    d: int
    n_rows: int
    info: DataInfo | None = None
    ds: Dataset | None = None
    objective_id: str = ""


def load_worker_data(cfg: RunConfig) -> WorkerData:
    objective_id = ""
    if cfg.objective is not None:
        from ef21.problems.plugins import identity, load_plugin

        objective_id = identity(load_plugin(cfg.objective), cfg.objective_args)
    if cfg.objective is None and cfg.problem == "quadratic":
        return WorkerData(quadratic_fingerprint(cfg), cfg.dim, 0)
    if cfg.data is None:
        return WorkerData("no-data", 0, 0, objective_id=objective_id)
    d_known = cfg.objective is None  # a user objective's d is its own, known once built
    if streams_shards(cfg.data):
        info = data_info(cfg.data, problem=cfg.problem)
        return WorkerData(info.fingerprint, info.d if d_known else 0, info.n_rows, info=info,
                          objective_id=objective_id)
    ds = load_dataset(cfg.data, problem=cfg.problem)
    info = data_info(cfg.data, problem=cfg.problem, loaded=ds)
    return WorkerData(info.fingerprint, ds.d if d_known else 0, ds.n_rows, ds=ds, objective_id=objective_id)


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
                # No local keeps a message past its hand-over: a Start or PowerStep carries dense vectors of d,
                # which would otherwise stay alive until the next message arrives.
                await self._inbox.put(await self._read_one())
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which raises it in its own task
            await self._inbox.put(exc)

    async def _read_one(self) -> pb.MasterMessage | RoundResultIn:
        raw = await self.call.read()
        if raw is grpc.aio.EOF:
            code = await self.call.code()
            details = await self.call.details()
            if code == grpc.StatusCode.OK or code in RETRYABLE:
                raise Reconnect(f"the master ended the stream ({code.name}) without stopping the run")
            raise WorkerFailure(f"refused by the master: {code.name}: {details}", status=code)
        item: pb.MasterMessage | RoundResultIn | None = read_round_result_fast(raw)
        if item is None:
            item = pb.MasterMessage()
            try:
                item.ParseFromString(raw)
            except DecodeError as exc:
                raise WorkerFailure(f"malformed message from the master: {exc}") from None
        return item

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
                raise WorkerFailure(f"refused by the master: {exc.code().name}: {exc.details()}",
                                    status=exc.code()) from None
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
    loaded: dict[str, WorkerData] = {}
    rank = opts.rank
    async with open_channel(opts.master, opts.security) as channel:
        stub = MasterStub(channel)
        last_break = 0.0
        delay = 0.2
        unstarted_since: float | None = None  # since when attempts fail before this worker gets a Start
        session: _Session | None = None
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
            if opts.objective is not None:
                cfg = dataclasses.replace(cfg, objective=opts.objective)
            key = f"{cfg.problem}:{cfg.data}:{cfg.dim}:{cfg.seed}:{cfg.lam}:{cfg.objective}:{cfg.objective_args}"
            if key not in loaded:
                loaded[key] = await asyncio.to_thread(load_worker_data, cfg)
            call = channel.stream_stream(TRAIN_METHOD)(metadata=opts.security.metadata())
            session = _Session(rank, node=session.node if session is not None else None)
            stream = Stream(call, opts.reply_timeout)
            try:
                return await _train(stream, cfg, reply.run_id, loaded[key], opts, session)
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
            # Back off when the breaks come fast (e.g. our rank is still held by the connection that just died, until
            # the master's keepalive notices: a few seconds at most).
            delay = min(delay * 2, RETRY_CAP_S) if time.monotonic() - last_break < 10 else 0.2
            last_break = time.monotonic()
            log.warning("lost the master (%s); joining again as rank %s in %.1f s", why, rank, delay)
            await asyncio.sleep(delay)


@dataclass
class _Session:
    rank: int | None
    started: bool = False
    node: WorkerNode | None = None
    """The node of the previous connection (kept for a master that has no g_i to hand back, ``own_state``)."""


async def _train(st: Stream, cfg: RunConfig, run_id: str, data: WorkerData, opts: WorkerOptions,
                 session: _Session) -> str:
    await st.send(pb.WorkerMessage(hello=pb.Hello(
        run_id=run_id, requested_rank=-1 if session.rank is None else session.rank, hostname=opts.hostname,
        data_fingerprint=data.fingerprint, dim=data.d, n_rows=data.n_rows, objective_id=data.objective_id)))
    first = await st.recv_proto()
    if first.WhichOneof("kind") == "stop":  # the run ended while we were (re)joining
        raise RunStopped(first.stop.reason)
    if first.WhichOneof("kind") != "welcome":
        raise WorkerFailure(f"expected Welcome, got {first.WhichOneof('kind')}")
    rank = session.rank = first.welcome.rank
    log.info("joined as rank %d of %d", rank, first.welcome.workers)
    try:
        return await _set_up_and_train(st, cfg, data, opts, session, rank)
    except UserError as exc:
        # Our objective failed (a user's code, a shard that does not fit): tell the master why, then leave.
        try:
            await st.send(pb.WorkerMessage(leave=pb.Leave(reason=f"rank {rank}: {exc}")))
        except (RunStopped, Reconnect, WorkerFailure):
            pass
        raise


async def _set_up_and_train(st: Stream, cfg: RunConfig, data: WorkerData, opts: WorkerOptions, session: _Session,
                            rank: int) -> str:
    obj = await asyncio.to_thread(local_objective, cfg, rank, data.ds, None, data.info)
    release_free_heap()  # the loader's scratch (rows parsed one by one) is garbage from here on
    d = obj.d
    x0 = own_x0(obj, cfg.x0, cfg.np_dtype)
    first = await _set_up(st, obj, rank, cfg.x0, x0)
    if first.WhichOneof("kind") == "stop":
        return first.stop.reason
    node = _node_from_start(first.start, cfg, obj, rank, d, x0)
    kept = own_state(session.node, first.start, rank)
    if kept is not None:
        node.state = kept
    session.node = node
    del x0
    session.started = True
    eval_every = max(1, first.start.eval_every)
    del first  # its dense x and g: the replica holds its own copies
    compact = cfg.encoding == "compact"
    pause = random.Random(f"{rank}:{time.time_ns()}")
    while True:
        evaluate = is_eval_round(node.round, eval_every, cfg.rounds)
        report = node.step(evaluate=evaluate)
        if report.message is not None:
            if opts.delay > 0:
                await asyncio.sleep(pause.uniform(0.0, opts.delay))
            await st.send(update_message(report, compact=compact))
        if evaluate:
            await st.send(eval_message(report, cfg))
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
            # A sparse aggregate is the union of n messages of at most k entries each (a dense one: g_i⁰, EF21+'s
            # replacements, has d).
            limit = None if rr.aggregate.dense else aggregate_bound(cfg, node, d)
            agg = decode(rr.aggregate, expected_dim=d, max_nnz=limit, dtype=cfg.np_dtype)
            b = node.replica.buffers
            buffers = None if rr.buffers is None or b is None else decode(rr.buffers, expected_dim=b.shape[0])
        except CodecError as exc:
            raise WorkerFailure(f"bad aggregate from the master: {exc}") from None
        # The checksum is of the state the round started from: the replica as it is before applying the result.
        in_sync = not rr.checksum or rr.checksum == state_checksum(*node.replica.state_arrays())
        # Left out of the round (not sampled, or a straggler): keep the previous g_i, exactly as the master does.
        included = report.message is not None and rank not in rr.missing
        node.apply(Downlink(agg, "replace" if rr.replace else "add", rr.scale, buffers), included=included)
        del report  # an evaluation round's dense gradient: not kept while the next round computes another
        if not in_sync:
            await _resync(st, node, d)


def own_x0(obj: Any, x0_spec: str | None, dtype: Any = np.float64) -> np.ndarray | None:
    """The x⁰ this worker computes itself, as the master does (``make_x0`` of the run's --x0 and the objective's
    own x0()); None when it cannot (an --x0 file this machine lacks): the master then sends x."""
    try:
        return make_x0(x0_spec, obj.d, getattr(obj, "x0", lambda: None)(), dtype)
    except UserError:
        return None


def setup_message(obj: Any, rank: int, x0_spec: str | None = None, x0: np.ndarray | None = None) -> pb.WorkerMessage:
    """What a worker's objective tells the master at set-up: L_i, its curvature (a diagonal, or that it has a Gram
    to send when asked), its shard's size, d, and the digest of ``x0`` (its own x⁰, ``own_x0``). Rank 0 also sends
    its objective's x0() when the run's --x0 does not override it: the master takes the run's x⁰ from it."""
    diag = obj.diagonal()
    has_gram = diag is None and offers_gram(obj)
    L_i = obj.smoothness()
    objective_x0 = getattr(obj, "x0", lambda: None)() if rank == 0 and x0_spec is None else None
    layout = getattr(obj, "layout", lambda: None)()
    b0 = getattr(obj, "initial_buffers", lambda: None)() if rank == 0 else None
    setup = pb.Setup(
        rank=rank, smoothness=0.0 if L_i is None else L_i, shard_rows=getattr(obj, "n_rows", 0), has_gram=has_gram,
        diagonal=b"" if diag is None else np.ascontiguousarray(diag, dtype="<f8").tobytes(),
        n_samples=getattr(obj, "n_samples", None) or 0, dim=obj.d,
        power_iteration=not has_gram and diag is None and hasattr(obj, "gram_matvec"),
        layout="" if layout is None else layout.to_json(), x0_digest=b"" if x0 is None else vector_digest(x0))
    if objective_x0 is not None:
        fill_vector(setup.x0, SparseVector.dense(objective_x0))
    if b0 is not None:
        fill_vector(setup.buffers, SparseVector.dense(b0))
    return pb.WorkerMessage(setup=setup)


async def _set_up(st: Stream, obj: Any, rank: int, x0_spec: str | None = None,
                  x0: np.ndarray | None = None) -> pb.MasterMessage:
    """Send the Setup and answer what the master asks for L (this shard's Gram, or the power iteration's
    products); returns the master's Start (or Stop)."""
    d = obj.d
    await st.send(setup_message(obj, rank, x0_spec, x0))
    while True:
        try:
            msg = await st.recv_proto()
        except (WorkerFailure, grpc.aio.AioRpcError) as exc:
            # Refused after our Setup for a precondition (another d, another model): this worker's objective does
            # not fit the run, and starting it again would not change that. Bad input: exit 2. (The refusal comes
            # as the read's AioRpcError, or as a WorkerFailure where a write or the stream's end saw it.)
            if isinstance(exc, grpc.aio.AioRpcError):
                status, why = exc.code(), f"refused by the master: {exc.details()}"
            else:
                status, why = exc.status, str(exc)
            if status == grpc.StatusCode.FAILED_PRECONDITION:
                raise UserError(why) from None
            raise
        kind = msg.WhichOneof("kind")
        if kind in ("start", "stop"):
            return msg
        if kind == "gram_request":
            # Built when asked and let go once sent: a worker holds its d×d Gram only for this message.
            gram = np.ascontiguousarray(obj.gram(), dtype="<f8")
            await st.send(gram_reply_bytes(memoryview(gram).cast("B"), msg.gram_request.attempt))
            del gram
            continue
        if kind != "power_step":
            raise WorkerFailure(f"expected Start, got {kind}")
        # One product of the master's power iteration for L: A_iᵀA_i v.
        try:
            v = vector_from_proto(msg.power_step.v, expected_dim=d).values
        except CodecError as exc:
            raise WorkerFailure(f"bad PowerStep from the master: {exc}") from None
        iteration, attempt = msg.power_step.iteration, msg.power_step.attempt
        del msg  # each step's vectors of d are released before the next one arrives
        w = obj.gram_matvec(v)
        del v
        await st.send(power_reply_bytes(iteration, encode(SparseVector.dense(w)), attempt))
        del w


def update_message(report: WorkerReport, *, compact: bool = False) -> bytes:
    """The uplink of one round, serialized (large vectors by ``fastwire``: their buffers copied once).
    Compact: Elias–Fano indices, and float32 values — the compressor already rounded them; round 0's
    uncompressed g_i⁰ is not rounded and goes as float64."""
    assert report.message is not None
    v = report.message.vector
    vec = encode(v, float32=compact and fits_float32(v.values), packed=compact)
    b = report.message.buffers
    buffers = None if b is None else encode(b, float32=compact and fits_float32(b.values), packed=compact)
    return update_to_bytes(report.round, vec, report.message.replace, buffers)


def aggregate_bound(cfg: RunConfig, node: WorkerNode, d: int) -> int:
    """The most entries an honest sparse RoundResult holds: K with EF21-BC or EF21-P (its broadcast compressor's
    output), else the union of n messages of at most k entries each."""
    if cfg.downlink_k is not None:
        return min(d, cfg.downlink_k)
    return min(d, cfg.workers * max_entries(node.compressor, d))


def eval_message(report: WorkerReport, cfg: RunConfig | None = None) -> bytes:
    """An evaluation round's exact figures, serialized: the dense ∇f_i(x^t) (joined into the message by hand,
    one copy) unless the objective reports metrics and the run does not ask for ‖∇f‖² (``sends_eval_grad``),
    f_i(x^t), the distortion and metrics."""
    assert report.grad is not None and report.f is not None
    rest = pb.Eval(f=report.f, distortion=report.distortion, metrics=report.metrics or None)
    if cfg is not None and not sends_eval_grad(cfg.eval_grad, cfg.tol, report.metrics is not None):
        rest.round = report.round
        return pb.WorkerMessage(eval=rest).SerializeToString()
    return eval_bytes(report.round, encode(SparseVector.dense(report.grad)), rest.SerializeToString())


def own_state(old: WorkerNode | None, start: pb.Start, rank: int) -> Any:
    """The method state this worker had before its connection broke, when the master has none to hand back (the
    aggregator tier: ``Start.included_through``) and it is still right: committed through the last round the
    master took its message in. None: start from the Start as it is."""
    if old is None or old.rank != rank or start.HasField("worker_state") or not start.included_through:
        return None
    last = start.included_through - 1
    pending = old._pending
    if last == old.round and pending is not None:
        return committed(pending)  # its message of the round it was in was taken before the break
    if last < old.round:
        if isinstance(pending, InPlace):
            pending.undo()  # that round's step moved g_i in place; the round did not take it
        return old.state
    return None


def _node_from_start(start: pb.Start, cfg: RunConfig, obj: object, rank: int, d: int,
                     x0: np.ndarray | None = None) -> WorkerNode:
    """The worker's side of the master's plan (``ef21.engine.plan.Plan.worker_setting``), from the Start message;
    ``x0``: the worker's own x⁰, which the Start may name instead of sending x."""
    layout = getattr(obj, "layout", lambda: None)()
    method, comp = resolve_method(cfg, d, layout)
    if start.x_is_own_x0:
        if x0 is None:
            raise WorkerFailure("the master's Start names this worker's own x0, but it sent no digest of one")
        x = x0
    else:
        x = lean_from_proto(start.x, d, cfg.np_dtype)
    g = lean_from_proto(start.g, d, cfg.np_dtype) if start.HasField("g") else None
    v = lean_from_proto(start.momentum, d, cfg.np_dtype) if start.HasField("momentum") else None
    state = lean_from_proto(start.worker_state, d, cfg.np_dtype) if start.HasField("worker_state") else None
    expected_step = 1.0 if method.gamma_in_message else start.gamma
    if start.x_step != expected_step:
        raise WorkerFailure(f"step mismatch: master uses {start.x_step}, this worker expects {expected_step}")
    estimator = make_estimator(cfg.estimator, cfg.sgdm_eta)
    tau = (batch_size_for(getattr(obj, "n_samples", None), cfg.batch_size, cfg.batch_fraction, rank)
           if estimator.stochastic else 0)
    setting = WorkerSetting(
        gamma=start.gamma, rule=worker_rule(cfg, method, start.gamma),
        init="full" if cfg.init == "full" else "compressed", seed=cfg.seed, n=cfg.workers, estimator=estimator,
        tau=tau, page_p=start.page_p or 1.0,
        grad_scale=1.0 if start.weight == 0.0 else 1.0 / (cfg.workers * start.weight),
        participation=participation_count(cfg.participation, cfg.workers))
    node = WorkerNode(method, comp, obj, rank, gamma=start.gamma, x0=x, setting=setting,  # type: ignore[arg-type]
                      g=g, v=v, state=state, round_=start.round,
                      buffers=np.zeros(layout.buffer_size) if layout is not None and layout.buffers else None)
    try:
        # The buffers and the optimizer's state as the master holds them at this round (never this worker's own).
        node.replica.set_extra_state(state_from_proto(start.state, node.replica.extra_state()))
    except (CodecError, ValueError) as exc:
        raise WorkerFailure(f"bad Start from the master: {exc}") from None
    return node


async def _resync(st: Stream, node: WorkerNode, d: int) -> None:
    log.warning("replica out of sync after round %d: asking the master for its state", node.round - 1)
    await st.send(pb.WorkerMessage(resync_request=pb.ResyncRequest(round=node.round)))
    msg = await st.recv_proto()
    if msg.WhichOneof("kind") != "resync":
        raise WorkerFailure(f"expected Resync, got {msg.WhichOneof('kind')}")
    # The run's dtype (a float32 run's replica is float32; a tensor replica takes float64, as the master sends).
    dtype = np.float32 if node.replica.x.dtype == np.float32 else np.float64
    node.replica.set_vectors(x=lean_from_proto(msg.resync.x, d, dtype), g=lean_from_proto(msg.resync.g, d, dtype))
    if msg.resync.HasField("momentum"):
        node.replica.set_vectors(v=lean_from_proto(msg.resync.momentum, d, dtype))
    node.replica.set_extra_state(state_from_proto(msg.resync.state, node.replica.extra_state()))
