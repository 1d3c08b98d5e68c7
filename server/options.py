"""What a master is told to do: ``MasterOptions``, and the checks that need nothing but the options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ef21.engine.config import RunConfig
from ef21.errors import UserError

# --master-rows: how the master keeps every worker's g_i (for hand-over and checkpoints).
MASTER_ROWS = {"full": np.float64, "float32": np.float32, "none": None}

# Stop reasons after which a run is over for good: resuming its final checkpoint with the same stopping rule has
# nothing left to do. A run stopped by a signal ("stopped") goes on when resumed.
FINISHED_REASONS = ("rounds", "tol")


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

    def check(self) -> None:
        """The options' own consistency (one-line errors before anything starts)."""
        n = self.config.workers
        if self.eval_every < 1 or self.checksum_every < 1 or self.checkpoint_every < 1:
            raise UserError("--eval-every, --checksum-every and --checkpoint-every must be >= 1")
        if self.round_timeout is not None and not self.round_timeout > 0:
            raise UserError(f"--round-timeout must be positive, got {self.round_timeout}")
        if self.join_timeout is not None and not self.join_timeout > 0:
            raise UserError(f"--join-timeout must be positive, got {self.join_timeout:g}")
        if self.min_workers is not None and not 1 <= self.min_workers <= n:
            raise UserError(f"--min-workers must lie in 1..{n}, got {self.min_workers}")
        if self.master_rows not in MASTER_ROWS:
            raise UserError(f"--master-rows must be one of {', '.join(MASTER_ROWS)}, got {self.master_rows!r}")
        if self.master_rows == "none" and (self.checkpoint is not None or self.resume is not None):
            raise UserError("--master-rows none keeps no g_i, which a checkpoint needs: drop --checkpoint/--resume "
                            "or keep rows (full or float32)")
        if self.config.aggregators and (self.checkpoint is not None or self.resume is not None):
            raise UserError("--aggregators: the master sees only the blocks' sums, so it keeps no g_i, which a "
                            "checkpoint needs: drop --checkpoint/--resume")
        if self.master_rows == "none" and self.config.method == "ef21plus":
            raise UserError("ef21plus needs every g_i on the master (a worker may replace its g_i): "
                            "--master-rows none is not possible")

    @property
    def rows_dtype(self) -> object:
        # Through aggregators the master gets sums only: it has no worker's own message to keep a row from.
        return None if self.config.aggregators else MASTER_ROWS[self.master_rows]
