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

from ef21.codec import CodecError
from ef21.config import RunConfig
from ef21.data import Dataset, fingerprint, load_dataset
from ef21.engine import WorkerNode
from ef21.errors import UserError
from ef21.methods import Downlink
from ef21.problem import local_objective
from ef21.simulate import resolve_method
from ef21_wire.protocol import PROTOCOL_VERSION, TRAIN_METHOD, is_eval_round
from ef21_wire.serde import dense_to_proto, state_checksum, vector_from_proto, vector_to_proto
from ef21_wire.v1 import ef21_pb2 as pb
from ef21_wire.v1.ef21_pb2_grpc import MasterStub

from .channel import open_channel

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


async def join_with_backoff(stub: MasterStub, opts: WorkerOptions) -> pb.JoinReply:
    deadline = time.monotonic() + opts.connect_timeout
    delay = 0.1
    while True:
        try:
            return await stub.Join(pb.JoinRequest(hostname=opts.hostname, protocol_version=PROTOCOL_VERSION),
                                   timeout=10.0, wait_for_ready=False)
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
        return None, f"quadratic:{cfg.dim}:{cfg.seed}", cfg.dim, 0
    ds = load_dataset(cfg.data, problem=cfg.problem)
    return ds, fingerprint(ds.A, ds.y), ds.d, ds.n_rows


class Stream:
    """The Train stream as raw bytes in and out, with a timeout on every read (the master is a peer too)."""

    def __init__(self, call: grpc.aio.StreamStreamCall, reply_timeout: float) -> None:
        self.call = call
        self.reply_timeout = reply_timeout
        self.bytes_up = 0

    async def send(self, msg: pb.WorkerMessage) -> int:
        raw = msg.SerializeToString()
        try:
            await self.call.write(raw)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            # The master may have ended the stream (with a Stop waiting to be read) while we were computing.
            stop = await self._pending_stop()
            if stop is not None:
                raise RunStopped(stop) from None
            raise WorkerFailure(f"cannot send to the master: {exc}") from None
        self.bytes_up += len(raw)
        return len(raw)

    async def _pending_stop(self) -> str | None:
        try:
            while True:
                raw = await asyncio.wait_for(self.call.read(), 5.0)
                if raw is grpc.aio.EOF:
                    return None
                msg = pb.MasterMessage.FromString(raw)
                if msg.WhichOneof("kind") == "stop":
                    return msg.stop.reason
        except (grpc.aio.AioRpcError, asyncio.TimeoutError):
            return None

    async def recv(self, timeout: float | None = None) -> pb.MasterMessage:
        try:
            raw = await asyncio.wait_for(self.call.read(), timeout or self.reply_timeout)
        except asyncio.TimeoutError:
            raise WorkerFailure("no message from the master in time") from None
        if raw is grpc.aio.EOF:
            code = await self.call.code()
            details = await self.call.details()
            raise WorkerFailure(f"master ended the stream: {code.name}: {details}")
        msg = pb.MasterMessage()
        msg.ParseFromString(raw)
        return msg


async def run_worker(opts: WorkerOptions) -> str:
    """Take part in one run until the master stops it; returns the master's stop reason."""
    async with open_channel(opts.master) as channel:
        reply = await join_with_backoff(MasterStub(channel), opts)
        cfg = RunConfig.from_dict(json.loads(reply.config_json))
        if opts.data is not None:
            cfg = dataclasses.replace(cfg, data=opts.data)
        ds, fp, d, n_rows = await asyncio.to_thread(load_worker_data, cfg)
        call = channel.stream_stream(TRAIN_METHOD)()
        try:
            return await _train(Stream(call, opts.reply_timeout), cfg, reply.run_id, ds, fp, d, n_rows, opts)
        except RunStopped as stop:
            return str(stop)
        except grpc.aio.AioRpcError as exc:
            raise WorkerFailure(f"stream failed: {exc.code().name}: {exc.details()}") from None
        finally:
            call.cancel()


