"""A worker written out message by message, for tests that speak the Train protocol by hand: what an honest
worker would send at each step (Hello, Setup, Update, Eval, Leave) with the real objective of its shard, and every
way to read the master's answer (a message, the stream's end with its status, or nothing within a deadline)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import numpy as np

from ef21.compression.sparse import SparseVector
from ef21.engine.config import RunConfig
from ef21.problems.data import Dataset, data_info, load_dataset
from ef21.problems.problem import local_objective
from ef21_wire.protocol import PROTOCOL_VERSION, TRAIN_METHOD
from ef21_wire.serde import dense_to_proto, vector_from_proto, vector_to_proto
from ef21_wire.v1 import ef21_pb2 as pb
from ef21_wire.v1.ef21_pb2_grpc import MasterStub


@dataclass(frozen=True)
class Ended:
    """The stream ended: its gRPC status code and details."""

    code: grpc.StatusCode
    details: str


class RawClient:
    """One Train stream on ``channel``; nothing is sent until asked."""

    def __init__(self, channel: grpc.aio.Channel, cfg: RunConfig, ds: Dataset | None = None) -> None:
        self.channel = channel
        self.cfg = cfg
        self.ds = ds if ds is not None else load_dataset(cfg.data)
        self.call = channel.stream_stream(TRAIN_METHOD)()
        self.rank: int | None = None
        self.known_run_id = ""

    async def run_id(self) -> str:
        reply = await MasterStub(self.channel).Join(pb.JoinRequest(hostname="raw", protocol_version=PROTOCOL_VERSION))
        return reply.run_id

    async def write(self, raw: bytes) -> bool:
        """False when the stream is already over (the master ended it): nothing more can be sent."""
        try:
            await self.call.write(raw)
            return True
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            return False

    async def send(self, **kind) -> bool:  # type: ignore[no-untyped-def]
        return await self.write(pb.WorkerMessage(**kind).SerializeToString())

    async def recv(self, timeout: float = 10.0) -> pb.MasterMessage | Ended | None:
        """The master's next message, the stream's end, or None when nothing came within ``timeout``."""
        try:
            raw = await asyncio.wait_for(self.call.read(), timeout)
        except asyncio.TimeoutError:
            return None
        except grpc.aio.AioRpcError as exc:
            return Ended(exc.code(), exc.details() or "")
        if raw is grpc.aio.EOF:
            return Ended(await self.call.code(), await self.call.details() or "")
        return pb.MasterMessage.FromString(raw)

    def hello_message(self, rank: int, run_id: str = "") -> bytes:
        """A Hello as an honest worker of this run sends it (``run_id``: the run's, once ``hello`` has asked)."""
        info = data_info(self.cfg.data, loaded=self.ds)
        return pb.WorkerMessage(hello=pb.Hello(
            run_id=run_id or self.known_run_id, requested_rank=rank, hostname="raw", data_fingerprint=info.fingerprint,
            dim=self.ds.d, n_rows=self.ds.n_rows)).SerializeToString()

    async def hello(self, rank: int, run_id: str | None = None) -> pb.MasterMessage | Ended | None:
        self.known_run_id = run_id or await self.run_id()
        await self.write(self.hello_message(rank))
        reply = await self.recv()
        if isinstance(reply, pb.MasterMessage) and reply.WhichOneof("kind") == "welcome":
            self.rank = reply.welcome.rank
        return reply

    def setup_message(self, rank: int, *, power_iteration: bool = False) -> pb.Setup:
        """This rank's Setup, offering its Gram, or (``power_iteration``) products A_iᵀA_i v instead."""
        obj = local_objective(self.cfg, rank, self.ds)
        return pb.Setup(rank=rank, smoothness=obj.smoothness(), shard_rows=obj.n_rows, has_gram=not power_iteration,
                        power_iteration=power_iteration, dim=self.ds.d)

    def gram_reply(self, attempt: int, rank: int | None = None) -> bytes:
        """The answer to the master's GramRequest (its ``attempt``): this rank's Gram."""
        r = self.rank if rank is None else rank
        obj = local_objective(self.cfg, r, self.ds)
        return pb.WorkerMessage(gram_reply=pb.GramReply(
            gram=np.ascontiguousarray(obj.gram(), dtype="<f8").tobytes(), attempt=attempt)).SerializeToString()

    def power_reply(self, step: pb.PowerStep, scale: float = 1.0) -> bytes:
        """The answer to the master's PowerStep (echoing its iteration and attempt): A_iᵀA_i v of this rank's
        shard, times ``scale`` (1: honest)."""
        assert self.rank is not None
        obj = local_objective(self.cfg, self.rank, self.ds)
        w = scale * obj.gram_matvec(vector_from_proto(step.v, expected_dim=self.ds.d).values)
        return pb.WorkerMessage(power_reply=pb.PowerReply(iteration=step.iteration, w=dense_to_proto(w),
                                                          attempt=step.attempt)).SerializeToString()

    async def setup(self, rank: int | None = None, *, power_iteration: bool = False) -> bool:
        r = self.rank if rank is None else rank
        assert r is not None
        return await self.send(setup=self.setup_message(r, power_iteration=power_iteration))

    def cancel(self) -> None:
        self.call.cancel()


def garbage_update(round_: int, d: int = 112) -> pb.Update:
    """A well-formed Update that would wreck x if it were ever applied: 1e6 in two coordinates."""
    return pb.Update(round=round_, message=vector_to_proto(SparseVector(d, np.array([0, 7], dtype="<u4"),
                                                                        np.array([1e6, -1e6]))))
