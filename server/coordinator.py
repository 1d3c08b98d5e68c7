"""The master's round engine: ranks, set-up, synchronous rounds, logging. Transport-independent.

Every method is driven the same way (``ef21.engine.MasterNode``), so nothing here knows EF21 from GD. All
methods run on the event loop thread, so the state needs no locks; the gRPC service and the status endpoint only
call into this object.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ef21.accounting import CommLedger, sends_selector
from ef21.codec import CodecError, EncodedVector, decode, encode
from ef21.compressors import max_entries
from ef21.config import RunConfig, make_x0
from ef21.data import data_info, shard_bounds
from ef21.estimators import batch_size_for
from ef21.engine import MasterNode, participants
from ef21.errors import UserError
from ef21.methods import Downlink, Message, make_method
from ef21.plan import Plan, make_plan, resolve_downlink, resolve_method
from ef21.problem import (
    global_power_iteration, global_smoothness_from_diagonals, global_smoothness_from_grams, quadratic_fingerprint,
    smoothness_from_lambda, sum_in_rank_order,
)
from ef21.prox import parse_prox
from ef21.runlog import JsonlWriter, ensure_parent
from ef21.simulate import RoundRecord, g_norm_sq, make_record, stop_check
from ef21.sparse import SparseVector
from ef21.stepsize import TheoryConstants
from ef21.variants import variant_name
from ef21_wire.protocol import GRPC_FRAME_BYTES, is_eval_round
from ef21_wire.fastwire import UpdateIn
from ef21_wire.serde import dense_to_proto, encoded_from_proto, round_result_to_bytes, state_checksum
from ef21_wire.v1 import ef21_pb2 as pb

from . import checkpoint
from .bans import Bans, peer_host
from .session import EvalInfo, Refusal, SetupInfo, WorkerSession

# --master-rows: how the master keeps every worker's g_i (for hand-over and checkpoints).
MASTER_ROWS = {"full": np.float64, "float32": np.float32, "none": None}

log = logging.getLogger("ef21.master")


@dataclass(frozen=True)
class MasterOptions:
    config: RunConfig
    eval_every: int = 1
    """Exact ‖∇f‖² every this many rounds (workers send dense local gradients; counted apart)."""
    checksum_every: int = 10
    """Send a digest of (x, g) every this many rounds so that a worker out of sync resynchronizes."""
    log: Path | None = None
    out: Path | None = None
    plot: Path | None = None
    save_iterates: Path | None = None
    """Write x^t of every round to this .npy (for checking a run against the simulator)."""
    round_timeout: float | None = None
    """Close a round without the workers that have not delivered after this many seconds (EF21-PP)."""
    min_workers: int | None = None
    """Never close a round with fewer contributions than this (default: 1 with a timeout, else n)."""
    checkpoint: Path | None = None
    """Write a checkpoint here every ``checkpoint_every`` rounds and when the run ends."""
    checkpoint_every: int = 100
    resume: Path | None = None
    """Continue the run saved in this checkpoint (or its ``.prev`` if it is corrupt)."""
    max_faults: int = 3
    """Refused messages from one client (its certificate under mutual TLS, else its host) before it may no longer
    join."""
    master_rows: str = "full"
    """How the master keeps every worker's g_i (n × d): ``full`` (float64: exact hand-over and checkpoints),
    ``float32`` (half the memory; a replacement worker or a resumed run gets g_i rounded to float32, so it
    continues close to, not exactly on, the uninterrupted run) or ``none`` (no rows: a lost worker's rank cannot
    be handed over and there are no checkpoints)."""
    join_timeout: float | None = 600.0
    """Fail the run (``join-timeout``) when the workers have not all come this many seconds after the start (a
    resumed run: when no round has closed by then). None waits for ever."""
    require_data: bool = False
    """The master must load the data itself (``ef21 run``: its workers read the same files)."""
    effective_config: dict | None = None
    """Every option of the command that started the master, as it took effect (defaults, config file, command
    line; secrets redacted): shown in the status and kept in the checkpoint."""


# Stop reasons after which a run is over for good: resuming its final checkpoint with the same stopping rule has
# nothing left to do. A run stopped by a signal ("stopped") goes on when resumed.
FINISHED_REASONS = ("rounds", "tol")


class Coordinator:
    def __init__(self, opts: MasterOptions, *, on_round: Callable[[RoundRecord], None] | None = None) -> None:
        if opts.eval_every < 1 or opts.checksum_every < 1 or opts.checkpoint_every < 1:
            raise UserError("--eval-every, --checksum-every and --checkpoint-every must be >= 1")
        if opts.round_timeout is not None and not opts.round_timeout > 0:
            raise UserError(f"--round-timeout must be positive, got {opts.round_timeout}")
        if opts.join_timeout is not None and not opts.join_timeout > 0:
            raise UserError(f"--join-timeout must be positive, got {opts.join_timeout:g}")
        self.opts = opts
        self.cfg = opts.config
        self.n = self.cfg.workers
        if opts.min_workers is not None and not 1 <= opts.min_workers <= self.n:
            raise UserError(f"--min-workers must lie in 1..{self.n}, got {opts.min_workers}")
        if opts.master_rows not in MASTER_ROWS:
            raise UserError(f"--master-rows must be one of {', '.join(MASTER_ROWS)}, got {opts.master_rows!r}")
        if opts.master_rows == "none" and (opts.checkpoint is not None or opts.resume is not None):
            raise UserError("--master-rows none keeps no g_i, which a checkpoint needs: drop --checkpoint/--resume "
                            "or keep rows (full or float32)")
        self.prox = None if self.cfg.prox is None else parse_prox(self.cfg.prox)
        self.rows_dtype = MASTER_ROWS[opts.master_rows]
        if self.rows_dtype is None and self.cfg.method == "ef21plus":
            raise UserError("ef21plus needs every g_i on the master (a worker may replace its g_i): "
                            "--master-rows none is not possible")
        self.on_round = on_round
        self.run_id = uuid.uuid4().hex[:12]
        self.state = "waiting"
        self.state_detail = f"waiting for {self.n} workers"
        self.sessions: dict[int, WorkerSession] = {}
        self.reference: tuple[str, int, int] | None = None
        """(data fingerprint, d, rows) of the run's data."""
        self.objective_id: str | None = None
        """A user objective's identity, as the first worker presented it."""
        self.d: int | None = None
        self.plan: Plan | None = None
        self.power: tuple[int, dict[int, np.ndarray]] | None = None
        """The power iteration for L in progress: (iteration, rank → A_iᵀA_i v received)."""
        self.ready = asyncio.Event()
        self.wake = asyncio.Event()  # anything that may let the current round close
        self.round = 0
        self.updates: dict[int, tuple[Message, int]] = {}
        self.evals: dict[int, EvalInfo] = {}
        self.missing_in: dict[int, list[int]] = {}  # round → ranks left out (for late messages and the log)
        self.missed_streak: dict[int, int] = {}  # rank → consecutive rounds left out
        self.bans = Bans(opts.max_faults)
        self.done = asyncio.Event()
        self.master: MasterNode | None = None
        self.constants: TheoryConstants | None = None
        self.ledger = CommLedger(self.n, selector=sends_selector(make_method(self.cfg.method)))
        self.latest: RoundRecord | None = None
        self.last_grad_norm_sq: float | None = None
        self.stop_reason = ""
        self.stop_message = ""
        self.wire_up = self.wire_down = self.eval_bytes = 0
        self.late_messages = 0
        self.refused: dict[str, int] = {}  # gRPC status code → streams ended by a refusal
        self.endpoints: dict[str, str] = {}  # filled in by the master once it listens: where to reach it
        self.started_at = time.time()
        self.rounds_started_at: float | None = None
        self.round_started_at = time.monotonic()
        self.resumed_from: str | None = None
        self.x_final: np.ndarray | None = None
        # The master's replica is brought up to date after each round's downlink has gone out (``_settle``);
        # what the next round needs from it is computed there, off the round's critical path.
        self._unapplied: Downlink | None = None
        self.x_finite = True
        self.g_norm: float | None = None
        self.checksum = b""
        self.max_entries = 0  # the most entries the compressor puts in a message (set with the method)
        self.g0_ranks: set[int] = set()  # ranks whose next Update may be the uncompressed g_i⁰ (d entries)
        self._iterates: list[np.ndarray] = []
        self._L_i: list[float] | None = None
        self._n_samples: list[int | None] = [None] * self.n
        self._round_start: dict | None = None  # the counters as the round in progress began (see save_checkpoint)
        self._pending_log: RoundRecord | None = None  # a closed round not yet logged (its log line is off the path)
        self.finished_before: str | None = None  # the stop message of a finished run this master resumed
        self.rounds_closed = 0  # by this process (a resumed run's workers have come once one closes)
        log_offset: int | None = None
        if opts.resume is not None:
            log_offset = self._resume(opts.resume)
        else:
            self.reference = self._reference_data()
            self.d = None if self.reference is None or not self.reference[1] else self.reference[1]
            if self.d is not None:
                # Everything that d decides is checked now, not when the workers have come (exit 2 at once).
                resolve_method(self.cfg, self.d)
                resolve_downlink(self.cfg, self.d)
                make_x0(self.cfg.x0, self.d)
        self._check_batches()
        self._writer = JsonlWriter(opts.log, offset=log_offset)
        method = make_method(self.cfg.method)
        self.tolerates_missing = method.tolerates_missing
        if opts.round_timeout is not None and not method.tolerates_missing:
            log.warning("%s cannot close a round without every worker: --round-timeout is ignored and rounds "
                        "wait for all workers", self.cfg.method)
        self.min_workers = (opts.min_workers if opts.min_workers is not None
                            else 1 if opts.round_timeout is not None else self.n)
        if not method.tolerates_missing:
            self.min_workers = self.n


    # -- data reference -------------------------------------------------------------------------------------------

    def _reference_data(self) -> tuple[str, int, int] | None:
        """(fingerprint, d, rows) of the data if the master can read it (one pass over a file, no rows kept);
        None when only the workers have it. For a user objective d is the objective's, which the first worker
        reports (0 here)."""
        cfg = self.cfg
        if cfg.objective is None and cfg.problem == "quadratic":
            return quadratic_fingerprint(cfg), cfg.dim, 0
        if cfg.data is None:
            return "no-data", 0, 0
        try:
            info = data_info(cfg.data, problem=cfg.problem)
        except UserError as exc:
            # A file that is not here is the workers' business; one that is here but unreadable is a mistake.
            if self.opts.require_data or Path(cfg.data).exists():
                raise
            log.info("master has no copy of the data (%s); the first worker's fingerprint is the reference", exc)
            return None
        if info.n_rows < self.n:
            raise UserError(f"{info.n_rows} rows cannot be split over {self.n} workers")
        return info.fingerprint, (0 if cfg.objective is not None else info.d), info.n_rows

    def _check_batches(self) -> None:
        """A minibatch larger than some shard is a usage error the master can see before any worker comes (for
        the built-in objectives, whose shard sizes follow from the data's rows)."""
        cfg = self.cfg
        if cfg.estimator == "full" or cfg.objective is not None or self.reference is None or not self.reference[2]:
            return
        for rank, (start, stop) in enumerate(shard_bounds(self.reference[2], self.n)):
            batch_size_for(stop - start, cfg.batch_size, cfg.batch_fraction, rank)

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def _resume(self, path: Path) -> int | None:
        ckpt, used, warning = checkpoint.load_latest(path)
        if warning:
            log.warning("%s", warning)
        meta = ckpt.meta
        saved = RunConfig.from_dict(meta["config"])
        # Only the stopping rule may change on resume; anything else would make a different run.
        differ = [k for k, v in saved.to_dict().items()
                  if k not in ("rounds", "tol") and v != self.cfg.to_dict()[k]]
        if differ:
            raise UserError(f"checkpoint {used} is of a different run: {', '.join(sorted(differ))} differ "
                            f"(checkpoint: {', '.join(f'{k}={saved.to_dict()[k]!r}' for k in sorted(differ))})")
        self.run_id = meta["run_id"]
        self.reference = tuple(meta["reference"])  # type: ignore[assignment]
        self.d = int(meta["d"]) if "d" in meta else int(meta["reference"][1])
        self.objective_id = meta.get("objective_id")
        self.constants = TheoryConstants(**meta["constants"])
        p = meta.get("plan", {})
        L_i = p.get("L_i")
        self.plan = make_plan(self.cfg, self.d, self.constants.L, L_i, p.get("n_samples", [None] * self.n),
                              constants=self.constants)
        self.max_entries = max_entries(self.plan.compressor, self.d)
        self.master = self.plan.master_node(ckpt.x, self.rows_dtype)
        self.master.replica.g[:] = ckpt.g
        if "v" in ckpt.extra:
            self.master.replica.v = ckpt.extra["v"].copy()
        if self.master.downlink is not None:
            if "g_tilde" not in ckpt.extra:
                raise UserError(f"checkpoint {used}: EF21-BC state (g_tilde) missing")
            self.master.downlink.g_tilde[:] = ckpt.extra["g_tilde"]
        if ckpt.rows is not None:
            if self.master.rows is None or self.master.rows.shape != ckpt.rows.shape:
                raise UserError(f"checkpoint {used}: per-worker state of shape {ckpt.rows.shape} does not fit")
            self.master.rows[:] = ckpt.rows
        self.round = self.master.round = int(meta["round"])
        self._state_facts()
        self.ledger.paper_total = int(meta["ledger"]["paper_total"])
        self.ledger.payload_total = int(meta["ledger"]["payload_total"])
        self.ledger.down_total = int(meta["ledger"].get("down_total", 0))
        self._L_i = p.get("L_i")
        self._n_samples = p.get("n_samples", [None] * self.n)
        self.wire_up, self.wire_down, self.eval_bytes = (int(v) for v in meta["wire"])
        self.last_grad_norm_sq = meta.get("last_grad_norm_sq")
        self.state = "running"
        self.resumed_from = f"{used} (round {self.round})"
        self.state_detail = f"resumed from {self.resumed_from}; waiting for workers"
        ended = meta.get("ended")
        if ended and ended["reason"] in FINISHED_REASONS and (saved.rounds, saved.tol) == (self.cfg.rounds,
                                                                                          self.cfg.tol):
            # Finished before a restart (e.g. a rescheduled pod): nothing to run again, and no worker to wait for;
            # its log keeps its last round (which an extended run would redo, hence the two offsets).
            self.finished_before = ended["message"]
            self.rounds_started_at = time.time()
            return meta.get("log_end", meta.get("log_offset"))
        self.rounds_started_at = time.time()
        log.info("resumed run %s at round %d from %s", self.run_id, self.round, used)
        return meta.get("log_offset")

    def save_checkpoint(self, ended: tuple[str, str] | None = None) -> None:
        if self.opts.checkpoint is None or self.master is None or self.constants is None:
            return
        self._settle()
        self._writer.flush()
        plan_facts = {"L_i": self._L_i, "n_samples": self._n_samples}
        # The state saved is x at ``self.round``. If that round was already counted and logged (the final round
        # of a run: it ends before its downlink), save the counters and the log offset from before it, so that a
        # resumed (extended) run redoes the round once instead of counting and logging it twice.
        counts = self._counters()
        if self._round_start is not None and self._round_start["round"] == self.round:
            counts = self._round_start
        meta = {
            "config": self.cfg.to_dict(), "run_id": self.run_id, "round": self.round,
            "reference": list(self.reference or ()), "constants": self.constants.__dict__, "d": self.d,
            "objective_id": self.objective_id, "plan": plan_facts,
            "ledger": {k: counts[k] for k in ("paper_total", "payload_total", "down_total")},
            "wire": counts["wire"], "last_grad_norm_sq": self.last_grad_norm_sq,
            "log_offset": counts["log_offset"], "effective_config": self.opts.effective_config,
        }
        if ended is not None:
            meta["ended"] = {"reason": ended[0], "message": ended[1]}
            meta["log_end"] = self._writer.offset
        rep = self.master.replica
        extra = {} if rep.v is None else {"v": rep.v}
        if self.master.downlink is not None:
            extra["g_tilde"] = self.master.downlink.g_tilde
        checkpoint.save(self.opts.checkpoint, checkpoint.Checkpoint(meta, rep.x, rep.g, self.master.rows, extra))

    def _counters(self) -> dict:
        return {"round": self.round, "paper_total": self.ledger.paper_total,
                "payload_total": self.ledger.payload_total, "down_total": self.ledger.down_total,
                "wire": [self.wire_up, self.wire_down, self.eval_bytes], "log_offset": self._writer.offset}

    # -- joining -------------------------------------------------------------------------------------------------

    def join_reply(self) -> pb.JoinReply:
        ended = f"{self.stop_reason}: {self.stop_message}" if self.state in ("done", "failed", "stopped") else ""
        return pb.JoinReply(run_id=self.run_id, config_json=json.dumps(self.cfg.to_dict()), workers=self.n,
                            ended=ended)

    def free_ranks(self) -> list[int]:
        return [r for r in range(self.n) if r not in self.sessions or self.sessions[r].state == "lost"]

    def hello(self, msg: pb.Hello, peer: str, identity: str | None = None) -> WorkerSession:
        """``identity``: who the stream is charged to (see ``bans``); default its host."""
        self.bans.admit(identity or f"host {peer_host(peer)}", self.free_ranks())
        if msg.run_id != self.run_id:
            # ABORTED, not FAILED_PRECONDITION: a worker that joined before a master restart simply joins again.
            raise Refusal("ABORTED", f"run id {msg.run_id!r} is not this run ({self.run_id}); join again")
        if self.state not in ("waiting", "running"):
            raise Refusal("FAILED_PRECONDITION", f"the run is {self.state}; it takes no new workers")
        if self.reference is None:
            # No data on the master: the first worker's data becomes the reference.
            self.reference = (msg.data_fingerprint, int(msg.dim), int(msg.n_rows))
            if msg.dim:
                self.d = int(msg.dim)
        ref_fp, ref_d, ref_rows = self.reference
        if msg.data_fingerprint != ref_fp or (ref_d and msg.dim and msg.dim != ref_d):
            raise Refusal(
                "FAILED_PRECONDITION",
                f"data mismatch: this worker's data has fingerprint {msg.data_fingerprint} (d={msg.dim}, "
                f"{msg.n_rows} rows) but the run's has {ref_fp} (d={ref_d}, {ref_rows} rows)",
            )
        if self.cfg.objective is not None:
            if self.objective_id is None:
                self.objective_id = msg.objective_id
            elif msg.objective_id != self.objective_id:
                raise Refusal("FAILED_PRECONDITION",
                              f"objective mismatch: this worker presents {msg.objective_id or 'none'}, the run's "
                              f"workers {self.objective_id}")
        free = self.free_ranks()
        rank = msg.requested_rank
        if rank >= 0:
            if rank >= self.n:
                raise Refusal("INVALID_ARGUMENT", f"rank {rank} out of range (workers = {self.n})")
            if rank not in free:
                raise Refusal("ALREADY_EXISTS", f"rank {rank} is taken")
        elif not free:
            raise Refusal("RESOURCE_EXHAUSTED", f"all {self.n} ranks are taken")
        else:
            rank = free[0]
        session = WorkerSession(rank, peer, msg.hostname)
        self.sessions[rank] = session
        log.info("worker %s (%s) joined as rank %d%s", msg.hostname, peer, rank,
                 "" if self.state == "waiting" else f" at round {self.round}")
        return session

    def setup(self, s: WorkerSession, msg: pb.Setup) -> None:
        if s.state != "joining" or msg.rank != s.rank:
            raise Refusal("FAILED_PRECONDITION", f"unexpected Setup for rank {msg.rank} on rank {s.rank}'s stream")
        if msg.dim:
            if self.d is None:
                self.d = int(msg.dim)  # a user objective: the first worker's d is the run's
            elif msg.dim != self.d:
                raise Refusal("FAILED_PRECONDITION", f"dimension mismatch: rank {s.rank}'s objective has "
                                                     f"d = {msg.dim}, the run's d = {self.d}")
        d = self.d
        if d is None:
            raise Refusal("FAILED_PRECONDITION", "Setup without the objective's dimension")
        gram = diag = None
        if msg.gram:
            if len(msg.gram) != 8 * d * d:
                raise Refusal("INVALID_ARGUMENT", f"gram has {len(msg.gram)} bytes, expected {8 * d * d}")
            gram = np.frombuffer(msg.gram, dtype="<f8").reshape(d, d)
        if msg.diagonal:
            if len(msg.diagonal) != 8 * d:
                raise Refusal("INVALID_ARGUMENT", f"diagonal has {len(msg.diagonal)} bytes, expected {8 * d}")
            diag = np.frombuffer(msg.diagonal, dtype="<f8")
        if not (math.isfinite(msg.smoothness) and msg.smoothness >= 0):
            raise Refusal("INVALID_ARGUMENT", f"smoothness {msg.smoothness} is not a non-negative number")
        for arr in (gram, diag):
            if arr is not None and not np.all(np.isfinite(arr)):
                raise Refusal("INVALID_ARGUMENT", "non-finite curvature")
        x0 = self._decode(msg.x0, "Setup x0").values if msg.HasField("x0") else None
        if x0 is not None and x0.shape[0] != d:
            raise Refusal("INVALID_ARGUMENT", f"Setup x0 has {x0.shape[0]} entries, expected {d}")
        s.setup = SetupInfo(msg.smoothness or None, int(msg.shard_rows), gram, diag,
                            int(msg.n_samples) or None, x0, bool(msg.power_iteration))
        s.state = "ready"
        if self.state == "running":
            self._admit(s)  # a replacement (or a worker of a resumed run) starts from the current state
            return
        ready = [r for r, x in self.sessions.items() if x.state == "ready"]
        self.state_detail = f"{len(ready)} of {self.n} workers ready"
        if len(ready) == self.n:
            self.ready.set()

    def lost(self, s: WorkerSession, why: str, *, quiet: bool = False) -> None:
        if self.sessions.get(s.rank) is not s or s.state in ("done", "lost"):
            return
        if self.state == "waiting":
            del self.sessions[s.rank]  # before the start a rank is simply free again
            self.ready.clear()
            self.wake.set()  # a start-up computation waiting on this worker gives up
            log.info("rank %d left before the start (%s)", s.rank, why)
            return
        s.state = "lost"
        # Its contribution to the open round goes too: a replacement recomputes it from the same state.
        self.updates.pop(s.rank, None)
        self.evals.pop(s.rank, None)
        (log.info if quiet else log.warning)("rank %d lost: %s", s.rank, why)
        self.wake.set()

    def refuse(self, code: str) -> None:
        """Count a stream or call ended by a refusal (the status and /metrics show them by code)."""
        self.refused[code] = self.refused.get(code, 0) + 1

    def fault(self, identity: str) -> None:
        """A refused message: charged to its sender (see ``bans`` and --max-faults)."""
        self.bans.charge(identity)

    # -- rounds ----------------------------------------------------------------------------------------------------

    async def _smoothness(self, infos: list[SetupInfo]) -> float | None:
        """L of the whole problem, the way ``ef21.problem.global_smoothness`` computes it in one process: from
        the workers' diagonals or Grams (summed in rank order), from a power iteration whose products the
        workers compute (A_iᵀA_i v, summed in rank order), or for a user objective mean L_i; None without L_i."""
        cfg = self.cfg
        if all(i.diagonal is not None for i in infos):
            return global_smoothness_from_diagonals(sum_in_rank_order([i.diagonal for i in infos]), self.n)  # type: ignore
        if all(i.gram is not None for i in infos):
            grams = sum_in_rank_order([i.gram for i in infos])  # type: ignore[misc]
            if cfg.objective is not None:
                return float(np.linalg.eigvalsh(grams)[-1]) / self.n
            return global_smoothness_from_grams(cfg, grams, sum(i.shard_rows for i in infos))
        if cfg.objective is None and all(i.power_iteration for i in infos):
            return smoothness_from_lambda(cfg, await self._power_iteration(), sum(i.shard_rows for i in infos))
        if any(i.smoothness is None for i in infos):
            return None
        return sum(i.smoothness for i in infos) / self.n  # type: ignore[misc]

    async def _power_iteration(self) -> float:
        """λ_max(Σ_i A_iᵀA_i) with the workers computing the products. A worker lost meanwhile restarts it once
        all n are back (the state goes back to waiting)."""
        assert self.d is not None
        pi = global_power_iteration(self.d)
        self.state_detail = f"computing L: power iteration with {self.n} workers"
        while not pi.done:
            replies: dict[int, np.ndarray] = {}
            self.power = (pi.iterations, replies)
            raw = pb.MasterMessage(power_step=pb.PowerStep(iteration=pi.iterations, v=dense_to_proto(pi.vector)))
            data = raw.SerializeToString()
            for r in range(self.n):
                self.sessions[r].send(data)
            while len(replies) < self.n:
                if not self.ready.is_set():
                    raise _SetupInterrupted
                self.wake.clear()
                await self.wake.wait()
            pi.feed(sum_in_rank_order([replies[r] for r in range(self.n)]))
        self.power = None
        log.info("L: power iteration converged to %.12g in %d products", pi.value, pi.iterations)
        return pi.value

    def leave(self, s: WorkerSession, msg: pb.Leave) -> None:
        """A worker that cannot go on (its objective failed) says why; the rank is then lost as usual."""
        reason = msg.reason[:500]
        s.last_error = reason
        # ``worker_left``: `ef21 run` reports this itself, as its one error line.
        log.warning("worker left the run: %s", reason, extra={"worker_left": True})
        self.lost(s, f"left: {reason}", quiet=True)

    def power_reply(self, s: WorkerSession, msg: pb.PowerReply) -> None:
        if self.power is None or s.state != "ready" or msg.iteration != self.power[0] or s.rank in self.power[1]:
            raise Refusal("FAILED_PRECONDITION", f"unexpected PowerReply {msg.iteration} from rank {s.rank}")
        w = self._decode(msg.w, f"PowerReply {msg.iteration}")
        if not w.is_dense:
            raise Refusal("INVALID_ARGUMENT", "PowerReply: the product must be dense")
        self.power[1][s.rank] = np.array(w.values)
        self.wake.set()

    async def _start(self) -> None:
        """All n workers are set up: compute the constants from their curvature and start round 0."""
        cfg, d = self.cfg, self.d
        assert d is not None and self.reference is not None
        infos: list[SetupInfo] = [self.sessions[r].setup for r in range(self.n)]  # type: ignore[misc]
        L = await self._smoothness(infos)
        L_vals = [i.smoothness for i in infos]
        self._L_i = None if any(v is None for v in L_vals) else [float(v) for v in L_vals]  # type: ignore[arg-type]
        self._n_samples = [i.n_samples for i in infos]
        self.plan = make_plan(cfg, d, L, self._L_i, self._n_samples)
        self.constants = self.plan.constants
        self.max_entries = max_entries(self.plan.compressor, d)
        self.master = self.plan.master_node(make_x0(cfg.x0, d, infos[0].x0), self.rows_dtype)
        self._state_facts()
        self.state = "running"
        self.state_detail = ""
        self.rounds_started_at = time.time()
        log.info("start: %s", self.constants.describe())
        for s in self.sessions.values():
            self._admit(s)

    def _admit(self, s: WorkerSession) -> None:
        """Send a worker the state to start from: x, g (and v) and its rank's g_i at the current round."""
        assert self.master is not None and self.constants is not None and self.plan is not None
        self._settle()
        rep = self.master.replica
        state = self.master.worker_state(s.rank)
        # A worker the master holds no g_i for starts with round 0's step: under --init full, its dense ∇f_i.
        if state is None and self.master.rows is not None and self.cfg.init == "full":
            self.g0_ranks.add(s.rank)
        else:
            self.g0_ranks.discard(s.rank)
        start = pb.Start(
            gamma=self.constants.gamma, x_step=rep.x_step, x=dense_to_proto(rep.x), g=dense_to_proto(rep.g),
            constants_json=json.dumps(self.constants.__dict__), checksum_every=self.opts.checksum_every,
            eval_every=self.opts.eval_every, round=self.round, page_p=self.plan.page_p,
            weight=0.0 if self.plan.weights is None else float(self.plan.weights[s.rank]),
        )
        if rep.v is not None:
            start.momentum.CopyFrom(dense_to_proto(rep.v))
        if state is not None:
            start.worker_state.CopyFrom(dense_to_proto(state))
        elif self.round > 0 and self.master.rows is None and self.tolerates_missing:
            log.warning("rank %d: --master-rows none keeps no g_i, so the replacement starts from g_i = 0 and the "
                        "aggregate no longer equals the mean of the workers' g_i", s.rank)
        s.state = "running"
        s.send(pb.MasterMessage(start=start).SerializeToString())
        self.wake.set()

    def is_eval_round(self, t: int) -> bool:
        return is_eval_round(t, self.opts.eval_every, self.cfg.rounds)

    def _check_stream_round(self, s: WorkerSession, round_: int, what: str) -> bool:
        """Whether a message about a round counts; False for a straggler's message of a round closed without it."""
        if self.state != "running" or s.state != "running":
            raise Refusal("FAILED_PRECONDITION", f"{what} while the run is {self.state} and the worker {s.state}")
        if round_ < self.round and (s.rank in self.missing_in.get(round_, ())
                                    or (what == "Eval" and round_ == self.round - 1)):
            # A straggler's message of a round that closed without it (or closed on the timeout before its
            # evaluation arrived): expected with --round-timeout, counted, and dropped.
            self.late_messages += 1
            s.late += 1
            return False
        if round_ != self.round:
            raise Refusal("FAILED_PRECONDITION", f"{what} for round {round_}, but the current round is {self.round}")
        return True

    def _decode(self, vec: pb.SparseVector | EncodedVector, what: str, max_nnz: int | None = None) -> SparseVector:
        assert self.d is not None
        try:
            enc = vec if isinstance(vec, EncodedVector) else encoded_from_proto(vec)
            return decode(enc, expected_dim=self.d, max_nnz=max_nnz)
        except CodecError as exc:
            raise Refusal("INVALID_ARGUMENT", f"{what}: {exc}") from None

    def update(self, s: WorkerSession, msg: UpdateIn, nbytes: int) -> None:
        if not self._check_stream_round(s, msg.round, "Update"):
            return
        if s.rank in self.updates:
            raise Refusal("FAILED_PRECONDITION", f"second Update from rank {s.rank} for round {msg.round}")
        if not self._sampled(s.rank):
            raise Refusal("FAILED_PRECONDITION", f"Update from rank {s.rank}, which round {msg.round}'s sampled "
                                                 f"participation leaves out")
        vec = self._decode(msg.vector, f"Update round {msg.round}",
                           max_nnz=self.d if s.rank in self.g0_ranks else self.max_entries)
        self.updates[s.rank] = (Message(vec, msg.replace), nbytes)
        self.wake.set()

    def eval(self, s: WorkerSession, msg: pb.Eval, nbytes: int) -> None:
        if not self._check_stream_round(s, msg.round, "Eval"):
            return
        if (not self.is_eval_round(msg.round) or s.rank in self.evals
                or (s.rank not in self.updates and self._sampled(s.rank))):
            raise Refusal("FAILED_PRECONDITION", f"unexpected Eval from rank {s.rank} for round {msg.round}")
        grad = self._decode(msg.grad, f"Eval round {msg.round}")
        if not grad.is_dense:
            raise Refusal("INVALID_ARGUMENT", f"Eval round {msg.round}: the gradient must be dense")
        dist = msg.distortion if msg.HasField("distortion") else None
        values = [msg.f, *msg.metrics.values()] + ([] if dist is None else [dist])
        if not all(math.isfinite(v) for v in values):
            raise Refusal("INVALID_ARGUMENT", f"Eval round {msg.round}: non-finite f, distortion or metric")
        self.evals[s.rank] = EvalInfo(grad.values, msg.f, dist, dict(msg.metrics) or None, nbytes)
        self.wake.set()

    def resync(self, s: WorkerSession, msg: pb.ResyncRequest) -> None:
        if not self._check_stream_round(s, msg.round, "ResyncRequest"):
            return
        assert self.master is not None
        self._settle()
        rep = self.master.replica
        log.warning("rank %d is out of sync at round %d: sending the dense state", s.rank, msg.round)
        resync = pb.Resync(round=msg.round, x=dense_to_proto(rep.x), g=dense_to_proto(rep.g))
        if rep.v is not None:
            resync.momentum.CopyFrom(dense_to_proto(rep.v))
        s.send(pb.MasterMessage(resync=resync).SerializeToString())

    def _sampled(self, rank: int, round_: int | None = None) -> bool:
        """Whether sampled participation (EF21-PP) asks ``rank`` for an Update this round."""
        chosen = self._chosen(self.round if round_ is None else round_)
        return chosen is None or rank in chosen

    def _chosen(self, round_: int) -> frozenset[int] | None:
        plan = self.plan
        return None if plan is None else participants(self.cfg.seed, round_, self.n, plan.participation)

    def _expected(self) -> list[int]:
        chosen = self._chosen(self.round)
        return list(range(self.n)) if chosen is None else sorted(chosen)

    def _evals_in(self) -> bool:
        """Every delivered Update of an evaluation round has its Eval too (a partial round logs no ‖∇f‖²,
        but closing before a connected worker's Eval arrives would turn it into a late message)."""
        return not self.is_eval_round(self.round) or all(r in self.evals for r in self.updates)

    def _round_complete(self) -> bool:
        expected = self._expected()
        return (all(r in self.updates for r in expected)
                and (not self.is_eval_round(self.round) or len(self.evals) == self.n))

    def _may_close_partially(self) -> bool:
        if not self.tolerates_missing or self.opts.round_timeout is None:
            return False
        expected = self._expected()
        connected_missing = [r for r in expected if r not in self.updates and r in self.sessions
                             and self.sessions[r].state == "running"]
        # No point waiting out the timeout for ranks with no worker at all: they cannot deliver.
        timed_out = time.monotonic() - self.round_started_at >= self.opts.round_timeout
        if not timed_out and connected_missing:
            return False
        if len(self.updates) >= min(self.min_workers, len(expected)) and (timed_out or self._evals_in()):
            return True
        # Only --min-workers is worth a word; enough contributions with an Eval still on its way is a healthy round.
        if timed_out:
            self.state_detail = (f"round {self.round}: {len(self.updates)} of {len(expected)} contributions after "
                                 f"the {self.opts.round_timeout:g} s timeout; waiting for at least "
                                 f"{min(self.min_workers, len(expected))} (--min-workers)")
        elif len(self.updates) < min(self.min_workers, len(expected)):
            self.state_detail = (f"round {self.round}: {len(self.updates)} of {len(expected)} contributions, the "
                                 f"other ranks have no worker; waiting for at least "
                                 f"{min(self.min_workers, len(expected))} (--min-workers)")
        return False

    async def _collect_round(self) -> None:
        """Until the round may close: all updates (and evals) in, or the timeout passed with enough of them."""
        while not (self._round_complete() or self._may_close_partially()):
            timeout = None
            if self.opts.round_timeout is not None and self.tolerates_missing:
                timeout = max(0.0, self.opts.round_timeout - (time.monotonic() - self.round_started_at)) + 0.001
                if timeout <= 0.001:
                    timeout = 0.25  # past the deadline but below --min-workers: re-check as workers come back
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def _finish_round(self) -> tuple[RoundRecord, list[Message | None]]:
        assert self.master is not None
        t = self.round
        ranks = range(self.n)
        messages: list[Message | None] = [self.updates[r][0] if r in self.updates else None for r in ranks]
        missing = [r for r in ranks if r not in self.updates]
        dropped = [r for r in self._expected() if r not in self.updates]  # sampled, but not in (stragglers)
        up = [self.updates[r][1] for r in self.updates]
        self.wire_up += sum(up)
        evals = None
        if not dropped and self.is_eval_round(t) and len(self.evals) == self.n:
            evals = [self.evals[r] for r in ranks]
        self.eval_bytes += sum(e.nbytes for e in self.evals.values())
        self.ledger.record(t, messages)
        for r in ranks:
            if r in self.updates:
                self.g0_ranks.discard(r)  # the master now holds its g_i
                self.sessions[r].rounds_done += 1
                self.missed_streak[r] = 0
            else:
                self.missed_streak[r] = self.missed_streak.get(r, 0) + 1
        if dropped:
            self.missing_in[t] = dropped
        dist = None
        if evals is not None and all(e.distortion is not None for e in evals):
            dist = [e.distortion for e in evals]
        rec = make_record(
            t, None if evals is None else [e.f for e in evals], dist,  # type: ignore[misc]
            None if evals is None else [e.grad for e in evals], self.ledger,
            time.time() - (self.rounds_started_at or self.started_at), wire_bytes_up=self.wire_up,
            wire_bytes_down=self.wire_down, uplink_msg_bytes=sum(up) / max(len(up), 1), eval_bytes=self.eval_bytes,
            g_norm_sq=self.g_norm, missing=missing or None,
            prox_at=None if self.prox is None else (self.prox, self.master.x, self.master.replica.x_step),
            metrics=None if evals is None else [e.metrics for e in evals],
        )
        return rec, messages

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
                except _SetupInterrupted:
                    log.warning("a worker left while L was being computed; waiting for %d workers again", self.n)
                    self.power = None
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
            self._writer.close()
            self.done.set()

    async def _wait_for_workers(self) -> None:
        try:
            async with asyncio.timeout(self.opts.join_timeout):
                while not self.ready.is_set():
                    await self.ready.wait()
        except TimeoutError:
            raise JoinTimeout(self._join_timeout_message()) from None

    def _join_timeout_message(self) -> str:
        ready = sorted(r for r, s in self.sessions.items() if s.state in ("ready", "running"))
        missing = [r for r in range(self.n) if r not in ready]
        return (f"{len(ready)} of {self.n} workers came within --join-timeout {self.opts.join_timeout:g} s "
                f"(no worker for rank(s) {', '.join(map(str, missing))}); are the workers started, and can they "
                f"reach this master?")

    async def _first_round_in_time(self) -> None:
        """A resumed run: its workers must be back (the first round closed) within --join-timeout."""
        try:
            async with asyncio.timeout(self.opts.join_timeout):
                await self._collect_round()
        except TimeoutError:
            raise JoinTimeout(self._join_timeout_message()) from None

    def _end_finished(self) -> None:
        assert self.finished_before is not None and self.master is not None
        self.state, self.stop_reason = "done", "finished"
        self.stop_message = self.state_detail = f"the run had finished before this restart ({self.finished_before})"
        self.x_final = self.master.x.copy()
        log.info("run %s: %s", self.run_id, self.stop_message)

    async def _rounds(self) -> None:
        """One round: collect, decide whether to stop, send the downlink, then catch up on everything that is not
        on the round's critical path (the master's own O(d) replica update, the log, checkpoints)."""
        assert self.master is not None
        while True:
            if self.opts.save_iterates is not None:
                self._iterates.append(self.master.x.copy())
            self.round_started_at = time.monotonic()
            self._round_start = self._counters()
            if self.rounds_closed == 0 and self.resumed_from is not None:
                await self._first_round_in_time()
            else:
                await self._collect_round()
            self.rounds_closed += 1
            rec, messages = self._finish_round()
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
            dropped = self.missing_in.get(rec.round, [])
            self.updates.clear()
            self.evals.clear()
            self._broadcast(down, rec, dropped)
            self._unapplied = down
            self.round += 1
            self._pending_log = rec
            await asyncio.sleep(0)  # let the stream writers hand the result to gRPC before the O(d) work below
            self._settle()
            self._pending_log = None
            self._log_round(rec)
            if self.round % self.opts.checkpoint_every == 0:
                await self._checkpoint_safely()

    def _broadcast(self, down: Downlink, rec: RoundRecord, dropped: list[int]) -> None:
        # The checksum is of the state this round started from, which the workers still hold when it arrives.
        # The aggregate goes out in float64 even with the compact encoding: it is a sum of the workers' rounded
        # values, and every replica must add exactly the same bits.
        agg = encode(down.vector, packed=self.cfg.encoding == "compact")
        # Only the sampled ranks that were left out travel: everyone draws the sample itself.
        raw = round_result_to_bytes(rec.round, agg, down.mode == "replace", down.scale, self.checksum, dropped)
        for s in self.sessions.values():
            if s.state == "running":
                s.send(raw)
                self.wire_down += len(raw) + GRPC_FRAME_BYTES

    def _settle(self) -> None:
        """Apply the downlink already sent to the master's own replica. Idempotent: anything that reads the
        replica (a Start for a new worker, a Resync, a checkpoint) calls it first."""
        if self._unapplied is None:
            return
        assert self.master is not None
        down, self._unapplied = self._unapplied, None
        self.master.apply(down)
        self._state_facts()

    def _state_facts(self) -> None:
        """What the coming round needs to know about the replica, computed once it is up to date."""
        assert self.master is not None
        rep = self.master.replica
        self.x_finite = bool(np.isfinite(rep.x).all())
        self.g_norm = g_norm_sq(self.master)
        self.checksum = (state_checksum(rep.x, rep.g, rep.v) if self.master.round % self.opts.checksum_every == 0
                         else b"")

    def _log_round(self, rec: RoundRecord) -> None:
        self._writer.write(rec.to_dict())
        if self.on_round is not None:
            self.on_round(rec)
        self._describe_staleness()

    def _describe_staleness(self) -> None:
        stale = {r: k for r, k in self.missed_streak.items() if k > 0}
        if not stale:
            if self.state == "running" and self.latest is not None:
                self.state_detail = ""
            return
        worst = ", ".join(f"rank {r} ({k} rounds)" for r, k in sorted(stale.items()))
        self.state_detail = (f"left out of recent rounds: {worst}. A rank that does not come back keeps a stale g_i "
                             f"in the mean, and the run then converges to a point that is not stationary for f")
        longest = max(stale.values())
        if longest in (10, 100, 1000):
            log.warning("%s", self.state_detail)

    async def _checkpoint_safely(self) -> None:
        try:
            self.save_checkpoint()
        except OSError as exc:
            log.error("checkpoint %s not written: %s", self.opts.checkpoint, exc)

    def _end(self, reason: str, message: str) -> None:
        failed = reason in ("failed", "diverged", "join-timeout")
        self.state = "failed" if failed else "stopped" if reason == "stopped" else "done"
        self.stop_reason, self.stop_message = reason, message
        self.state_detail = message
        if self._pending_log is not None:  # stopped between a round's close and its log line: write it now
            rec, self._pending_log = self._pending_log, None
            self._log_round(rec)
        if self.master is not None:
            self._settle()
            self.x_final = self.master.x.copy()
        if self.master is not None and reason not in ("failed", "join-timeout"):
            try:
                self.save_checkpoint(ended=(reason, message))
            except OSError as exc:
                log.error("final checkpoint not written: %s", exc)
        raw = pb.MasterMessage(stop=pb.Stop(reason=f"{reason}: {message}", failed=failed)).SerializeToString()
        for s in self.sessions.values():
            if s.state != "lost":
                s.state = "done"
                s.send(raw)
            s.close()
        try:
            self._write_outputs()
        except (UserError, OSError) as exc:
            # The run's result is still in memory and in the status; say loudly that a file is missing.
            log.error("could not write the run's outputs: %s", exc)
            self.state_detail = f"{message}; outputs not written: {exc}"
        log.info("run %s: %s", self.state, message)

    def _write_outputs(self) -> None:
        o = self.opts
        if self.x_final is not None and o.out is not None:
            np.save(ensure_parent(o.out, "--out"), self.x_final)
        if o.save_iterates is not None and self._iterates:
            np.save(ensure_parent(o.save_iterates, "--save-iterates"), np.array(self._iterates))
        if o.plot is not None and o.log is not None and self.latest is not None:
            from ef21.plotting import plot_logs

            self._writer.close()
            plot_logs([o.log], o.plot, y_axis="gradmap" if self.cfg.prox else "grad")

    # -- status ----------------------------------------------------------------------------------------------------

    @property
    def rounds_completed(self) -> int:
        return self.round + (1 if self.state in ("done", "failed") and self.latest is not None else 0)
    def _detail(self) -> str:
        banned = self.bans.note(self.free_ranks()) if self.state in ("waiting", "running") else ""
        return "; ".join(x for x in (self.state_detail, banned) if x)

    def status(self) -> dict:
        cfg, rec, c = self.cfg, self.latest, self.constants
        now = time.time()
        rounds_done = self.rounds_completed
        rate = None
        if self.rounds_started_at is not None and rounds_done:
            rate = rounds_done / max(now - self.rounds_started_at, 1e-9)
        return {
            "run_id": self.run_id,
            "state": self.state,
            "detail": self._detail(),
            "round": self.round,
            "rounds_completed": rounds_done,
            "rounds_planned": cfg.rounds,
            "rounds_per_second": rate,
            "method": cfg.method,
            "variant": variant_name(cfg),
            "compressor": cfg.compressor,
            "k": cfg.k,
            "downlink_k": cfg.downlink_k,
            "estimator": cfg.estimator,
            "participation": None if self.plan is None else self.plan.participation,
            "objective": self.objective_id,
            "gamma": None if c is None else c.gamma,
            "constants": None if c is None else c.__dict__,
            "data": cfg.data,
            "problem": cfg.problem,
            "data_fingerprint": None if self.reference is None else self.reference[0],
            "workers_expected": self.n,
            "workers_connected": sum(1 for s in self.sessions.values() if s.state in ("joining", "ready", "running")),
            "workers": [self.sessions[r].describe() for r in sorted(self.sessions)],
            "round_timeout_s": self.opts.round_timeout,
            "min_workers": self.min_workers,
            "stale_ranks": {str(r): k for r, k in sorted(self.missed_streak.items()) if k > 0},
            "bans": self.bans.describe(),
            "late_messages": self.late_messages,
            "refused_messages": dict(sorted(self.refused.items())),
            "endpoints": self.endpoints,
            "resumed_from": self.resumed_from,
            "effective_config": self.opts.effective_config,
            "latest": None if rec is None else {
                "round": rec.round, "f": rec.f, "grad_norm_sq": rec.grad_norm_sq,
                "last_grad_norm_sq": self.last_grad_norm_sq, "G": rec.G, "bits_per_worker": rec.bits_per_worker,
                "wire_bytes_up": rec.wire_bytes_up, "wire_bytes_down": rec.wire_bytes_down, "missing": rec.missing,
                "bits_down_per_worker": rec.bits_down_per_worker, "grad_map_norm_sq": rec.grad_map_norm_sq,
                "metrics": rec.metrics,
            },
            "g_norm_sq": self.g_norm,
            "stop_reason": self.stop_reason or None,
            "elapsed_s": round(now - self.started_at, 3),
        }


class JoinTimeout(Exception):
    """The workers did not come within --join-timeout."""


class _SetupInterrupted(Exception):
    """A worker left while the start-up computation needed every worker; wait for n workers again."""
