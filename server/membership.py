"""Who takes part: the run's data and objective as the reference every worker must match, the ranks and their
sessions, and who may no longer join (``bans``). Handshake messages are validated here before any session or
state exists for them."""

from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path
from typing import Callable

import numpy as np

from ef21.compression.sparse import SparseVector
from ef21.engine.config import RunConfig
from ef21.errors import UserError
from ef21.problems.data import data_info
from ef21.problems.layout import ModelLayout
from ef21.problems.objectives import GRAM_MAX_D
from ef21.problems.problem import quadratic_fingerprint
from ef21_wire.v1 import ef21_pb2 as pb

from .bans import Bans, peer_host
from .session import Refusal, SetupInfo
from .streams import StreamState, WorkerStream

log = logging.getLogger("ef21.master")


def reference_data(cfg: RunConfig, require_data: bool) -> tuple[str, int, int] | None:
    """(fingerprint, d, rows) of the data if the master can read it (one pass over a file, no rows kept); None
    when only the workers have it. For a user objective d is the objective's, which the first worker reports (0
    here)."""
    if cfg.objective is None and cfg.problem == "quadratic":
        return quadratic_fingerprint(cfg), cfg.dim, 0
    if cfg.data is None:
        return "no-data", 0, 0
    try:
        info = data_info(cfg.data, problem=cfg.problem)
    except UserError as exc:
        # A file that is not here is the workers' business; one that is here but unreadable is a mistake.
        if require_data or Path(cfg.data).exists():
            raise
        log.info("master has no copy of the data (%s); the first worker's fingerprint is the reference", exc)
        return None
    if info.n_rows < cfg.workers:
        raise UserError(f"{info.n_rows} rows cannot be split over {cfg.workers} workers")
    return info.fingerprint, (0 if cfg.objective is not None else info.d), info.n_rows


