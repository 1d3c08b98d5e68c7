"""``ef21 aggregator``: one block of the run's tree (``ef21.engine.tree``) between its workers and the master.

Workers connect to an aggregator exactly as to the master (same service, same ``ef21 worker --master``). Each
worker's Train stream is relayed 1:1 to a stream of the aggregator's own connection to the master, so joining,
set-up (Hello, Setup, the Grams, the power iteration), Start, Resync and Stop pass through unchanged and the
master's membership rules hold as they are. Two things do not pass through:

- a round's Updates: the aggregator holds them until every worker of its block that the round asks for has sent
  its own, adds them in rank order (``tree.block_sum``, the simulator's arithmetic) and sends the master ONE Update
  carrying the sum and the ranks it covers (``Update.covers``), on the stream of the first rank covered; the
  block's Evals follow, each on its rank's stream (the master sums their gradients in the tree's order);
- the round's RoundResult: the master sends it once, on that stream, and the aggregator relays it to the other
  ranks it covered.

A worker the aggregator loses is a worker the master loses (its relayed stream is closed), and a worker that
joins mid-round waits for the next round; the master's partial-round rules decide the rest. The aggregator keeps
no state of the run beyond the round in progress: a replacement aggregator for the same block is just another
one, and its workers join again as replacements.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError

from ef21.compression.codec import CodecError, decode
from ef21.engine.config import RunConfig
from ef21.engine.nodes import is_eval_round
from ef21.engine.tree import Tree, block_sum
from ef21.errors import UserError
from ef21.methods import Message
from ef21.methods.participation import participants, participation_count
from ef21_wire.auth import token_matches
from ef21_wire.fastwire import read_round_result, read_update
from ef21_wire.protocol import PROTOCOL_VERSION, SERVICE, TRAIN_METHOD
from ef21_wire.serde import update_from_proto, vector_to_proto
from ef21_wire.v1 import ef21_pb2 as pb
from ef21_worker.channel import ClientSecurity, open_channel

from .grpc_server import service_handler

log = logging.getLogger("ef21.aggregator")

# A worker's relayed stream that says nothing for this long before its Hello is dropped (as the master does).
HANDSHAKE_TIMEOUT_S = 30.0


@dataclass
class Relay:
    """One worker's stream and its relayed stream to the master."""

    peer: str
    outbox: asyncio.Queue  # bytes to the worker; None ends its stream
    upstream: grpc.aio.StreamStreamCall
    upbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # bytes to the master, in order; None: done
    rank: int | None = None
    started_at: int | None = None  # the round its Start began it at (None: not started)
    ended: bool = False
    end: tuple[grpc.StatusCode, str] | None = None


@dataclass
class BlockRound:
    """What the block's workers have sent for one round."""

    updates: dict[int, tuple[Message, int, bool]] = field(default_factory=dict)  # rank → (message, entries, dense)
    evals: dict[int, bytes] = field(default_factory=dict)
    sent: bool = False


