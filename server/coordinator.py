"""The master's round engine: it drives a run from the workers' set-up to its end. Transport-independent.

A round: collect the workers' messages (``rounds.RoundBook``), close it into a log line, fold the messages into
the downlink (``ef21.engine.MasterNode``, the same code the simulator runs), send it, then do the master's own
O(d) work off the round's critical path. Every method is driven the same way, so nothing here knows EF21 from
GD; who may join is ``membership``, L at set-up ``curvature``, checkpoints ``persistence``, the status document
``status_doc``. Everything runs on the event loop's thread, so the state needs no locks; the gRPC service and the
status endpoint only call into this object.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from ef21.cli.runlog import JsonlWriter, ensure_parent
from ef21.compression.codec import CodecError, EncodedVector, decode, encode
from ef21.compression.compressors import max_entries
from ef21.compression.sparse import SparseVector
from ef21.engine.accounting import CommLedger, sends_selector
from ef21.engine.config import make_x0
from ef21.engine.nodes import MasterNode
from ef21.engine.plan import Plan, make_plan, resolve_downlink, resolve_method
from ef21.engine.records import RoundRecord, g_norm_sq, make_record, stop_check
from ef21.engine.tree import Tree
from ef21.errors import UserError
from ef21.methods import Downlink, make_method
from ef21.methods.estimators import batch_size_for
from ef21.methods.prox import parse_prox
from ef21.methods.stepsize import TheoryConstants
from ef21.problems.data import shard_bounds
from ef21_wire.fastwire import UpdateIn
from ef21_wire.protocol import GRPC_FRAME_BYTES
from ef21_wire.serde import (
    encoded_from_proto,
    lean_to_proto,
    round_result_to_bytes,
    state_checksum,
    state_to_proto,
    vector_digest,
)
from ef21_wire.v1 import ef21_pb2 as pb

from . import persistence
from .curvature import CurvatureRun, GramRun, PowerRun, SetupInterrupted, curvature_run, smoothness, stale_answer
from .membership import Membership, reference_data
from .options import FINISHED_REASONS, MASTER_ROWS, MasterOptions
from .rounds import RoundBook, RoundRules
from .session import Refusal, SetupInfo
from .streams import StreamState, WorkerStream

__all__ = ["Coordinator", "JoinTimeout", "MasterOptions", "MASTER_ROWS", "FINISHED_REASONS"]

log = logging.getLogger("ef21.master")


class JoinTimeout(Exception):
    """The workers did not come within --join-timeout."""


class Coordinator:
    def __init__(self, opts: MasterOptions, *, on_round: Callable[[RoundRecord], None] | None = None) -> None:
        opts.check()
        self.opts = opts
        self.cfg = cfg = opts.config
        self.n = cfg.workers
        self.prox = None if cfg.prox is None else parse_prox(cfg.prox)
        self.on_round = on_round
        self.run_id = uuid.uuid4().hex[:12]
        self.state = "waiting"
        self.state_detail = f"waiting for {self.n} workers"
        self.members = Membership(cfg, opts.max_faults)
        method = make_method(cfg.method)
        if opts.round_timeout is not None and not method.tolerates_missing:
            log.warning("%s cannot close a round without every worker: --round-timeout is ignored and rounds "
                        "wait for all workers", cfg.method)
        min_workers = (opts.min_workers if opts.min_workers is not None
                       else 1 if opts.round_timeout is not None else self.n)
        self.book = RoundBook(RoundRules(self.n, cfg.rounds, opts.eval_every, opts.round_timeout,
                                         min_workers if method.tolerates_missing else self.n,
                                         method.tolerates_missing, cfg.seed, cfg.eval_grad, cfg.tol))
        self.tolerates_missing = method.tolerates_missing
        self.wake = asyncio.Event()  # anything that may let the current round (or the set-up) move on
        self.done = asyncio.Event()
        self.plan: Plan | None = None
        self.curvature: CurvatureRun | None = None  # the exchange with the workers that L needs, while it runs
        # Set-ups begun (one more after each a lost worker interrupted); tags GramRequests and PowerSteps.
        self.setup_attempts = 0
        self.master: MasterNode | None = None
        self.constants: TheoryConstants | None = None
        self.L_i: list[float] | None = None
        self.n_samples: list[int | None] = [None] * self.n
        self.round = 0
        self.ledger = CommLedger(self.n, selector=sends_selector(method))
        self.latest: RoundRecord | None = None
        self.last_grad_norm_sq: float | None = None
        self.stop_reason = ""
        self.stop_message = ""
        self.wire_up = self.wire_down = self.eval_bytes = 0
        self.endpoints: dict[str, str] = {}  # filled in by the master once it listens: where to reach it
        self.started_at = time.time()
        self.rounds_started_at: float | None = None
        self.resumed_from: str | None = None
        self.finished_before: str | None = None  # the stop message of a finished run this master resumed
        self.rounds_closed = 0  # by this process (a resumed run's workers have come once one closes)
        self.x_final: np.ndarray | None = None
        # The master's replica is brought up to date after each round's downlink has gone out (``settle``); what
        # the next round needs from it is computed there, off the round's critical path.
        self._unapplied: Downlink | None = None
        self.x_finite = True
        self.g_norm: float | None = None
        self.checksum = b""
        self._x0_digest: bytes | None = None  # of x⁰, once a round-0 Start needs it
        self._iterates: list[np.ndarray] = []
        self._carriers: dict[int, list[int]] | None = None  # the last closed round's block sums (aggregators)
        self.round_start: persistence.Counters | None = None  # the counters as the round in progress began
        self._pending_log: RoundRecord | None = None  # a closed round not yet logged (its line is off the path)
        self.writer = JsonlWriter(None)
        log_offset: int | None = None
        if opts.resume is not None:
            log_offset = self._restore(opts.resume)
        else:
            self.members.reference = reference_data(cfg, opts.require_data)
            ref = self.members.reference
            self.members.d = None if ref is None or not ref[1] else ref[1]
            if self.d is not None:
                # Everything that d decides is checked now, not when the workers have come (exit 2 at once).
                resolve_method(cfg, self.d)
                resolve_downlink(cfg, self.d)
                make_x0(cfg.x0, self.d, dtype=cfg.np_dtype)
        self._check_batches()
        self.writer = JsonlWriter(opts.log, offset=log_offset)

    # -- what others read --------------------------------------------------------------------------------------

    @property
    def d(self) -> int | None:
        return self.members.d

    @property
    def sessions(self) -> dict[int, WorkerStream]:
        return self.members.sessions

    @property
    def reference(self) -> tuple[str, int, int] | None:
        return self.members.reference

    @property
    def refused(self) -> dict[str, int]:
        return self.members.refused

    @property
    def missed_streak(self) -> dict[int, int]:
        return self.book.missed_streak

    @property
    def late_messages(self) -> int:
        return self.book.late_messages

    @property
    def rounds_completed(self) -> int:
        return self.round + (1 if self.state in ("done", "failed") and self.latest is not None else 0)

    def _check_batches(self) -> None:
        """A minibatch larger than some shard is a usage error the master can see before any worker comes (for
        the built-in objectives, whose shard sizes follow from the data's rows)."""
        cfg, ref = self.cfg, self.reference
        if cfg.estimator == "full" or cfg.objective is not None or ref is None or not ref[2]:
            return
        for rank, (start, stop) in enumerate(shard_bounds(ref[2], self.n)):
            batch_size_for(stop - start, cfg.batch_size, cfg.batch_fraction, rank)

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def counters(self) -> persistence.Counters:
        """The counters a checkpoint restores, as they are now."""
        return persistence.Counters(self.round, self.ledger.paper_total, self.ledger.payload_total,
                                    self.ledger.down_total, (self.wire_up, self.wire_down, self.eval_bytes),
                                    self.writer.offset)

    def save_checkpoint(self, ended: tuple[str, str] | None = None) -> None:
        if self.opts.checkpoint is None or self.master is None or self.constants is None:
            return
        self.settle()
        self.writer.flush()
        # The state saved is x at ``self.round``. If that round was already counted and logged (the final round of
        # a run: it ends before its downlink), save the counters and the log offset from before it, so that a
        # resumed (extended) run redoes the round once instead of counting and logging it twice.
        counts = self.counters()
        if self.round_start is not None and self.round_start.round == self.round:
            counts = self.round_start
        rep, m = self.master.replica, self.members
        assert self.d is not None and m.reference is not None
        persistence.save(self.opts.checkpoint, persistence.SavedRun(
            cfg=self.cfg, run_id=self.run_id, round=self.round, reference=tuple(m.reference), d=self.d,
            objective_id=m.objective_id, constants=self.constants, L_i=self.L_i, n_samples=self.n_samples,
            counters=counts, last_grad_norm_sq=self.last_grad_norm_sq, effective_config=self.opts.effective_config,
            x=rep.x, g=rep.g, rows=self.master.rows, v=rep.v,
            g_tilde=None if self.master.downlink is None else self.master.downlink.g_tilde,
            w=None if self.master.primal is None else self.master.primal.shared.x,
            ended=ended, log_end=None if ended is None else self.writer.offset, layout=m.layout,
            state=rep.extra_state()))

    def _restore(self, path: Path) -> int | None:
        """Put the run saved at ``path`` (or its ``.prev``) into this master; returns where its log continues."""
        run, used, warning = persistence.load(path, self.cfg)
        if warning:
            log.warning("%s", warning)
        self.run_id = run.run_id
        self.members.reference = run.reference  # type: ignore[assignment]
        self.members.d = d = run.d
        self.members.objective_id = run.objective_id
        self.members.layout, self.members.layout_fixed = run.layout, True
        self.constants = run.constants
        self.L_i, self.n_samples = run.L_i, run.n_samples
        self.plan = make_plan(self.cfg, d, self.constants.L, self.L_i, self.n_samples, constants=self.constants,
                              layout=run.layout)
        self._book_limits(d)
        self.master = self.plan.master_node(run.x, self.opts.rows_dtype, run.state.get("buffers"))
        try:
            self.master.replica.set_extra_state(run.state)
        except ValueError as exc:
            raise UserError(f"checkpoint {used}: {exc}") from None
        self.master.replica.g[:] = run.g
        if run.v is not None:
            self.master.replica.v = run.v.copy()
        if self.master.downlink is not None:
            if run.g_tilde is None:
                raise UserError(f"checkpoint {used}: EF21-BC state (g_tilde) missing")
            self.master.downlink.g_tilde[:] = run.g_tilde
        if self.master.primal is not None:
            if run.w is None:
                raise UserError(f"checkpoint {used}: EF21-P state (w) missing")
            self.master.primal.shared.x[:] = run.w
        if run.rows is not None:
            if self.master.rows is None or self.master.rows.shape != run.rows.shape:
                raise UserError(f"checkpoint {used}: per-worker state of shape {run.rows.shape} does not fit")
            self.master.rows[:] = run.rows
        self.round = self.master.round = run.round
        self.state_facts()
        c = run.counters
        self.ledger.paper_total, self.ledger.payload_total, self.ledger.down_total = (
            c.paper_total, c.payload_total, c.down_total)
        self.wire_up, self.wire_down, self.eval_bytes = c.wire
        self.last_grad_norm_sq = run.last_grad_norm_sq
        self.state = "running"
        self.resumed_from = f"{used} (round {self.round})"
        self.state_detail = f"resumed from {self.resumed_from}; waiting for workers"
        self.rounds_started_at = time.time()
        if run.finished(self.cfg):
            # Finished before a restart (e.g. a rescheduled pod): nothing to run again, and no worker to wait for;
            # its log keeps its last round (which an extended run would redo, hence the two offsets).
            assert run.ended is not None
            self.finished_before = run.ended[1]
            return run.log_end
        log.info("resumed run %s at round %d from %s", self.run_id, self.round, used)
        return c.log_offset

    # -- joining (the service calls these as the handshake's messages arrive) -------------------------------------

    def join_reply(self) -> pb.JoinReply:
        ended = f"{self.stop_reason}: {self.stop_message}" if self.state in ("done", "failed", "stopped") else ""
        return pb.JoinReply(run_id=self.run_id, config_json=json.dumps(self.cfg.to_dict()), workers=self.n,
                            ended=ended)

    def free_ranks(self) -> list[int]:
        return self.members.free_ranks()

    def open_stream(self, peer: str, identity: str) -> WorkerStream:
        """A new Train stream (``connected``); it has no rank until its Hello is accepted."""
        s = WorkerStream(peer, identity)
        self.members.live.add(s)
        return s

    def hello(self, s: WorkerStream, msg: pb.Hello) -> None:
        if self.state in ("done", "failed", "stopped"):
            # A worker coming back after the end (its stream broke before the Stop reached it): tell it the run
            # is over rather than refuse it, so it exits as after any run.
            s.send(self._stop_message())
            self.end_stream(s, StreamState.FINISHED, f"the run had ended ({self.stop_reason}: {self.stop_message})")
            return
        self.members.hello(s, msg, self.run_id, self.state)
        assert s.rank is not None
        log.info("worker %s (%s) joined as rank %d%s", msg.hostname, s.peer, s.rank,
                 "" if self.state == "waiting" else f" at round {self.round}")
        s.send(pb.MasterMessage(welcome=pb.Welcome(rank=s.rank, workers=self.n)).SerializeToString())

    def setup(self, s: WorkerStream, msg: pb.Setup) -> None:
        s.setup = self.members.setup_info(s, msg, self._decode)
        s.move(StreamState.SET_UP)
        if self.state == "running":
            self._admit(s)  # a replacement (or a worker of a resumed run) starts from the current state
            return
        ready = self.members.ready_ranks()
        self.state_detail = f"{len(ready)} of {self.n} workers ready"
        if len(ready) == self.n:
            self.members.ready.set()

    def end_stream(self, s: WorkerStream, state: StreamState, why: str, code: str | None = None, *,
                   quiet: bool = False) -> None:
        """End a stream (``finished``, ``left``, ``lost`` or ``refused``): it closes with its status, and its
        rank is free at once, for a new stream only. Idempotent: a stream ends once."""
        if not s.finish(state, why, code):
            return
        self.members.live.discard(s)
        if s.rank is None or state is StreamState.FINISHED:
            return
        if self.state == "waiting":
            self.members.ready.clear()
            self.wake.set()  # a start-up computation waiting on this worker gives up
            log.info("rank %d %s before the start (%s)", s.rank, state, why)
            return
        self.book.forget(s.rank)
        (log.info if quiet else log.warning)("rank %d %s: %s", s.rank, state, why)
        self.wake.set()

    def lost(self, s: WorkerStream, why: str) -> None:
        self.end_stream(s, StreamState.LOST, why)

    def leave(self, s: WorkerStream, msg: pb.Leave) -> None:
        """A worker that cannot go on (its objective failed) says why; its stream ends ``left``."""
        reason = msg.reason[:500]
        s.last_error = reason
        # ``worker_left``: `ef21 run` reports this itself, as its one error line.
        log.warning("worker left the run: %s", reason, extra={"worker_left": True})
        self.end_stream(s, StreamState.LEFT, f"rank {s.rank} left the run: {reason}", quiet=True)

    def refuse(self, code: str) -> None:
        self.members.refuse(code)

    def fault(self, identity: str) -> None:
        self.members.fault(identity)

    def power_reply(self, s: WorkerStream, msg: pb.PowerReply) -> None:
        if stale_answer(s, msg.attempt, self.curvature, self.setup_attempts):
            log.info("dropped rank %s's PowerReply %d for the interrupted set-up attempt %d", s.rank, msg.iteration,
                     msg.attempt)
            return
        if not isinstance(self.curvature, PowerRun):
            raise Refusal("FAILED_PRECONDITION", f"unexpected PowerReply {msg.iteration} from rank {s.rank}")
        w = self._decode(msg.w, f"PowerReply {msg.iteration}", dtype=np.float64)  # curvature, not a method vector
        if not w.is_dense:
            raise Refusal("INVALID_ARGUMENT", "PowerReply: the product must be dense")
        self.curvature.reply(s, msg.iteration, np.array(w.values), msg.attempt)

    def gram_reply(self, s: WorkerStream, msg: pb.GramReply) -> None:
        if stale_answer(s, msg.attempt, self.curvature, self.setup_attempts):
            log.info("dropped rank %s's Gram for the interrupted set-up attempt %d", s.rank, msg.attempt)
            return
        if not isinstance(self.curvature, GramRun):
            raise Refusal("FAILED_PRECONDITION", f"unexpected GramReply from rank {s.rank}")
        self.curvature.reply(s, msg.gram, msg.attempt)

    # -- start -----------------------------------------------------------------------------------------------------

    async def _start(self) -> None:
        """All n workers are set up: compute the constants from their curvature and start round 0."""
        cfg, d = self.cfg, self.d
        assert d is not None and self.reference is not None
        infos: list[SetupInfo] = [self.sessions[r].setup for r in range(self.n)]  # type: ignore[misc]
        self.setup_attempts += 1
        self.curvature = curvature_run(cfg, infos, d, self.sessions, self.members.ready, self.wake,
                                       self.setup_attempts)
        if self.curvature is not None:
            how = "the Grams, one rank at a time" if isinstance(self.curvature, GramRun) else "power iteration"
            self.state_detail = f"computing L: {how} with {self.n} workers"
        try:
            L = await smoothness(cfg, infos, self.curvature)
        finally:
            self.curvature = None
        L_vals = [i.smoothness for i in infos]
        self.L_i = None if any(v is None for v in L_vals) else [float(v) for v in L_vals]  # type: ignore[arg-type]
        self.n_samples = [i.n_samples for i in infos]
        self.plan = make_plan(cfg, d, L, self.L_i, self.n_samples, layout=infos[0].layout)
        self.constants = self.plan.constants
        self._book_limits(d)
        self.master = self.plan.master_node(make_x0(cfg.x0, d, infos[0].x0, cfg.np_dtype), self.opts.rows_dtype,
                                            infos[0].buffers0)
        self.state_facts()
        self.state = "running"
        self.state_detail = ""
        self.rounds_started_at = time.time()
        log.info("start: %s", self.constants.describe())
        for s in self.sessions.values():
            if s.state is StreamState.SET_UP:
                self._admit(s)

    def _book_limits(self, d: int) -> None:
        """What the round book checks messages against, once the plan is known."""
        assert self.plan is not None
        self.book.participation = self.plan.participation
        self.book.max_entries = max_entries(self.plan.compressor, d)
        self.book.buffer_size = 0 if self.plan.layout is None else self.plan.layout.buffer_size
        self.book.dense_rounds = getattr(self.plan.method, "dense_round", None)
        self.book.tree = Tree(self.n, self.cfg.aggregators) if self.cfg.aggregators else None

    def _admit(self, s: WorkerStream) -> None:
        """Send a worker the state to start from: x, g (and v) and its rank's g_i at the current round."""
        assert self.master is not None and self.constants is not None and self.plan is not None
        self.settle()
        rep = self.master.shared  # what the workers hold: (x, g), or with EF21-P the point w
        state = self.master.worker_state(s.rank)
        # A worker the master holds no g_i for starts with round 0's step: under --init full, its dense ∇f_i (with
        # --master-rows none, every worker: the master holds none).
        if state is None and self.cfg.init == "full":
            self.book.g0_ranks.add(s.rank)
        else:
            self.book.g0_ranks.discard(s.rank)
        start = pb.Start(
            gamma=self.constants.gamma, x_step=rep.x_step, g=lean_to_proto(rep.g),
            constants_json=json.dumps(self.constants.__dict__), checksum_every=self.opts.checksum_every,
            eval_every=self.opts.eval_every, round=self.round, page_p=self.plan.page_p,
            weight=0.0 if self.plan.weights is None else float(self.plan.weights[s.rank]),
        )
        if self._has_own_x0(s):
            start.x_is_own_x0 = True  # the worker computed x⁰ itself: d values fewer to send
        else:
            if self.round == 0 and s.setup is not None and s.setup.x0_digest:
                log.warning("rank %d's own x0 differs from the run's (its objective's x0() or the --x0 file differ "
                            "from rank 0's): it is sent the run's x0", s.rank)
            start.x.CopyFrom(lean_to_proto(rep.x))
        if rep.v is not None:
            start.momentum.CopyFrom(lean_to_proto(rep.v))
        state_to_proto(start.state, rep.extra_state())
        if state is not None:
            start.worker_state.CopyFrom(lean_to_proto(state))
        elif self.book.tree is not None and s.rank in self.book.last_in:
            # The master has only the blocks' sums; the worker (if it is the one that left) has its own g_i.
            start.included_through = self.book.last_in[s.rank] + 1
        elif self.round > 0 and self.master.rows is None and self.tolerates_missing:
            log.warning("rank %d: --master-rows none keeps no g_i, so the replacement starts from g_i = 0 and the "
                        "aggregate no longer equals the mean of the workers' g_i", s.rank)
        s.move(StreamState.RUNNING)
        s.send(pb.MasterMessage(start=start).SerializeToString())
        self.wake.set()

    def _has_own_x0(self, s: WorkerStream) -> bool:
        """Whether the worker starts from an x it computed itself: round 0, and its digest is of the run's x⁰."""
        if self.round != 0 or s.setup is None or not s.setup.x0_digest or self.master is None:
            return False
        if self._x0_digest is None:
            self._x0_digest = vector_digest(self.master.replica.x)
        return s.setup.x0_digest == self._x0_digest

    # -- the round's messages (the service calls these) ------------------------------------------------------------

    def _decode(self, vec: pb.SparseVector | EncodedVector, what: str, max_nnz: int | None = None,
                dim: int | None = None, dtype: object = None) -> SparseVector:
        """A vector of d entries (``dim``: of another length, e.g. a model's buffers, float64) from a peer, or a
        refusal. A method vector's values are of the run's ``--dtype`` (``dtype``: another)."""
        assert self.d is not None
        if dtype is None:
            dtype = self.cfg.np_dtype if dim is None else np.float64
        try:
            enc = vec if isinstance(vec, EncodedVector) else encoded_from_proto(vec)
            return decode(enc, expected_dim=self.d if dim is None else dim, max_nnz=max_nnz,
                          dtype=dtype)  # type: ignore[arg-type]
        except CodecError as exc:
            raise Refusal("INVALID_ARGUMENT", f"{what}: {exc}") from None

    def update(self, s: WorkerStream, msg: UpdateIn, nbytes: int) -> None:
        if self.book.counts(s, msg.round, self.round, "Update", self.state):
            assert self.d is not None
            self.book.update(s, msg, nbytes, self.round, self.d, self._decode, self.sessions)
            if self.book.may_move(self.round):
                self.wake.set()

    def eval(self, s: WorkerStream, msg: pb.Eval, nbytes: int) -> None:
        if self.book.counts(s, msg.round, self.round, "Eval", self.state):
            self.book.eval(s, msg, nbytes, self.round, self._decode)
            self.wake.set()

    def resync(self, s: WorkerStream, msg: pb.ResyncRequest) -> None:
        if not self.book.counts(s, msg.round, self.round, "ResyncRequest", self.state):
            return
        assert self.master is not None
        self.settle()
        rep = self.master.shared
        log.warning("rank %d is out of sync at round %d: sending the dense state", s.rank, msg.round)
        resync = pb.Resync(round=msg.round, x=lean_to_proto(rep.x), g=lean_to_proto(rep.g))
        if rep.v is not None:
            resync.momentum.CopyFrom(lean_to_proto(rep.v))
        state_to_proto(resync.state, rep.extra_state())
        s.send(pb.MasterMessage(resync=resync).SerializeToString())

    # -- the run ---------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Wait for n workers, then run rounds until the stop rule; always ends with ``done`` set."""
        try:
            if self.finished_before is not None:
                self._end_finished()
                return
            while self.master is None:
                await self._wait_for_workers()
                try:
                    await self._start()
                except SetupInterrupted:
                    log.warning("a worker left while L was being computed; waiting for %d workers again", self.n)
            await self._rounds()
        except JoinTimeout as exc:
            self._end("join-timeout", str(exc))
        except UserError as exc:
            self._end("failed", str(exc))
        except asyncio.CancelledError:
            self._end("stopped", f"master shut down at round {self.round}")
            raise
        except Exception as exc:  # a bug must still end the run visibly, never hang the workers
            log.exception("round engine failed")
            self._end("failed", f"internal error: {exc!r}")
        finally:
            self.writer.close()
            self.done.set()

    async def _wait_for_workers(self) -> None:
        try:
            async with asyncio.timeout(self.opts.join_timeout):
                while not self.members.ready.is_set():
                    await self.members.ready.wait()
        except TimeoutError:
            raise JoinTimeout(self.members.join_timeout_message(self.opts.join_timeout)) from None

    async def _collect_round(self) -> None:
        """Until the round may close: all updates (and evals) in, or the timeout passed with enough of them."""
        while not self.book.complete(self.round):
            close, detail = self.book.may_close_partially(self.round, self.sessions)
            if close:
                return
            if detail is not None:
                self.state_detail = detail
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), self.book.wait_s())
            except asyncio.TimeoutError:
                pass

    async def _first_round_in_time(self) -> None:
        """A resumed run: its workers must be back (the first round closed) within --join-timeout."""
        try:
            async with asyncio.timeout(self.opts.join_timeout):
                await self._collect_round()
        except TimeoutError:
            raise JoinTimeout(self.members.join_timeout_message(self.opts.join_timeout)) from None

    def _end_finished(self) -> None:
        """A finished run resumed (a rescheduled master, or a user who lost the output): nothing to run again,
        but its outputs are written as at its end — x^T to --out, the plot from its log, which ends where the
        run ended — so resuming is how a lost --out comes back. --save-iterates has nothing to write: the
        iterates were never in the checkpoint."""
        assert self.finished_before is not None and self.master is not None
        self.state, self.stop_reason = "done", "finished"
        self.stop_message = self.state_detail = f"the run had finished before this restart ({self.finished_before})"
        self.x_final = self.master.x.copy()
        if self.opts.save_iterates is not None:
            log.warning("--save-iterates %s: not written, a finished run's checkpoint keeps no iterates",
                        self.opts.save_iterates)
        self._write_outputs_safely()
        log.info("run %s: %s", self.run_id, self.stop_message)

    async def _rounds(self) -> None:
        """One round: collect, decide whether to stop, send the downlink, then catch up on everything that is not
        on the round's critical path (the master's own O(d) replica update, the log, checkpoints)."""
        assert self.master is not None
        while True:
            if self.opts.save_iterates is not None:
                self._iterates.append(self.master.x.copy())
            self.book.started_at = time.monotonic()
            self.round_start = self.counters()
            if self.rounds_closed == 0 and self.resumed_from is not None:
                await self._first_round_in_time()
            else:
                await self._collect_round()
            self.rounds_closed += 1
            rec, messages, dropped = self._close_round()
            self.latest = rec
            if rec.grad_norm_sq is not None:
                self.last_grad_norm_sq = rec.grad_norm_sq
            ended = stop_check(rec, self.x_finite, self.cfg)
            if ended is not None:
                self._log_round(rec)
                self._end(*ended)
                return
            down = self.master.fold(messages)
            self.ledger.record_down(rec.round, down)
            self._broadcast(down, rec, dropped)
            self._unapplied = down
            self.round += 1
            self._pending_log = rec
            await asyncio.sleep(0)  # let the stream writers hand the result to gRPC before the O(d) work below
            self.settle()
            self._pending_log = None
            self._log_round(rec)
            if self.round % self.opts.checkpoint_every == 0:
                self._checkpoint_safely()

    def _close_round(self) -> tuple[RoundRecord, list, list[int]]:
        """Close the round: its log line, its messages in rank order, the sampled ranks that did not deliver."""
        assert self.master is not None
        t = self.round
        closed = self.book.close(t, self.sessions)
        self.wire_up += sum(closed.up_bytes)
        self.eval_bytes += closed.eval_bytes
        if closed.sizes is None:
            self.ledger.record(t, closed.messages)
        else:
            assert self.d is not None
            self.ledger.record_sizes(t, closed.sizes, self.d)
        evals = closed.evals
        dist = None
        if evals is not None and all(e.distortion is not None for e in evals):
            dist = [e.distortion for e in evals]
        grads, grads_of = None if evals is None else [e.grad for e in evals], None
        tree = self.book.tree
        if tree is not None and grads is not None and all(g is not None for g in grads):
            grads, grads_of = tree.grad_sums(grads), self.n  # type: ignore[arg-type]  # summed as the tree sums
        rec = make_record(
            t, None if evals is None else [e.f for e in evals], dist,  # type: ignore[misc]
            grads, self.ledger,
            time.time() - (self.rounds_started_at or self.started_at), wire_bytes_up=self.wire_up,
            wire_bytes_down=self.wire_down, uplink_msg_bytes=sum(closed.up_bytes) / max(len(closed.up_bytes), 1),
            eval_bytes=self.eval_bytes, g_norm_sq=self.g_norm, missing=closed.missing or None,
            prox_at=None if self.prox is None else (self.prox, self.master.x, self.master.replica.x_step),
            metrics=None if evals is None else [e.metrics for e in evals], grads_of=grads_of,
        )
        self._carriers = closed.carriers
        return rec, closed.messages, closed.dropped

    def _broadcast(self, down: Downlink, rec: RoundRecord, dropped: list[int]) -> None:
        # The checksum is of the state this round started from, which the workers still hold when it arrives.
        # The aggregate goes out in the run's dtype even with the compact encoding: it is a sum of the workers'
        # rounded values, and every replica must add exactly the same bits.
        agg = encode(down.vector, packed=self.cfg.encoding == "compact")
        # Only the sampled ranks that were left out travel: everyone draws the sample itself.
        buffers = None if down.buffers is None else encode(down.buffers)
        raw = round_result_to_bytes(rec.round, agg, down.mode == "replace", down.scale, self.checksum, dropped,
                                    buffers)
        # Through aggregators, a block's result goes on the stream its sum came on, and the aggregator relays it to
        # the other ranks it covered (unless that stream has gone: then to each of them).
        relayed: set[int] = set()
        for carrier, ranks in (self._carriers or {}).items():
            s = self.sessions.get(carrier)
            if s is not None and s.state is StreamState.RUNNING:
                relayed.update(r for r in ranks if r != carrier)
        for s in self.sessions.values():
            if s.state is StreamState.RUNNING and s.rank not in relayed:
                s.send(raw)
                self.wire_down += len(raw) + GRPC_FRAME_BYTES

    def settle(self) -> None:
        """Apply the downlink already sent to the master's own replica. Idempotent: anything that reads the
        replica (a Start for a new worker, a Resync, a checkpoint) calls it first."""
        if self._unapplied is None:
            return
        assert self.master is not None
        down, self._unapplied = self._unapplied, None
        self.master.apply(down)
        self.state_facts()

    def state_facts(self) -> None:
        """What the coming round needs to know about the replica, computed once it is up to date."""
        assert self.master is not None
        self.x_finite = bool(np.isfinite(self.master.x).all())
        self.g_norm = g_norm_sq(self.master)
        rep = self.master.shared  # the checksum is of what the workers hold
        self.checksum = (state_checksum(*rep.state_arrays()) if self.master.round % self.opts.checksum_every == 0
                         else b"")

    def _log_round(self, rec: RoundRecord) -> None:
        self.writer.write(rec.to_dict())
        if self.on_round is not None:
            self.on_round(rec)
        stale = self.book.staleness()
        if stale is None:
            if self.state == "running" and self.latest is not None:
                self.state_detail = ""
            return
        self.state_detail, longest = stale
        if longest in (10, 100, 1000):
            log.warning("%s", self.state_detail)

    def _checkpoint_safely(self) -> None:
        try:
            self.save_checkpoint()
        except OSError as exc:
            log.error("checkpoint %s not written: %s", self.opts.checkpoint, exc)

    # -- the end ---------------------------------------------------------------------------------------------------

    def _end(self, reason: str, message: str) -> None:
        failed = reason in ("failed", "diverged", "join-timeout")
        self.state = "failed" if failed else "stopped" if reason == "stopped" else "done"
        self.stop_reason, self.stop_message = reason, message
        self.state_detail = message
        if self._pending_log is not None:  # stopped between a round's close and its log line: write it now
            rec, self._pending_log = self._pending_log, None
            self._log_round(rec)
        if self.master is not None:
            self.settle()
            self.x_final = self.master.x.copy()
        if self.master is not None and reason not in ("failed", "join-timeout"):
            try:
                self.save_checkpoint(ended=(reason, message))
            except OSError as exc:
                log.error("final checkpoint not written: %s", exc)
        raw = self._stop_message()
        for s in list(self.members.live):
            if s.rank is not None:  # a stream not yet joined expects a Welcome: its end alone says it all
                s.send(raw)
            self.end_stream(s, StreamState.FINISHED, f"the run ended ({reason}: {message})")
        self._write_outputs_safely()
        log.info("run %s: %s", self.state, message)

    def _write_outputs_safely(self) -> None:
        try:
            self._write_outputs()
        except (UserError, OSError) as exc:
            # The run's result is still in memory and in the status; say loudly that a file is missing.
            log.error("could not write the run's outputs: %s", exc)
            self.state_detail = f"{self.stop_message}; outputs not written: {exc}"

    def _stop_message(self) -> bytes:
        failed = self.state == "failed"
        return pb.MasterMessage(stop=pb.Stop(reason=f"{self.stop_reason}: {self.stop_message}", failed=failed)
                                ).SerializeToString()

    def _write_outputs(self) -> None:
        o = self.opts
        if self.x_final is not None and o.out is not None:
            np.save(ensure_parent(o.out, "--out"), self.x_final)
        if o.save_iterates is not None and self._iterates:
            np.save(ensure_parent(o.save_iterates, "--save-iterates"), np.array(self._iterates))
        if o.plot is not None and o.log is not None and (self.latest is not None or self.writer.offset > 0):
            from ef21.cli.plotting import plot_logs

            self.writer.close()
            plot_logs([o.log], o.plot, y_axis="gradmap" if self.cfg.prox else "grad")