async def _train(st: Stream, cfg: RunConfig, run_id: str, ds: Dataset | None, fp: str, d: int, n_rows: int,
                 opts: WorkerOptions) -> str:
    await st.send(pb.WorkerMessage(hello=pb.Hello(
        run_id=run_id, requested_rank=opts.rank, hostname=opts.hostname, data_fingerprint=fp, dim=d, n_rows=n_rows)))
    first = await st.recv()
    if first.WhichOneof("kind") != "welcome":
        raise WorkerFailure(f"expected Welcome, got {first.WhichOneof('kind')}")
    rank = first.welcome.rank
    log.info("joined as rank %d of %d", rank, first.welcome.workers)
    obj = local_objective(cfg, rank, ds)
    gram, diag = obj.gram(), obj.diagonal()
    await st.send(pb.WorkerMessage(setup=pb.Setup(
        rank=rank, smoothness=obj.smoothness(), shard_rows=getattr(obj, "n_rows", 0),
        gram=b"" if gram is None else np.ascontiguousarray(gram, dtype="<f8").tobytes(),
        diagonal=b"" if diag is None else np.ascontiguousarray(diag, dtype="<f8").tobytes())))
    msg = await st.recv()
    if msg.WhichOneof("kind") == "stop":
        return msg.stop.reason
    if msg.WhichOneof("kind") != "start":
        raise WorkerFailure(f"expected Start, got {msg.WhichOneof('kind')}")
    start = msg.start
    method, comp = resolve_method(cfg, d)
    x0 = vector_from_proto(start.x0, expected_dim=d).values
    node = WorkerNode(method, comp, obj, rank, gamma=start.gamma, x0=x0, init=cfg.init, seed=cfg.seed)
    if node.replica.x_step != start.x_step:
        raise WorkerFailure(f"step mismatch: master uses {start.x_step}, this worker {node.replica.x_step}")
    eval_every = max(1, start.eval_every)
    pause = random.Random(f"{rank}:{time.time_ns()}")
    while True:
        report = node.step()
        m = report.message
        if opts.delay > 0:
            await asyncio.sleep(pause.uniform(0.0, opts.delay))
        await st.send(pb.WorkerMessage(update=pb.Update(
            round=report.round, message=vector_to_proto(m.vector), replace=m.replace, f=report.f,
            distortion=report.distortion)))
        if is_eval_round(report.round, eval_every, cfg.rounds):
            await st.send(pb.WorkerMessage(eval=pb.Eval(round=report.round, grad=dense_to_proto(report.grad))))
        msg = await st.recv()
        kind = msg.WhichOneof("kind")
        if kind == "stop":
            return msg.stop.reason
        if kind != "round_result" or msg.round_result.round != node.round:
            raise WorkerFailure(f"expected the result of round {node.round}, got {kind}")
        rr = msg.round_result
        try:
            agg = vector_from_proto(rr.aggregate, expected_dim=d)
        except CodecError as exc:
            raise WorkerFailure(f"bad aggregate from the master: {exc}") from None
        node.apply(Downlink(agg, "replace" if rr.replace else "add", rr.scale))
        if rr.checksum and rr.checksum != state_checksum(node.replica.x, node.replica.g):
            await _resync(st, node, d)


async def _resync(st: Stream, node: WorkerNode, d: int) -> None:
    log.warning("replica out of sync after round %d: asking the master for its state", node.round - 1)
    await st.send(pb.WorkerMessage(resync_request=pb.ResyncRequest(round=node.round)))
    msg = await st.recv()
    if msg.WhichOneof("kind") != "resync":
        raise WorkerFailure(f"expected Resync, got {msg.WhichOneof('kind')}")
    node.replica.x[:] = vector_from_proto(msg.resync.x, expected_dim=d).values
    node.replica.g[:] = vector_from_proto(msg.resync.g, expected_dim=d).values