class Aggregator:
    def __init__(self, master: str, block: int, security: ClientSecurity | None = None) -> None:
        self.master = master
        self.block_index = block
        self.security = security
        self.channel: grpc.aio.Channel | None = None
        self.cfg: RunConfig | None = None
        self.tree: Tree | None = None
        self.block: range = range(0)
        self.relays: dict[int, Relay] = {}  # rank → its relay, once Welcomed
        self.rounds: dict[int, BlockRound] = {}
        self.carried: dict[int, list[int]] = {}  # round → the ranks its sum covered (relay its result to them)
        self.eval_every = 1
        self.participation: int | None = None
        self.d: int | None = None
        self.sums_sent = 0
        self.last_sent = -1  # the latest round whose sum went (older rounds are forgotten)
        # Set when the master's Stop passes through: the run is over, and the aggregator leaves as its workers do
        # (a compose or job topology would otherwise never end: nothing else stops an aggregator).
        self.over = asyncio.Event()

    # -- set-up ------------------------------------------------------------------------------------------------

    async def connect(self, timeout: float = 60.0) -> pb.JoinReply:
        """Join the master once to learn the run (its tree, hence this aggregator's block)."""
        self.channel = open_channel(self.master, self.security)
        join = self.channel.unary_unary(f"/{SERVICE}/Join", request_serializer=pb.JoinRequest.SerializeToString,
                                        response_deserializer=pb.JoinReply.FromString)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                reply = await join(pb.JoinRequest(hostname="aggregator", protocol_version=PROTOCOL_VERSION),
                                   timeout=5.0, metadata=self._metadata())
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or \
                        loop.time() > deadline:
                    raise UserError(f"cannot join the master at {self.master}: {exc.code().name}: "
                                    f"{exc.details()}") from None
                await asyncio.sleep(0.2)
        cfg = RunConfig.from_dict(json.loads(reply.config_json))
        if not cfg.aggregators:
            raise UserError(f"the run at {self.master} sums at the master (no --aggregators): connect the workers "
                            f"to it directly")
        if not 0 <= self.block_index < cfg.aggregators:
            raise UserError(f"--block must lie in 0..{cfg.aggregators - 1} (the run has {cfg.aggregators} "
                            f"aggregators), got {self.block_index}")
        self.cfg = cfg
        self.tree = Tree(cfg.workers, cfg.aggregators)
        self.block = self.tree.block(self.block_index)
        self.participation = participation_count(cfg.participation, cfg.workers)
        self.join_reply = reply
        log.info("aggregator for block %d (ranks %d..%d) of run %s at %s", self.block_index, self.block.start,
                 self.block.stop - 1, reply.run_id, self.master)
        return reply

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        return None if self.security is None else self.security.metadata()

    # -- the service the workers see --------------------------------------------------------------------------

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        """The workers present the run token the aggregator itself presents to the master (none: none asked)."""
        token = None if self.security is None else self.security.token
        if token is None or token_matches(token, context.invocation_metadata()):
            return
        log.warning("unauthenticated call from %s: missing or wrong run token", context.peer())
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong run token")

    async def _forward(self, method: str, request: object, reply_type: type, context: grpc.aio.ServicerContext):
        """A unary call passed on to the master as it is, its error (code and details) passed back."""
        assert self.channel is not None
        await self._authorize(context)
        call = self.channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=type(request).SerializeToString,
                                        response_deserializer=reply_type.FromString)  # type: ignore[attr-defined]
        try:
            return await call(request, timeout=30.0, metadata=self._metadata())
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
            raise  # unreachable: abort raises

    async def join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        return await self._forward("Join", request, pb.JoinReply, context)

    async def status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusReply:
        return await self._forward("Status", request, pb.StatusReply, context)

    async def train(self, requests: object, context: grpc.aio.ServicerContext) -> None:
        """One worker's stream: relayed to its own stream to the master; the round's messages are summed."""
        assert self.channel is not None
        await self._authorize(context)
        upstream = self.channel.stream_stream(TRAIN_METHOD)(metadata=self._metadata())
        relay = Relay(context.peer(), asyncio.Queue(), upstream)
        down = asyncio.create_task(self._from_master(relay), name=f"down-{relay.peer}")
        up = asyncio.create_task(self._from_worker(relay, context), name=f"up-{relay.peer}")
        writer = asyncio.create_task(self._to_master(relay), name=f"write-{relay.peer}")
        try:
            while True:
                out = await relay.outbox.get()
                if out is None:
                    break
                await context.write(out)
        finally:
            up.cancel()
            down.cancel()
            writer.cancel()
            await asyncio.wait([up, down, writer])
            self._lost(relay)
            upstream.cancel()
        if relay.end is not None and relay.end[0] != grpc.StatusCode.OK:
            await context.abort(relay.end[0], relay.end[1])

    # -- the worker's side ------------------------------------------------------------------------------------

    async def _from_worker(self, relay: Relay, context: grpc.aio.ServicerContext) -> None:
        try:
            while True:
                if relay.rank is None:
                    raw = await asyncio.wait_for(context.read(), HANDSHAKE_TIMEOUT_S)
                else:
                    raw = await context.read()
                if raw is grpc.aio.EOF:
                    relay.upbox.put_nowait(None)
                    return
                self._worker_message(relay, raw)
        except asyncio.TimeoutError:
            self._finish(relay, grpc.StatusCode.DEADLINE_EXCEEDED, f"no Hello within {HANDSHAKE_TIMEOUT_S:g} s")
        except _Refused as exc:
            log.warning("refused %s (rank %s): %s", relay.peer, relay.rank, exc.message)
            self._finish(relay, exc.code, exc.message)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            self._finish(relay, grpc.StatusCode.UNAVAILABLE, "the stream to the master broke")

    def _worker_message(self, relay: Relay, raw: bytes) -> None:
        fast = read_update(raw) if relay.started_at is not None else None
        if fast is not None:
            self._update(relay, fast.round, fast.vector, fast.buffers is not None or fast.replace)
            return
        msg = pb.WorkerMessage()
        try:
            msg.ParseFromString(raw)
        except DecodeError as exc:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"malformed WorkerMessage: {exc}") from None
        kind = msg.WhichOneof("kind")
        if kind == "hello":
            raw = self._hello(relay, msg.hello).SerializeToString()
        elif kind == "setup" and msg.setup.dim:
            self.d = self.d or int(msg.setup.dim)
        elif kind == "update":
            u = update_from_proto(msg.update)
            self._update(relay, u.round, u.vector, u.buffers is not None or u.replace or bool(u.covers))
            return
        elif kind == "eval":
            self._eval(relay, msg.eval.round, raw)
            return
        self._write_up(relay, raw)

    def _hello(self, relay: Relay, hello: pb.Hello) -> pb.WorkerMessage:
        """A worker asks for a rank of this block: a free one, or its own again (a worker that rejoins)."""
        if relay.rank is not None:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, "second Hello")
        held = {r for r, other in self.relays.items() if not other.ended}
        if hello.requested_rank >= 0:
            if hello.requested_rank not in self.block:
                raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                               f"rank {hello.requested_rank} is not in this aggregator's block (ranks "
                               f"{self.block.start}..{self.block.stop - 1}): connect to the aggregator of block "
                               f"{self.tree.block_of(hello.requested_rank) if self.tree else '?'}")
            rank = hello.requested_rank
        else:
            free = [r for r in self.block if r not in held]
            if not free:
                raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"every rank of block {self.block_index} has a worker")
            rank = free[0]
        out = pb.WorkerMessage()
        out.hello.CopyFrom(hello)
        out.hello.requested_rank = rank
        return out

    def _update(self, relay: Relay, round_: int, vector: object, extra: bool) -> None:
        if relay.rank is None or relay.started_at is None:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, "Update before the worker's Start")
        if extra:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "an Update with buffers, a selector or covers cannot be "
                                                             "summed by an aggregator")
        if round_ < self.last_sent and round_ not in self.rounds:
            return  # a round long gone (its sum went without this worker)
        br = self.rounds.setdefault(round_, BlockRound())
        if br.sent or round_ < relay.started_at:
            log.info("rank %d's Update of round %d came after its block's sum: dropped", relay.rank, round_)
            return
        if relay.rank in br.updates:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, f"second Update from rank {relay.rank} for round "
                                                                f"{round_}")
        try:
            assert self.cfg is not None
            vec = decode(vector, expected_dim=self.d or getattr(vector, "dim", None),  # type: ignore[arg-type]
                         dtype=self.cfg.np_dtype)
        except CodecError as exc:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"Update round {round_}: {exc}") from None
        br.updates[relay.rank] = (Message(vec), vec.nnz, vec.is_dense)
        self._maybe_send(round_)

    def _eval(self, relay: Relay, round_: int, raw: bytes) -> None:
        if round_ < self.last_sent and round_ not in self.rounds:
            return
        br = self.rounds.setdefault(round_, BlockRound())
        if br.sent:
            return  # its block's sum went without it: the master would refuse an Eval without its Update
        assert relay.rank is not None
        br.evals[relay.rank] = raw
        self._maybe_send(round_)

    def _expected(self, round_: int) -> tuple[list[int], list[int]]:
        """(ranks whose Update round t waits for, ranks whose Eval it waits for): the block's workers that are
        welcomed and not started at a later round, as sampled participation asks."""
        assert self.cfg is not None
        live = [r for r, rel in sorted(self.relays.items())
                if not rel.ended and (rel.started_at is None or rel.started_at <= round_)]
        chosen = participants(self.cfg.seed, round_, self.cfg.workers, self.participation)
        ups = [r for r in live if chosen is None or r in chosen]
        evals = live if is_eval_round(round_, self.eval_every, self.cfg.rounds) else []
        return ups, evals

    def _maybe_send(self, round_: int) -> None:
        br = self.rounds.get(round_)
        if br is None or br.sent:
            return
        ups, evals = self._expected(round_)
        if not all(r in br.updates for r in ups) or not all(r in br.evals for r in evals):
            return
        if not br.updates:  # sampled participation asked none of the block: only the evaluations go
            if br.evals:
                br.sent = True
                self._send_evals(br)
            return
        ranks = sorted(br.updates)
        carrier = self.relays.get(ranks[0])
        if carrier is None or carrier.ended:
            return
        d = next(iter(br.updates.values()))[0].vector.dim
        total = block_sum([br.updates[r][0] for r in ranks], d)
        assert total is not None
        up = pb.Update(round=round_)
        # In the run's dtype whatever the encoding (a sum of values): float64, or float32 under --dtype float32 (the
        # codec sends float32 values as float32), whose sums are float32 additions in rank order, as the simulator's.
        up.message.CopyFrom(vector_to_proto(total.vector))
        for r in ranks:
            up.covers.add(rank=r, entries=br.updates[r][1], dense=br.updates[r][2])
        br.sent = True
        self.last_sent = max(self.last_sent, round_)
        self.carried[round_] = ranks
        self.sums_sent += 1
        self._write_up(carrier, pb.WorkerMessage(update=up).SerializeToString())
        self._send_evals(br)
        # Only the round in progress is kept.
        for t in [t for t in self.rounds if t <= round_]:
            if t < round_ or self.rounds[t].sent:
                self.rounds[t].updates.clear()
                self.rounds[t].evals.clear()
        for t in [t for t in self.rounds if t < round_ - 1]:
            del self.rounds[t]

    def _send_evals(self, br: BlockRound) -> None:
        for r in sorted(br.evals):
            rel = self.relays.get(r)
            if rel is not None and not rel.ended:
                self._write_up(rel, br.evals[r])

    def _write_up(self, relay: Relay, raw: bytes) -> None:
        relay.upbox.put_nowait(raw)

    async def _to_master(self, relay: Relay) -> None:
        """The one writer of a relayed stream (a block's sum is written by whichever worker's message completed
        it, so writes come from several tasks; one queue keeps them in order)."""
        try:
            while True:
                raw = await relay.upbox.get()
                if raw is None:
                    await relay.upstream.done_writing()
                    return
                await relay.upstream.write(raw)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the master ended the stream: its reader says why

    # -- the master's side ------------------------------------------------------------------------------------

    async def _from_master(self, relay: Relay) -> None:
        try:
            while True:
                raw = await relay.upstream.read()
                if raw is grpc.aio.EOF:
                    code = await relay.upstream.code()
                    details = await relay.upstream.details()
                    self._finish(relay, code, details or "")
                    return
                self._master_message(relay, raw)
        except grpc.aio.AioRpcError as exc:
            self._finish(relay, exc.code(), exc.details() or "")

    def _master_message(self, relay: Relay, raw: bytes) -> None:
        rr = read_round_result(raw)
        if rr is not None:
            relay.outbox.put_nowait(raw)
            covered = self.carried.get(rr.round)
            if covered is not None and relay.rank == covered[0]:
                del self.carried[rr.round]
                for r in covered[1:]:
                    other = self.relays.get(r)
                    if other is not None and not other.ended:
                        other.outbox.put_nowait(raw)
            return
        msg = pb.MasterMessage()
        try:
            msg.ParseFromString(raw)
        except DecodeError:
            relay.outbox.put_nowait(raw)
            return
        kind = msg.WhichOneof("kind")
        if kind == "welcome":
            relay.rank = msg.welcome.rank
            old = self.relays.get(relay.rank)
            if old is not None and old is not relay:
                old.ended = True
            self.relays[relay.rank] = relay
        elif kind == "stop":
            if not self.over.is_set():
                log.info("the run is over (%s)", msg.stop.reason)
            self.over.set()
        elif kind == "start":
            relay.started_at = int(msg.start.round)
            self.eval_every = max(1, msg.start.eval_every)
            if msg.start.HasField("x") and not self.d:
                self.d = int(msg.start.x.dim)
            # Rounds before this worker's start no longer wait for it.
            for t in list(self.rounds):
                self._maybe_send(t)
        elif kind == "round_result":  # a RoundResult the hand reader did not take
            relay.outbox.put_nowait(raw)
            covered = self.carried.get(msg.round_result.round)
            if covered is not None and relay.rank == covered[0]:
                del self.carried[msg.round_result.round]
                for r in covered[1:]:
                    other = self.relays.get(r)
                    if other is not None and not other.ended:
                        other.outbox.put_nowait(raw)
            return
        relay.outbox.put_nowait(raw)

    # -- ends ---------------------------------------------------------------------------------------------------

    def _finish(self, relay: Relay, code: grpc.StatusCode, message: str) -> None:
        if relay.end is None:
            relay.end = (code, message)
        relay.outbox.put_nowait(None)

    def _lost(self, relay: Relay) -> None:
        if relay.ended:
            return
        relay.ended = True
        if relay.rank is not None and self.relays.get(relay.rank) is relay:
            log.info("rank %d's worker is gone", relay.rank)
            # The rounds that waited for it may go on without it (the master loses it too: its stream closes).
            for t in list(self.rounds):
                self._maybe_send(t)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    def handler(self) -> grpc.GenericRpcHandler:
        return service_handler(self.join, self.status, self.train)


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

