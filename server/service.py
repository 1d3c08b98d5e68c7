"""The gRPC face of the master: Join, Train (one task per worker stream, its life in ``streams``) and Status.

Train is registered with raw-bytes (de)serializers: the master measures every message's size exactly as it
crossed the wire and checks it against the bound that d implies before parsing anything.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from ef21.problems.objectives import GRAM_MAX_D
from ef21_wire.auth import token_matches
from ef21_wire.protocol import GRPC_FRAME_BYTES, PROTOCOL_VERSION, version_mismatch
from ef21_wire.serde import read_update_fast, update_from_proto
from ef21_wire.v1 import ef21_pb2 as pb

from .bans import identity_of
from .coordinator import Coordinator
from .grpc_server import service_handler
from .session import Refusal
from .streams import StreamState, WorkerStream

log = logging.getLogger("ef21.master")


def max_worker_message_bytes(d: int) -> int:
    """The largest WorkerMessage a worker may send for dimension d: a d×d Gram in Setup (only sent for
    d ≤ GRAM_MAX_D), or a dense vector; never above what gRPC and protobuf can carry (2 GiB − 1)."""
    gram = 8 * d * d if d <= GRAM_MAX_D else 0
    return min(gram + 16 * d + 64 * 1024, 2**31 - 1)


STREAM_SLACK_MIN = 64
"""Streams the master keeps open beyond one per rank, at least: replacements whose predecessor has not ended yet,
workers knocking while the run is full (they are told so by their Hello's refusal)."""


def stream_limit(n: int) -> int:
    """Train streams open at once before new ones are refused: n ranks plus max(64, n/4) more. A client that opens
    thousands of streams and never says Hello holds at most that many (each for at most the handshake timeout);
    the rest are refused at once, before any state exists for them."""
    return n + max(STREAM_SLACK_MIN, n // 4)


class MasterService:
    def __init__(self, coord: Coordinator, status: Callable[[], dict], *, token: str | None = None,
                 handshake_timeout: float = 120.0, mutual_tls: bool = False) -> None:
        self.coord = coord
        self.status_document = status
        self.token = token
        self.handshake_timeout = handshake_timeout
        self.mutual_tls = mutual_tls  # charge faults to the client's certificate rather than its host
        self.over_limit = 0  # Train streams refused because too many were open (see ``stream_limit``)

    async def _authorize(self, context: grpc.aio.ServicerContext, rpc: str) -> None:
        if self.token is None or token_matches(self.token, context.invocation_metadata()):
            return
        # Never log the token itself, right or wrong.
        log.warning("unauthenticated %s from %s: missing or wrong run token", rpc, context.peer())
        self.coord.refuse("UNAUTHENTICATED")
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong run token")

    async def join(self, req: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        await self._authorize(context, "Join")
        if req.protocol_version != PROTOCOL_VERSION:
            why = version_mismatch(req.protocol_version, PROTOCOL_VERSION)
            log.warning("refused Join from %s: %s", context.peer(), why)
            self.coord.refuse("FAILED_PRECONDITION")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, why)
        reply = self.coord.join_reply()
        reply.protocol_version = PROTOCOL_VERSION
        return reply

    async def status(self, req: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusReply:
        await self._authorize(context, "Status")
        return pb.StatusReply(json=json.dumps(self.status_document()))

    def _check_size(self, raw: bytes) -> None:
        d = self.coord.d
        if d is not None and len(raw) > max_worker_message_bytes(d):
            raise Refusal("RESOURCE_EXHAUSTED", f"message of {len(raw)} bytes exceeds the bound for d = {d}")

    def _parse(self, raw: bytes) -> pb.WorkerMessage:
        """A WorkerMessage whose size was already checked (``_check_size``)."""
        msg = pb.WorkerMessage()
        try:
            msg.ParseFromString(raw)
        except DecodeError as exc:
            raise Refusal("INVALID_ARGUMENT", f"malformed WorkerMessage: {exc}") from None
        return msg

    async def train(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        """One worker's stream: a reader task feeds its messages to the coordinator while this task writes what
        the master sends, until the stream ends (``streams``); then the call closes with the end's status."""
        await self._authorize(context, "Train")
        await self._within_stream_limit(context)
        s = self.coord.open_stream(context.peer(), identity_of(context, self.mutual_tls))
        reader = asyncio.create_task(self._read(context, s), name=f"read-{context.peer()}")
        try:
            while True:
                out = await s.outbox.get()
                if out is None:
                    break
                await context.write(out)
        finally:
            # Whatever stopped the writing (the end, the peer gone, the call cancelled), the reader goes too and
            # the stream has ended before anything else runs.
            reader.cancel()
            self.coord.lost(s, "stream closed")
            await asyncio.wait([reader])
        end = s.end
        assert end is not None
        if end.code == "OK":
            return
        await context.abort(getattr(grpc.StatusCode, end.code), end.message)

    async def _within_stream_limit(self, context: grpc.aio.ServicerContext) -> None:
        """Refuse (RESOURCE_EXHAUSTED) a stream past ``stream_limit``: logged for the 1st, 2nd, 4th, 8th, …
        refusal, so that a storm names itself in the log without flooding it."""
        live, limit = len(self.coord.members.live), stream_limit(self.coord.n)
        if live < limit:
            return
        self.over_limit += 1
        self.coord.refuse("RESOURCE_EXHAUSTED")
        why = (f"{live} streams are open, the limit for {self.coord.n} workers is {limit}: a join storm, or clients "
               f"that open streams and never say Hello")
        if self.over_limit & (self.over_limit - 1) == 0:
            log.warning("refused a stream from %s (%d refused so far): %s", context.peer(), self.over_limit, why)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)

    async def _read(self, context: grpc.aio.ServicerContext, s: WorkerStream) -> None:
        """Feed one stream's messages to the coordinator, each checked against the stream's state first.

        Read with ``context.read()``, not the handler's request iterator: that iterator is an async generator
        whose frame keeps the last message it yielded until the next one arrives (see below)."""
        try:
            while True:
                try:
                    if s.state is StreamState.CONNECTED:
                        raw = await asyncio.wait_for(context.read(), self.handshake_timeout)
                    else:
                        raw = await context.read()
                except asyncio.TimeoutError:
                    raise Refusal("DEADLINE_EXCEEDED", f"no Hello within {self.handshake_timeout:g} s") from None
                if raw is grpc.aio.EOF:
                    self.coord.lost(s, "worker closed its stream")
                    return
                s.received(raw)
                if not s.ended:  # else in flight when the stream ended (e.g. the run's last round): never applied
                    self._dispatch(s, raw)
                # Let go of the message now, not when the next one arrives: a worker set up says nothing until the
                # start, and its d×d Gram (8 MB at d = 10³) held here by every stream was O(n·d²) of master memory.
                del raw
        except Refusal as r:
            self._refuse(s, r)
        except grpc.aio.AioRpcError as exc:
            self.coord.lost(s, f"stream error {exc.code().name}")
        except Exception as exc:  # a bug must end this stream visibly, never leave it open and unread
            log.exception("stream of %s failed", s.peer)
            self.coord.refuse("INTERNAL")
            self.coord.end_stream(s, StreamState.REFUSED, f"internal error: {exc!r}", "INTERNAL")

    def _dispatch(self, s: WorkerStream, raw: bytes) -> None:
        self._check_size(raw)
        fast = read_update_fast(raw)  # a large Update, read without the generated classes' copies
        if fast is not None:
            s.check_accepts("update")
            self.coord.update(s, fast, len(raw) + GRPC_FRAME_BYTES)
            return
        msg = self._parse(raw)
        kind = msg.WhichOneof("kind")
        s.check_accepts(kind)
        if kind == "hello":
            self.coord.hello(s, msg.hello)
        elif kind == "setup":
            self.coord.setup(s, msg.setup)
        elif kind == "update":
            self.coord.update(s, update_from_proto(msg.update), len(raw) + GRPC_FRAME_BYTES)
        elif kind == "eval":
            self.coord.eval(s, msg.eval, len(raw) + GRPC_FRAME_BYTES)
        elif kind == "resync_request":
            self.coord.resync(s, msg.resync_request)
        elif kind == "power_reply":
            self.coord.power_reply(s, msg.power_reply)
        elif kind == "gram_reply":
            self.coord.gram_reply(s, msg.gram_reply)
        elif kind == "leave":
            self.coord.leave(s, msg.leave)
        else:  # a kind ``streams.ACCEPTS`` lets through but nothing here handles: a bug, refused all the same
            raise Refusal("INTERNAL", f"no handler for {kind}")

    def _refuse(self, s: WorkerStream, r: Refusal) -> None:
        """End the stream ``refused`` with the refusal's code, logged with the peer's identity."""
        # ``worker_left``: a worker whose objective does not fit the run says so itself (exit 2), so `ef21 run`
        # does not report it twice.
        log.warning("refused %s (%s)%s: %s", s.peer, s.identity, "" if s.rank is None else f" (rank {s.rank})",
                    r.message, extra={"worker_left": r.objective})
        self.coord.refuse(r.code)
        # Charged to the sender: any refusal once it holds a rank, a malformed message before.
        if s.rank is not None or r.code == "INVALID_ARGUMENT":
            self.coord.fault(s.identity)
        self.coord.end_stream(s, StreamState.REFUSED, r.message, r.code)

    def handler(self) -> grpc.GenericRpcHandler:
        return service_handler(self.join, self.status, self.train)
