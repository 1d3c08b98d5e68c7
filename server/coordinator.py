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
from ef21.codec import CodecError
from ef21.config import RunConfig, make_x0
from ef21.data import fingerprint, load_dataset
from ef21.engine import MasterNode
from ef21.errors import UserError
from ef21.methods import Message
from ef21.problem import (
    global_smoothness_from_diagonals, global_smoothness_from_grams, quadratic_mean, sum_in_rank_order,
)
from ef21.runlog import JsonlWriter, ensure_parent
from ef21.simulate import RoundRecord, constants_for, g_norm_sq, make_record, resolve_method, stop_check
from ef21.stepsize import TheoryConstants
from ef21_wire.protocol import GRPC_FRAME_BYTES, is_eval_round
from ef21_wire.serde import dense_to_proto, state_checksum, vector_from_proto, vector_to_proto
from ef21_wire.v1 import ef21_pb2 as pb

from .session import Refusal, SetupInfo, WorkerSession

log = logging.getLogger("ef21.master")


def quadratic_fingerprint(cfg: RunConfig) -> str:
    return f"quadratic:{cfg.dim}:{cfg.seed}"


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


class Coordinator:
    def __init__(self, opts: MasterOptions, *, on_round: Callable[[RoundRecord], None] | None = None) -> None:
        if opts.eval_every < 1 or opts.checksum_every < 1:
            raise UserError("--eval-every and --checksum-every must be >= 1")
        self.opts = opts
        self.cfg = opts.config
        self.n = self.cfg.workers
        self.run_id = uuid.uuid4().hex[:12]
        self.on_round = on_round
        self.state = "waiting"
        self.state_detail = f"waiting for {self.n} workers"
        self.sessions: dict[int, WorkerSession] = {}
        self.reference: tuple[str, int, int] | None = self._reference_data()
        self.d: int | None = None if self.reference is None else self.reference[1]
        self.ready = asyncio.Event()
        self.round = 0
        self.updates: dict[int, tuple[Message, float, float, int]] = {}
        self.evals: dict[int, tuple[np.ndarray, int]] = {}
        self.round_ready = asyncio.Event()
        self.done = asyncio.Event()
        self.master: MasterNode | None = None
        self.constants: TheoryConstants | None = None
        self.ledger = CommLedger(self.n)
        self.latest: RoundRecord | None = None
        self.last_grad_norm_sq: float | None = None
        self.stop_reason = ""
        self.stop_message = ""
        self.wire_up = self.wire_down = self.eval_bytes = 0
        self.started_at = time.time()
        self.rounds_started_at: float | None = None
        self.x_final: np.ndarray | None = None
        self._iterates: list[np.ndarray] = []
        self._writer = JsonlWriter(opts.log)

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

    # -- joining -------------------------------------------------------------------------------------------------

    def join_reply(self) -> pb.JoinReply:
        return pb.JoinReply(run_id=self.run_id, config_json=json.dumps(self.cfg.to_dict()), workers=self.n)

    def hello(self, msg: pb.Hello, peer: str) -> WorkerSession:
        if msg.run_id != self.run_id:
            raise Refusal("FAILED_PRECONDITION", f"run id {msg.run_id!r} is not this run ({self.run_id}); join again")
        if self.state != "waiting":
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
        free = [r for r in range(self.n) if r not in self.sessions]
        if not free:
            raise Refusal("RESOURCE_EXHAUSTED", f"all {self.n} ranks are taken")
        rank = msg.requested_rank
        if rank >= 0:
            if rank >= self.n:
                raise Refusal("INVALID_ARGUMENT", f"rank {rank} out of range (workers = {self.n})")
            if rank not in free:
                raise Refusal("ALREADY_EXISTS", f"rank {rank} is taken")
        else:
            rank = free[0]
        session = WorkerSession(rank, peer, msg.hostname)
        self.sessions[rank] = session
        log.info("worker %s (%s) joined as rank %d", msg.hostname, peer, rank)
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
        ready = [r for r, x in self.sessions.items() if x.state == "ready"]
        self.state_detail = f"{len(ready)} of {self.n} workers ready"
        if len(ready) == self.n:
            self.ready.set()

    def lost(self, s: WorkerSession, why: str) -> None:
        if self.sessions.get(s.rank) is not s:
            return
        if s.state in ("done", "lost"):
            return
        if self.state == "waiting":
            del self.sessions[s.rank]  # before the start a rank is simply free again
            self.ready.clear()
            log.info("rank %d left before the start (%s)", s.rank, why)
            return
        s.state = "lost"
        if self.state == "running":
            self.state_detail = f"rank {s.rank} lost ({why}); round {self.round} waits for it"
        log.warning("rank %d lost: %s", s.rank, why)

    # -- rounds ----------------------------------------------------------------------------------------------------

    def _start(self) -> None:
        cfg, d = self.cfg, self.d
        assert d is not None and self.reference is not None
        ranks = range(self.n)
        infos = [self.sessions[r].setup for r in ranks]
        assert all(i is not None for i in infos)
        L_i = [i.smoothness for i in infos]  # type: ignore[union-attr]
        if all(i.diagonal is not None for i in infos):  # type: ignore[union-attr]
            L = global_smoothness_from_diagonals(sum_in_rank_order([i.diagonal for i in infos]), self.n)  # type: ignore
        elif all(i.gram is not None for i in infos):  # type: ignore[union-attr]
            rows = sum(i.shard_rows for i in infos)  # type: ignore[union-attr]
            L = global_smoothness_from_grams(cfg, sum_in_rank_order([i.gram for i in infos]), rows)  # type: ignore
        else:
            raise UserError("workers sent no curvature (d too large for Gram matrices): not supported yet")
        L_tilde = quadratic_mean(L_i)
        method, comp = resolve_method(cfg, d)
        self.constants = constants_for(cfg, method, comp, L, L_tilde, d)
        x0 = make_x0(cfg.x0, d)
        self.master = MasterNode(method, self.n, x0, gamma=self.constants.gamma)
        start = pb.MasterMessage(start=pb.Start(
            gamma=self.constants.gamma, x_step=self.master.replica.x_step, x0=dense_to_proto(x0),
            constants_json=json.dumps(self.constants.__dict__), checksum_every=self.opts.checksum_every,
            eval_every=self.opts.eval_every,
        )).SerializeToString()
        for s in self.sessions.values():
            s.state = "running"
            s.send(start)
        self.state = "running"
        self.state_detail = ""
        self.rounds_started_at = time.time()
        log.info("start: %s", self.constants.describe())

    def is_eval_round(self, t: int) -> bool:
        return is_eval_round(t, self.opts.eval_every, self.cfg.rounds)

    def _check_round_ready(self) -> None:
        if len(self.updates) == self.n and (not self.is_eval_round(self.round) or len(self.evals) == self.n):
            self.round_ready.set()

    def _check_stream_round(self, s: WorkerSession, round_: int, what: str) -> None:
        """A message about a round must come on a running stream, for the current round."""
        if self.state != "running" or s.state != "running":
            raise Refusal("FAILED_PRECONDITION", f"{what} while the run is {self.state} and the worker {s.state}")
        if round_ != self.round:
            raise Refusal("FAILED_PRECONDITION", f"{what} for round {round_}, but the current round is {self.round}")

    def update(self, s: WorkerSession, msg: pb.Update, nbytes: int) -> None:
        self._check_stream_round(s, msg.round, "Update")
        if s.rank in self.updates:
            raise Refusal("FAILED_PRECONDITION", f"second Update from rank {s.rank} for round {msg.round}")
        assert self.d is not None
        try:
            vec = vector_from_proto(msg.message, expected_dim=self.d)
        except CodecError as exc:
            raise Refusal("INVALID_ARGUMENT", f"Update round {msg.round}: {exc}") from None
        if not (math.isfinite(msg.f) and math.isfinite(msg.distortion)):
            raise Refusal("INVALID_ARGUMENT", f"Update round {msg.round}: non-finite f or distortion")
        self.updates[s.rank] = (Message(vec, msg.replace), msg.f, msg.distortion, nbytes)
        self._check_round_ready()

    def eval(self, s: WorkerSession, msg: pb.Eval, nbytes: int) -> None:
        self._check_stream_round(s, msg.round, "Eval")
        if not self.is_eval_round(msg.round) or s.rank in self.evals:
            raise Refusal("FAILED_PRECONDITION", f"unexpected Eval from rank {s.rank} for round {msg.round}")
        assert self.d is not None
        try:
            grad = vector_from_proto(msg.grad, expected_dim=self.d)
        except CodecError as exc:
            raise Refusal("INVALID_ARGUMENT", f"Eval round {msg.round}: {exc}") from None
        if not grad.is_dense:
            raise Refusal("INVALID_ARGUMENT", "Eval carries a dense gradient")
        self.evals[s.rank] = (grad.values, nbytes)
        self._check_round_ready()

    def resync(self, s: WorkerSession, msg: pb.ResyncRequest) -> None:
        self._check_stream_round(s, msg.round, "ResyncRequest")
        assert self.master is not None
        rep = self.master.replica
        log.warning("rank %d is out of sync at round %d: sending the dense state", s.rank, msg.round)
        s.send(pb.MasterMessage(resync=pb.Resync(
            round=msg.round, x=dense_to_proto(rep.x), g=dense_to_proto(rep.g))).SerializeToString())

    def _finish_round(self) -> RoundRecord:
        assert self.master is not None
        t = self.round
        ranks = range(self.n)
        messages = [self.updates[r][0] for r in ranks]
        up = [self.updates[r][3] for r in ranks]
        self.wire_up += sum(up)
        grads = None
        if self.is_eval_round(t):
            grads = [self.evals[r][0] for r in ranks]
            self.eval_bytes += sum(self.evals[r][1] for r in ranks)
        self.ledger.record(t, messages)
        for r in ranks:
            self.sessions[r].rounds_done = t + 1
        rec = make_record(
            t, [self.updates[r][1] for r in ranks], [self.updates[r][2] for r in ranks], grads, self.ledger,
            time.time() - (self.rounds_started_at or self.started_at), wire_bytes_up=self.wire_up,
            wire_bytes_down=self.wire_down, uplink_msg_bytes=sum(up) / self.n, eval_bytes=self.eval_bytes,
            g_norm_sq=g_norm_sq(self.master),
        )
        return rec

    async def run(self) -> None:
        """Wait for n workers, then run rounds until the stop rule; always ends with ``done`` set."""
        try:
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
        assert self.master is not None
        while True:
            if self.opts.save_iterates is not None:
                self._iterates.append(self.master.x.copy())
            await self.round_ready.wait()
            self.round_ready.clear()
            rec = self._finish_round()
            self.latest = rec
            if rec.grad_norm_sq is not None:
                self.last_grad_norm_sq = rec.grad_norm_sq
            self._writer.write(rec.to_dict())
            if self.on_round is not None:
                self.on_round(rec)
            ended = stop_check(rec, self.master.x, self.cfg)
            if ended is not None:
                self._end(*ended)
                return
            messages = [self.updates[r][0] for r in range(self.n)]
            down = self.master.aggregate(messages)
            self.updates.clear()
            self.evals.clear()
            t = self.round
            self.round += 1
            checksum = b""
            if self.round % self.opts.checksum_every == 0:
                checksum = state_checksum(self.master.replica.x, self.master.replica.g)
            raw = pb.MasterMessage(round_result=pb.RoundResult(
                round=t, aggregate=vector_to_proto(down.vector), replace=down.mode == "replace", scale=down.scale,
                checksum=checksum,
            )).SerializeToString()
            for s in self.sessions.values():
                s.send(raw)
            self.wire_down += (len(raw) + GRPC_FRAME_BYTES) * self.n

    def _end(self, reason: str, message: str) -> None:
        failed = reason in ("failed", "diverged")
        self.state = "failed" if failed else "stopped" if reason == "stopped" else "done"
        self.stop_reason, self.stop_message = reason, message
        self.state_detail = message
        if self.master is not None:
            self.x_final = self.master.x.copy()
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
            "latest": None if rec is None else {
                "round": rec.round, "f": rec.f, "grad_norm_sq": rec.grad_norm_sq,
                "last_grad_norm_sq": self.last_grad_norm_sq, "G": rec.G, "bits_per_worker": rec.bits_per_worker,
                "wire_bytes_up": rec.wire_bytes_up, "wire_bytes_down": rec.wire_bytes_down,
            },
            "g_norm_sq": None if self.master is None else float(self.master.replica.g @ self.master.replica.g),
            "stop_reason": self.stop_reason or None,
            "elapsed_s": round(now - self.started_at, 3),
        }