class Membership:
    """The ranks of a run and what every worker must present to hold one."""

    def __init__(self, cfg: RunConfig, max_faults: int) -> None:
        self.cfg = cfg
        self.n = cfg.workers
        self.sessions: dict[int, WorkerStream] = {}
        """Rank → the stream that holds it, or held it last (an ended stream: the status shows how it ended). A
        rank is bound exactly while its stream has not ended, and only a new stream can take it after that."""
        self.live: set[WorkerStream] = set()
        """Every stream not yet ended, with or without a rank."""
        self.reference: tuple[str, int, int] | None = None
        """(data fingerprint, d, rows) of the run's data."""
        self.objective_id: str | None = None
        """A user objective's identity, as the first worker presented it."""
        self.layout: ModelLayout | None = None
        """A model's tensors, as the first worker to set up reported them (a resumed run: the checkpoint's)."""
        self.layout_fixed = False
        self.d: int | None = None
        self.bans = Bans(max_faults)
        self.refused: dict[str, int] = {}  # gRPC status code → streams ended by a refusal
        self.ready = asyncio.Event()  # all n workers set up (before the start)

    def free_ranks(self) -> list[int]:
        return [r for r in range(self.n) if r not in self.sessions or self.sessions[r].ended]

    def ready_ranks(self) -> list[int]:
        return sorted(r for r, s in self.sessions.items() if s.state in (StreamState.SET_UP, StreamState.RUNNING))

    def connected(self) -> int:
        return sum(1 for s in self.sessions.values() if not s.ended)

    def bound(self, rank: int) -> WorkerStream | None:
        """The live stream that holds ``rank``, if any."""
        s = self.sessions.get(rank)
        return None if s is None or s.ended else s

    def hello(self, s: WorkerStream, msg: pb.Hello, run_id: str, run_state: str) -> None:
        """A new stream's Hello: the same run, still taking workers, the same data and objective, a free rank;
        then the stream holds that rank (``joined``)."""
        self.bans.admit(s.identity or f"host {peer_host(s.peer)}", self.free_ranks)
        if msg.run_id != run_id:
            # ABORTED, not FAILED_PRECONDITION: a worker that joined before a master restart simply joins again.
            raise Refusal("ABORTED", f"run id {msg.run_id!r} is not this run ({run_id}); join again")
        if run_state not in ("waiting", "running"):
            raise Refusal("FAILED_PRECONDITION", f"the run is {run_state}; it takes no new workers")
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
        rank = msg.requested_rank
        if rank >= 0:  # the common case, checked in O(1): thousands of joins must not cost O(n) each
            if rank >= self.n:
                raise Refusal("INVALID_ARGUMENT", f"rank {rank} out of range (workers = {self.n})")
            if self.bound(rank) is not None:
                # Whoever claims a rank another live stream holds: logged with its identity by the service.
                raise Refusal("ALREADY_EXISTS", f"rank {rank} is taken")
        else:
            free = self.free_ranks()
            if not free:
                raise Refusal("RESOURCE_EXHAUSTED", f"all {self.n} ranks are taken")
            rank = free[0]
        assert self.bound(rank) is None, f"rank {rank} bound twice"
        s.rank, s.hostname = rank, msg.hostname
        s.move(StreamState.JOINED)
        self.sessions[rank] = s

    def setup_info(self, s: WorkerStream, msg: pb.Setup, decode: Callable[..., SparseVector]
                   ) -> SetupInfo:
        """A worker's Setup, checked: its objective's d against the run's, its curvature and start."""
        if s.state is not StreamState.JOINED or msg.rank != s.rank:
            raise Refusal("FAILED_PRECONDITION", f"unexpected Setup for rank {msg.rank} on rank {s.rank}'s stream")
        if msg.dim:
            if self.d is None:
                self.d = int(msg.dim)  # a user objective: the first worker's d is the run's
            elif msg.dim != self.d:
                raise Refusal("FAILED_PRECONDITION", f"dimension mismatch: rank {s.rank}'s objective has "
                                                     f"d = {msg.dim}, the run's d = {self.d}", objective=True)
        d = self.d
        if d is None:
            raise Refusal("FAILED_PRECONDITION", "Setup without the objective's dimension")
        diag = None
        if msg.has_gram and d > GRAM_MAX_D:
            raise Refusal("INVALID_ARGUMENT", f"has_gram for d = {d} > {GRAM_MAX_D}: a Gram that large is never sent")
        if msg.diagonal:
            if len(msg.diagonal) != 8 * d:
                raise Refusal("INVALID_ARGUMENT", f"diagonal has {len(msg.diagonal)} bytes, expected {8 * d}")
            diag = np.frombuffer(msg.diagonal, dtype="<f8")
        if not (math.isfinite(msg.smoothness) and msg.smoothness >= 0):
            raise Refusal("INVALID_ARGUMENT", f"smoothness {msg.smoothness} is not a non-negative number")
        if diag is not None and not np.all(np.isfinite(diag)):
            raise Refusal("INVALID_ARGUMENT", "non-finite curvature")
        x0 = decode(msg.x0, "Setup x0", dtype=np.float64).values if msg.HasField("x0") else None
        if x0 is not None and x0.shape[0] != d:
            raise Refusal("INVALID_ARGUMENT", f"Setup x0 has {x0.shape[0]} entries, expected {d}")
        if len(msg.x0_digest) not in (0, 16):
            raise Refusal("INVALID_ARGUMENT", f"Setup x0_digest has {len(msg.x0_digest)} bytes, expected 16 or none")
        layout, b0 = self._model(s, msg, d, decode)
        return SetupInfo(msg.smoothness or None, int(msg.shard_rows), bool(msg.has_gram), diag,
                         int(msg.n_samples) or None, x0, bool(msg.power_iteration), layout, b0, bytes(msg.x0_digest))

    def _model(self, s: WorkerStream, msg: pb.Setup, d: int, decode: Callable[..., SparseVector]
               ) -> tuple[ModelLayout | None, np.ndarray | None]:
        """A model's layout and initial buffers from a Setup: well formed, holding d parameters, and the same model
        as every other worker's (a worker whose model differs is refused; the run keeps waiting for one that fits)."""
        layout = None
        if msg.layout:
            try:
                layout = ModelLayout.from_json(msg.layout, "Setup layout")
            except ValueError as exc:
                raise Refusal("INVALID_ARGUMENT", str(exc)) from None
            if layout.d != d:
                raise Refusal("INVALID_ARGUMENT", f"Setup layout holds {layout.d} parameters, d = {d}")
        b0 = None
        if msg.HasField("buffers"):
            b0 = decode(msg.buffers, "Setup buffers", dim=0 if layout is None else layout.buffer_size).to_dense()
            if not np.all(np.isfinite(b0)):
                raise Refusal("INVALID_ARGUMENT", "Setup buffers: non-finite values")
        if not self.layout_fixed:
            self.layout, self.layout_fixed = layout, True
        elif layout is None or self.layout is None:
            if layout is not self.layout:  # one is a model, the other is not
                mine, runs = ("not a model", "is") if layout is None else ("a model", "is not")
                raise Refusal("FAILED_PRECONDITION", f"model mismatch: rank {s.rank}'s objective is {mine}, the "
                                                     f"run's {runs}", objective=True)
        else:
            diff = layout.difference(self.layout)
            if diff is not None:
                raise Refusal("FAILED_PRECONDITION", f"model mismatch: rank {s.rank}'s model has {diff}",
                              objective=True)
        return layout, b0

    def refuse(self, code: str) -> None:
        """Count a stream or call ended by a refusal (the status and /metrics show them by code)."""
        self.refused[code] = self.refused.get(code, 0) + 1

    def fault(self, identity: str) -> None:
        """A refused message: charged to its sender (see ``bans`` and --max-faults)."""
        self.bans.charge(identity)

    def join_timeout_message(self, timeout: float | None) -> str:
        ready = self.ready_ranks()
        missing = [r for r in range(self.n) if r not in ready]
        return (f"{len(ready)} of {self.n} workers came within --join-timeout {timeout:g} s "
                f"(no worker for rank(s) {', '.join(map(str, missing))}); are the workers started, and can they "
                f"reach this master?")
