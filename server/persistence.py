"""A run's state as a checkpoint and back: what ``--checkpoint`` writes and ``--resume`` reads (the file format
itself is ``checkpoint.py``). Everything the run needs to continue exactly: x, g, every g_i, EF21-HB's v and
EF21-BC's g̃, EF21-P's w, a model's buffers and the optimizer's state, the round, the constants and the plan's
facts (a model's layout too, which ``ef21 export`` needs), the counters and where the log ends.

It knows nothing of the master that holds the state: the coordinator hands it a ``SavedRun`` and gets one back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ef21.engine.config import RunConfig
from ef21.errors import UserError
from ef21.methods.stepsize import TheoryConstants
from ef21.problems.layout import ModelLayout

from . import checkpoint
from .options import FINISHED_REASONS


@dataclass(frozen=True)
class Counters:
    """What a run has counted up to a round: restored with the state, so a resumed run counts on from there."""

    round: int
    paper_total: int
    payload_total: int
    down_total: int
    wire: tuple[int, int, int]
    """Wire bytes up, down and of the dense evaluations."""
    log_offset: int
    """Where the log ends (bytes), so a resumed run appends after the last round it keeps."""


@dataclass(frozen=True, eq=False)
class SavedRun:
    """A run as a checkpoint holds it."""

    cfg: RunConfig
    run_id: str
    round: int
    reference: tuple[Any, ...]
    d: int
    objective_id: str | None
    constants: TheoryConstants
    L_i: list[float] | None
    n_samples: list[int | None]
    counters: Counters
    last_grad_norm_sq: float | None
    effective_config: dict[str, Any] | None
    x: np.ndarray
    g: np.ndarray
    rows: np.ndarray | None
    v: np.ndarray | None = None
    g_tilde: np.ndarray | None = None
    w: np.ndarray | None = None
    """EF21-P's shared point (the workers' replica)."""
    ended: tuple[str, str] | None = None
    """(reason, message) of a run that ended; None while it runs."""
    log_end: int | None = None
    """Where the log of an ended run ends (its last round included)."""
    layout: ModelLayout | None = None
    """A model's tensors (None when the objective is not a model)."""
    state: dict[str, np.ndarray] = field(default_factory=dict)
    """The replicated state beside x, g and v (``Replica.extra_state``: buffers, optimizer)."""

    def finished(self, cfg: RunConfig) -> bool:
        """Whether this run had finished under the same stopping rule as ``cfg`` (nothing left to run)."""
        return (self.ended is not None and self.ended[0] in FINISHED_REASONS
                and (self.cfg.rounds, self.cfg.tol) == (cfg.rounds, cfg.tol))


def save(path: Path, run: SavedRun) -> None:
    c = run.counters
    meta: dict[str, Any] = {
        "config": run.cfg.to_dict(), "run_id": run.run_id, "round": run.round, "reference": list(run.reference),
        "constants": run.constants.__dict__, "d": run.d, "objective_id": run.objective_id,
        "plan": {"L_i": run.L_i, "n_samples": run.n_samples},
        "ledger": {"paper_total": c.paper_total, "payload_total": c.payload_total, "down_total": c.down_total},
        "wire": list(c.wire), "last_grad_norm_sq": run.last_grad_norm_sq, "log_offset": c.log_offset,
        "effective_config": run.effective_config,
        "layout": None if run.layout is None else run.layout.to_json(),
    }
    if run.ended is not None:
        meta["ended"] = {"reason": run.ended[0], "message": run.ended[1]}
        meta["log_end"] = run.log_end
    extra = {name: a for name, a in (("v", run.v), ("g_tilde", run.g_tilde), ("w", run.w)) if a is not None}
    extra.update({checkpoint.STATE_PREFIX + name: a for name, a in run.state.items()})
    checkpoint.save(path, checkpoint.Checkpoint(meta, run.x, run.g, run.rows, extra))


def load(path: Path, cfg: RunConfig) -> tuple[SavedRun, Path, str | None]:
    """The run saved at ``path`` (or its ``.prev``), checked to be ``cfg``'s run: (run, file used, a warning)."""
    ckpt, used, warning = checkpoint.load_latest(path)
    meta = ckpt.meta
    saved = RunConfig.from_dict(meta["config"])
    if saved.dtype != cfg.dtype:
        raise UserError(f"checkpoint {used} holds --dtype {saved.dtype} vectors, this run is --dtype {cfg.dtype}: "
                        f"resume with --dtype {saved.dtype}")
    kept = {"x": ckpt.x, "g": ckpt.g, "rows": ckpt.rows, **ckpt.extra}
    wrong = sorted(k for k, a in kept.items() if a is not None and a.dtype != saved.np_dtype
                   and not k.startswith(checkpoint.STATE_PREFIX) and not (k == "rows" and a.dtype == np.float32))
    if wrong:  # the checksum covers the dtypes: only a file written by something else gets here
        raise UserError(f"checkpoint {used}: {', '.join(wrong)} not {saved.dtype} as its configuration says "
                        "(corrupt)")
    # Only the stopping rule may change on resume; anything else would make a different run.
    differ = [k for k, v in saved.to_dict().items() if k not in ("rounds", "tol") and v != cfg.to_dict()[k]]
    if differ:
        raise UserError(f"checkpoint {used} is of a different run: {', '.join(sorted(differ))} differ "
                        f"(checkpoint: {', '.join(f'{k}={saved.to_dict()[k]!r}' for k in sorted(differ))})")
    ledger = meta["ledger"]
    wire = tuple(int(v) for v in meta["wire"])
    ended = meta.get("ended")
    p = meta.get("plan", {})
    try:
        layout = None if not meta.get("layout") else ModelLayout.from_json(meta["layout"], f"checkpoint {used}")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    run = SavedRun(
        cfg=saved, run_id=meta["run_id"], round=int(meta["round"]), reference=tuple(meta["reference"]),
        d=int(meta["d"]) if "d" in meta else int(meta["reference"][1]), objective_id=meta.get("objective_id"),
        constants=TheoryConstants(**meta["constants"]), L_i=p.get("L_i"),
        n_samples=p.get("n_samples", [None] * saved.workers),
        counters=Counters(int(meta["round"]), int(ledger["paper_total"]), int(ledger["payload_total"]),
                          int(ledger.get("down_total", 0)), wire, int(meta.get("log_offset") or 0)),  # type: ignore[arg-type]
        last_grad_norm_sq=meta.get("last_grad_norm_sq"), effective_config=meta.get("effective_config"),
        x=ckpt.x, g=ckpt.g, rows=ckpt.rows, v=ckpt.extra.get("v"), g_tilde=ckpt.extra.get("g_tilde"),
        w=ckpt.extra.get("w"),
        ended=None if not ended else (ended["reason"], ended["message"]),
        log_end=meta.get("log_end", meta.get("log_offset")), layout=layout,
        state={k[len(checkpoint.STATE_PREFIX):]: a for k, a in ckpt.extra.items()
               if k.startswith(checkpoint.STATE_PREFIX)},
    )
    return run, used, warning
