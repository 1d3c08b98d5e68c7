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

from ef21.accounting import CommLedger
from ef21.codec import CodecError, EncodedVector, decode, encode
from ef21.config import RunConfig, make_x0
from ef21.data import fingerprint, load_dataset
from ef21.engine import MasterNode
from ef21.errors import UserError
from ef21.methods import Downlink, Message, make_method
from ef21.problem import (
    global_smoothness_from_diagonals, global_smoothness_from_grams, quadratic_fingerprint, quadratic_mean,
    sum_in_rank_order,
)
from ef21.runlog import JsonlWriter, ensure_parent
from ef21.simulate import RoundRecord, constants_for, g_norm_sq, make_record, resolve_method, stop_check
from ef21.sparse import SparseVector
from ef21.stepsize import TheoryConstants
from ef21_wire.protocol import GRPC_FRAME_BYTES, is_eval_round
from ef21_wire.fastwire import UpdateIn
from ef21_wire.serde import dense_to_proto, encoded_from_proto, round_result_to_bytes, state_checksum
from ef21_wire.v1 import ef21_pb2 as pb

from . import checkpoint
from .session import Refusal, SetupInfo, WorkerSession

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
    """Refused messages from one host before that host may no longer join."""
    effective_config: dict | None = None
    """Every option of the command that started the master, as it took effect (defaults, config file, command
    line; secrets redacted): shown in the status and kept in the checkpoint."""


class Coordinator:
    def __init__(self, opts: MasterOptions, *, on_round: Callable[[RoundRecord], None] | None = None) -> None:
        if opts.eval_every < 1 or opts.checksum_every < 1 or opts.checkpoint_every < 1:
            raise UserError("--eval-every, --checksum-every and --checkpoint-every must be >= 1")
        if opts.round_timeout is not None and not opts.round_timeout > 0:
            raise UserError(f"--round-timeout must be positive, got {opts.round_timeout}")
        self.opts = opts
        self.cfg = opts.config
        self.n = self.cfg.workers
        if opts.min_workers is not None and not 1 <= opts.min_workers <= self.n:
            raise UserError(f"--min-workers must lie in 1..{self.n}, got {opts.min_workers}")
        self.on_round = on_round
        self.run_id = uuid.uuid4().hex[:12]
        self.state = "waiting"
        self.state_detail = f"waiting for {self.n} workers"
        self.sessions: dict[int, WorkerSession] = {}
        self.reference: tuple[str, int, int] | None = None
        self.d: int | None = None
        self.ready = asyncio.Event()
        self.wake = asyncio.Event()  # anything that may let the current round close
        self.round = 0
        self.updates: dict[int, tuple[Message, float, float, int]] = {}
        self.evals: dict[int, tuple[np.ndarray, int]] = {}
        self.missing_in: dict[int, list[int]] = {}  # round → ranks left out (for late messages and the log)
        self.missed_streak: dict[int, int] = {}  # rank → consecutive rounds left out
        self.faults: dict[str, int] = {}  # host → refused messages
        self.done = asyncio.Event()
        self.master: MasterNode | None = None
        self.constants: TheoryConstants | None = None
        self.ledger = CommLedger(self.n)
        self.latest: RoundRecord | None = None
        self.last_grad_norm_sq: float | None = None
        self.stop_reason = ""
        self.stop_message = ""
        self.wire_up = self.wire_down = self.eval_bytes = 0
        self.late_messages = 0
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
        self._iterates: list[np.ndarray] = []
        log_offset: int | None = None
        if opts.resume is not None:
            log_offset = self._resume(opts.resume)
        else:
            self.reference = self._reference_data()
            self.d = None if self.reference is None else self.reference[1]
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
        """(fingerprint, d, rows) of the data if the master can load it; None when only the workers have it."""
        cfg = self.cfg
        if cfg.problem == "quadratic":
            return quadratic_fingerprint(cfg), cfg.dim, 0
        try:
            ds = load_dataset(cfg.data, problem=cfg.problem)
        except UserError as exc:
            log.info("master has no copy of the data (%s); the first worker's fingerprint is the reference", exc)
            return None
        if ds.n_rows < self.n:
            raise UserError(f"{ds.n_rows} rows cannot be split over {self.n} workers")
        return fingerprint(ds.A, ds.y), ds.d, ds.n_rows

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
        self.d = int(meta["reference"][1])
        self.constants = TheoryConstants(**meta["constants"])
        method, _ = resolve_method(self.cfg, self.d)
        self.master = MasterNode(method, self.n, ckpt.x, gamma=self.constants.gamma)
        self.master.replica.g[:] = ckpt.g
        if ckpt.rows is not None:
            if self.master.rows is None or self.master.rows.shape != ckpt.rows.shape:
                raise UserError(f"checkpoint {used}: per-worker state of shape {ckpt.rows.shape} does not fit")
            self.master.rows[:] = ckpt.rows
        self.round = self.master.round = int(meta["round"])
        self._state_facts()
        self.ledger.paper_total = int(meta["ledger"]["paper_total"])
        self.ledger.payload_total = int(meta["ledger"]["payload_total"])
        self.wire_up, self.wire_down, self.eval_bytes = (int(v) for v in meta["wire"])
        self.last_grad_norm_sq = meta.get("last_grad_norm_sq")
        self.state = "running"
        self.resumed_from = f"{used} (round {self.round})"
        self.state_detail = f"resumed from {self.resumed_from}; waiting for workers"
        self.rounds_started_at = time.time()
        log.info("resumed run %s at round %d from %s", self.run_id, self.round, used)
        return meta.get("log_offset")

    def save_checkpoint(self) -> None:
        if self.opts.checkpoint is None or self.master is None or self.constants is None:
            return
        self._settle()
        self._writer.flush()
        meta = {
            "config": self.cfg.to_dict(), "run_id": self.run_id, "round": self.round,
            "reference": list(self.reference or ()), "constants": self.constants.__dict__,
            "ledger": {"paper_total": self.ledger.paper_total, "payload_total": self.ledger.payload_total},
            "wire": [self.wire_up, self.wire_down, self.eval_bytes], "last_grad_norm_sq": self.last_grad_norm_sq,
            "log_offset": self._writer.offset, "effective_config": self.opts.effective_config,
        }
        rep = self.master.replica
        checkpoint.save(self.opts.checkpoint, checkpoint.Checkpoint(meta, rep.x, rep.g, self.master.rows))

    # -- joining -------------------------------------------------------------------------------------------------

    def join_reply(self) -> pb.JoinReply:
        ended = f"{self.stop_reason}: {self.stop_message}" if self.state in ("done", "failed", "stopped") else ""
        return pb.JoinReply(run_id=self.run_id, config_json=json.dumps(self.cfg.to_dict()), workers=self.n,
                            ended=ended)

    def free_ranks(self) -> list[int]:
        return [r for r in range(self.n) if r not in self.sessions or self.sessions[r].state == "lost"]

    def hello(self, msg: pb.Hello, peer: str) -> WorkerSession:
        host = peer_host(peer)
        if self.faults.get(host, 0) >= self.opts.max_faults:
            raise Refusal("PERMISSION_DENIED", f"{host} sent {self.faults[host]} bad messages; it may not rejoin")
        if msg.run_id != self.run_id:
            # ABORTED, not FAILED_PRECONDITION: a worker that joined before a master restart simply joins again.
            raise Refusal("ABORTED", f"run id {msg.run_id!r} is not this run ({self.run_id}); join again")
        if self.state not in ("waiting", "running"):
            raise Refusal("FAILED_PRECONDITION", f"the run is {self.state}; it takes no new workers")
        if self.reference is None:
            # No data on the master: the first worker's data becomes the reference.
            self.reference = (msg.data_fingerprint, int(msg.dim), int(msg.n_rows))
            self.d = int(msg.dim)
        ref_fp, ref_d, ref_rows = self.reference
        if msg.data_fingerprint != ref_fp:
            raise Refusal(
                "FAILED_PRECONDITION",
                f"data mismatch: this worker's data has fingerprint {msg.data_fingerprint} (d={msg.dim}, "
                f"{msg.n_rows} rows) but the run's has {ref_fp} (d={ref_d}, {ref_rows} rows)",
            )
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
        d = self.d
        assert d is not None
        gram = diag = None
        if msg.gram:
            if len(msg.gram) != 8 * d * d:
                raise Refusal("INVALID_ARGUMENT", f"gram has {len(msg.gram)} bytes, expected {8 * d * d}")
            gram = np.frombuffer(msg.gram, dtype="<f8").reshape(d, d)
        if msg.diagonal:
            if len(msg.diagonal) != 8 * d:
                raise Refusal("INVALID_ARGUMENT", f"diagonal has {len(msg.diagonal)} bytes, expected {8 * d}")
            diag = np.frombuffer(msg.diagonal, dtype="<f8")
        if not (math.isfinite(msg.smoothness) and msg.smoothness > 0):
            raise Refusal("INVALID_ARGUMENT", f"smoothness {msg.smoothness} is not a positive number")
        for arr in (gram, diag):
            if arr is not None and not np.all(np.isfinite(arr)):
                raise Refusal("INVALID_ARGUMENT", "non-finite curvature")
        s.setup = SetupInfo(msg.smoothness, int(msg.shard_rows), gram, diag)
        s.state = "ready"
        if self.state == "running":
            self._admit(s)  # a replacement (or a worker of a resumed run) starts from the current state
            return
        ready = [r for r, x in self.sessions.items() if x.state == "ready"]
        self.state_detail = f"{len(ready)} of {self.n} workers ready"
        if len(ready) == self.n:
            self.ready.set()

    def lost(self, s: WorkerSession, why: str) -> None:
        if self.sessions.get(s.rank) is not s or s.state in ("done", "lost"):
            return
        if self.state == "waiting":
            del self.sessions[s.rank]  # before the start a rank is simply free again
            self.ready.clear()
            log.info("rank %d left before the start (%s)", s.rank, why)
            return
        s.state = "lost"
        # Its contribution to the open round goes too: a replacement recomputes it from the same state.
        self.updates.pop(s.rank, None)
        self.evals.pop(s.rank, None)
        log.warning("rank %d lost: %s", s.rank, why)
        self.wake.set()

    def fault(self, peer: str) -> None:
        """A refused message: charged to the sending host (see --max-faults)."""
        host = peer_host(peer)
        self.faults[host] = self.faults.get(host, 0) + 1

    # -- rounds ----------------------------------------------------------------------------------------------------

    def _start(self) -> None:
        """All n workers are set up: compute the constants from their curvature and start round 0."""
        cfg, d = self.cfg, self.d
        assert d is not None and self.reference is not None
        infos = [self.sessions[r].setup for r in range(self.n)]
        L_i = [i.smoothness for i in infos]  # type: ignore[union-attr]
        if all(i.diagonal is not None for i in infos):  # type: ignore[union-attr]
            L = global_smoothness_from_diagonals(sum_in_rank_order([i.diagonal for i in infos]), self.n)  # type: ignore
        elif all(i.gram is not None for i in infos):  # type: ignore[union-attr]
            rows = sum(i.shard_rows for i in infos)  # type: ignore[union-attr]
            L = global_smoothness_from_grams(cfg, sum_in_rank_order([i.gram for i in infos]), rows)  # type: ignore
        else:
            raise UserError("workers sent no curvature (d too large for Gram matrices): not supported yet")
        method, comp = resolve_method(cfg, d)
        self.constants = constants_for(cfg, method, comp, L, quadratic_mean(L_i), d)
        self.master = MasterNode(method, self.n, make_x0(cfg.x0, d), gamma=self.constants.gamma)
        self._state_facts()
        self.state = "running"
        self.state_detail = ""
        self.rounds_started_at = time.time()
        log.info("start: %s", self.constants.describe())
        for s in self.sessions.values():
            self._admit(s)

    def _admit(self, s: WorkerSession) -> None:
        """Send a worker the state to start from: x, g and its rank's g_i at the current round."""
        assert self.master is not None and self.constants is not None
        self._settle()
        rep = self.master.replica
        state = self.master.worker_state(s.rank)
        start = pb.Start(
            gamma=self.constants.gamma, x_step=rep.x_step, x=dense_to_proto(rep.x), g=dense_to_proto(rep.g),
            constants_json=json.dumps(self.constants.__dict__), checksum_every=self.opts.checksum_every,
            eval_every=self.opts.eval_every, round=self.round,
        )
        if state is not None:
            start.worker_state.CopyFrom(dense_to_proto(state))
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

    def _decode(self, vec: pb.SparseVector | EncodedVector, what: str) -> SparseVector:
        assert self.d is not None
        try:
            enc = vec if isinstance(vec, EncodedVector) else encoded_from_proto(vec)
            return decode(enc, expected_dim=self.d)
        except CodecError as exc:
            raise Refusal("INVALID_ARGUMENT", f"{what}: {exc}") from None

    def update(self, s: WorkerSession, msg: UpdateIn, nbytes: int) -> None:
        if not self._check_stream_round(s, msg.round, "Update"):
            return
        if s.rank in self.updates:
            raise Refusal("FAILED_PRECONDITION", f"second Update from rank {s.rank} for round {msg.round}")
        vec = self._decode(msg.vector, f"Update round {msg.round}")
        if not (math.isfinite(msg.f) and math.isfinite(msg.distortion)):
            raise Refusal("INVALID_ARGUMENT", f"Update round {msg.round}: non-finite f or distortion")
        self.updates[s.rank] = (Message(vec, msg.replace), msg.f, msg.distortion, nbytes)
        self.wake.set()

    def eval(self, s: WorkerSession, msg: pb.Eval, nbytes: int) -> None:
        if not self._check_stream_round(s, msg.round, "Eval"):
            return
        if not self.is_eval_round(msg.round) or s.rank in self.evals or s.rank not in self.updates:
            raise Refusal("FAILED_PRECONDITION", f"unexpected Eval from rank {s.rank} for round {msg.round}")
        grad = self._decode(msg.grad, f"Eval round {msg.round}")
        if not grad.is_dense:
            raise Refusal("INVALID_ARGUMENT", f"Eval round {msg.round}: the gradient must be dense")
        self.evals[s.rank] = (grad.values, nbytes)
        self.wake.set()

    def resync(self, s: WorkerSession, msg: pb.ResyncRequest) -> None:
        if not self._check_stream_round(s, msg.round, "ResyncRequest"):
            return
        assert self.master is not None
        self._settle()
        rep = self.master.replica
        log.warning("rank %d is out of sync at round %d: sending the dense state", s.rank, msg.round)
        s.send(pb.MasterMessage(resync=pb.Resync(
            round=msg.round, x=dense_to_proto(rep.x), g=dense_to_proto(rep.g))).SerializeToString())

    def _evals_in(self) -> bool:
        """Every delivered Update of an evaluation round has its Eval too (a partial round logs no ‖∇f‖²,
        but closing before a connected worker's Eval arrives would turn it into a late message)."""
        return not self.is_eval_round(self.round) or all(r in self.evals for r in self.updates)

    def _round_complete(self) -> bool:
        return len(self.updates) == self.n and (not self.is_eval_round(self.round) or len(self.evals) == self.n)

    def _may_close_partially(self) -> bool:
        if not self.tolerates_missing or self.opts.round_timeout is None:
            return False
        connected_missing = [r for r in range(self.n) if r not in self.updates and r in self.sessions
                             and self.sessions[r].state == "running"]
        # No point waiting out the timeout for ranks with no worker at all: they cannot deliver.
        timed_out = time.monotonic() - self.round_started_at >= self.opts.round_timeout
        if not timed_out and connected_missing:
            return False
        if len(self.updates) >= self.min_workers and (timed_out or self._evals_in()):
            return True
        self.state_detail = (f"round {self.round}: {len(self.updates)} of {self.n} contributions after the "
                             f"{self.opts.round_timeout:g} s timeout; waiting for at least {self.min_workers} "
                             f"(--min-workers)")
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
        up = [self.updates[r][3] for r in self.updates]
        self.wire_up += sum(up)
        grads = None
        if not missing and self.is_eval_round(t) and len(self.evals) == self.n:
            grads = [self.evals[r][0] for r in ranks]
        self.eval_bytes += sum(nbytes for _, nbytes in self.evals.values())
        self.ledger.record(t, messages)
        for r in ranks:
            if r in self.updates:
                self.sessions[r].rounds_done += 1
                self.missed_streak[r] = 0
            else:
                self.missed_streak[r] = self.missed_streak.get(r, 0) + 1
        if missing:
            self.missing_in[t] = missing
        f = [self.updates[r][1] for r in ranks] if not missing else None
        dist = [self.updates[r][2] for r in ranks] if not missing else None
        rec = make_record(
            t, f, dist, grads, self.ledger,
            time.time() - (self.rounds_started_at or self.started_at), wire_bytes_up=self.wire_up,
            wire_bytes_down=self.wire_down, uplink_msg_bytes=sum(up) / max(len(up), 1), eval_bytes=self.eval_bytes,
            g_norm_sq=self.g_norm, missing=missing or None,
        )
        return rec, messages

    async def run(self) -> None:
        """Wait for n workers, then run rounds until the stop rule; always ends with ``done`` set."""
        try:
            if self.master is None:
                while not self.ready.is_set():
                    await self.ready.wait()
                self._start()
            await self._rounds()
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

    async def _rounds(self) -> None:
        """One round: collect, decide whether to stop, send the downlink, then catch up on everything that is not
        on the round's critical path (the master's own O(d) replica update, the log, checkpoints)."""
        assert self.master is not None
        while True:
            if self.opts.save_iterates is not None:
                self._iterates.append(self.master.x.copy())
            self.round_started_at = time.monotonic()
            await self._collect_round()
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
            self.updates.clear()
            self.evals.clear()
            self._broadcast(down, rec)
            self._unapplied = down
            self.round += 1
            await asyncio.sleep(0)  # let the stream writers hand the result to gRPC before the O(d) work below
            self._settle()
            self._log_round(rec)
            if self.round % self.opts.checkpoint_every == 0:
                await self._checkpoint_safely()

    def _broadcast(self, down: Downlink, rec: RoundRecord) -> None:
        # The checksum is of the state this round started from, which the workers still hold when it arrives.
        # The aggregate goes out in float64 even with the compact encoding: it is a sum of the workers' rounded
        # values, and every replica must add exactly the same bits.
        agg = encode(down.vector, packed=self.cfg.encoding == "compact")
        raw = round_result_to_bytes(rec.round, agg, down.mode == "replace", down.scale, self.checksum,
                                    rec.missing or [])
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
        self.checksum = state_checksum(rep.x, rep.g) if self.master.round % self.opts.checksum_every == 0 else b""

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
        failed = reason in ("failed", "diverged")
        self.state = "failed" if failed else "stopped" if reason == "stopped" else "done"
        self.stop_reason, self.stop_message = reason, message
        self.state_detail = message
        if self.master is not None:
            self._settle()
            self.x_final = self.master.x.copy()
        if self.master is not None and reason != "failed":
            try:
                self.save_checkpoint()
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
            plot_logs([o.log], o.plot)

    # -- status ----------------------------------------------------------------------------------------------------

    def status(self) -> dict:
        cfg, rec, c = self.cfg, self.latest, self.constants
        now = time.time()
        rounds_done = self.round + (1 if self.state in ("done", "failed") and rec is not None else 0)
        rate = None
        if self.rounds_started_at is not None and rounds_done:
            rate = rounds_done / max(now - self.rounds_started_at, 1e-9)
        return {
            "run_id": self.run_id,
            "state": self.state,
            "detail": self.state_detail,
            "round": self.round,
            "rounds_planned": cfg.rounds,
            "rounds_per_second": rate,
            "method": cfg.method,
            "compressor": cfg.compressor,
            "k": cfg.k,
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
            "late_messages": self.late_messages,
            "resumed_from": self.resumed_from,
            "effective_config": self.opts.effective_config,
            "latest": None if rec is None else {
                "round": rec.round, "f": rec.f, "grad_norm_sq": rec.grad_norm_sq,
                "last_grad_norm_sq": self.last_grad_norm_sq, "G": rec.G, "bits_per_worker": rec.bits_per_worker,
                "wire_bytes_up": rec.wire_bytes_up, "wire_bytes_down": rec.wire_bytes_down, "missing": rec.missing,
            },
            "g_norm_sq": self.g_norm,
            "stop_reason": self.stop_reason or None,
            "elapsed_s": round(now - self.started_at, 3),
        }


def peer_host(peer: str) -> str:
    """'ipv4:10.0.0.5:4312' → 'ipv4:10.0.0.5' (the host a fault is charged to)."""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer
