"""A running master as a checkpoint and back: what ``--checkpoint`` writes and ``--resume`` reads (the file format
itself is ``checkpoint.py``). Everything the run needs to continue exactly: x, g, every g_i, EF21-HB's v and
EF21-BC's g̃, the round, the constants and the plan's facts, the counters and where the log ends."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ef21.compressors import max_entries
from ef21.config import RunConfig
from ef21.errors import UserError
from ef21.plan import make_plan
from ef21.stepsize import TheoryConstants

from . import checkpoint
from .options import FINISHED_REASONS

if TYPE_CHECKING:
    from .coordinator import Coordinator

log = logging.getLogger("ef21.master")


def counters(c: Coordinator) -> dict:
    """The counters a checkpoint restores, as they are now."""
    return {"round": c.round, "paper_total": c.ledger.paper_total, "payload_total": c.ledger.payload_total,
            "down_total": c.ledger.down_total, "wire": [c.wire_up, c.wire_down, c.eval_bytes],
            "log_offset": c.writer.offset}


def save(c: Coordinator, ended: tuple[str, str] | None = None) -> None:
    if c.opts.checkpoint is None or c.master is None or c.constants is None:
        return
    c.settle()
    c.writer.flush()
    # The state saved is x at ``c.round``. If that round was already counted and logged (the final round of a
    # run: it ends before its downlink), save the counters and the log offset from before it, so that a resumed
    # (extended) run redoes the round once instead of counting and logging it twice.
    counts = counters(c)
    if c.round_start is not None and c.round_start["round"] == c.round:
        counts = c.round_start
    meta = {
        "config": c.cfg.to_dict(), "run_id": c.run_id, "round": c.round,
        "reference": list(c.members.reference or ()), "constants": c.constants.__dict__, "d": c.d,
        "objective_id": c.members.objective_id, "plan": {"L_i": c.L_i, "n_samples": c.n_samples},
        "ledger": {k: counts[k] for k in ("paper_total", "payload_total", "down_total")},
        "wire": counts["wire"], "last_grad_norm_sq": c.last_grad_norm_sq,
        "log_offset": counts["log_offset"], "effective_config": c.opts.effective_config,
    }
    if ended is not None:
        meta["ended"] = {"reason": ended[0], "message": ended[1]}
        meta["log_end"] = c.writer.offset
    rep = c.master.replica
    extra = {} if rep.v is None else {"v": rep.v}
    if c.master.downlink is not None:
        extra["g_tilde"] = c.master.downlink.g_tilde
    checkpoint.save(c.opts.checkpoint, checkpoint.Checkpoint(meta, rep.x, rep.g, c.master.rows, extra))


def restore(c: Coordinator, path: Path) -> int | None:
    """Put the run saved at ``path`` (or its ``.prev``) into ``c``; returns where its log continues."""
    ckpt, used, warning = checkpoint.load_latest(path)
    if warning:
        log.warning("%s", warning)
    meta = ckpt.meta
    saved = RunConfig.from_dict(meta["config"])
    # Only the stopping rule may change on resume; anything else would make a different run.
    differ = [k for k, v in saved.to_dict().items() if k not in ("rounds", "tol") and v != c.cfg.to_dict()[k]]
    if differ:
        raise UserError(f"checkpoint {used} is of a different run: {', '.join(sorted(differ))} differ "
                        f"(checkpoint: {', '.join(f'{k}={saved.to_dict()[k]!r}' for k in sorted(differ))})")
    c.run_id = meta["run_id"]
    c.members.reference = tuple(meta["reference"])  # type: ignore[assignment]
    c.members.d = d = int(meta["d"]) if "d" in meta else int(meta["reference"][1])
    c.members.objective_id = meta.get("objective_id")
    c.constants = TheoryConstants(**meta["constants"])
    p = meta.get("plan", {})
    c.L_i, c.n_samples = p.get("L_i"), p.get("n_samples", [None] * c.n)
    c.plan = make_plan(c.cfg, d, c.constants.L, c.L_i, c.n_samples, constants=c.constants)
    c.book.participation = c.plan.participation
    c.book.max_entries = max_entries(c.plan.compressor, d)
    c.master = c.plan.master_node(ckpt.x, c.opts.rows_dtype)
    c.master.replica.g[:] = ckpt.g
    if "v" in ckpt.extra:
        c.master.replica.v = ckpt.extra["v"].copy()
    if c.master.downlink is not None:
        if "g_tilde" not in ckpt.extra:
            raise UserError(f"checkpoint {used}: EF21-BC state (g_tilde) missing")
        c.master.downlink.g_tilde[:] = ckpt.extra["g_tilde"]
    if ckpt.rows is not None:
        if c.master.rows is None or c.master.rows.shape != ckpt.rows.shape:
            raise UserError(f"checkpoint {used}: per-worker state of shape {ckpt.rows.shape} does not fit")
        c.master.rows[:] = ckpt.rows
    c.round = c.master.round = int(meta["round"])
    c.state_facts()
    c.ledger.paper_total = int(meta["ledger"]["paper_total"])
    c.ledger.payload_total = int(meta["ledger"]["payload_total"])
    c.ledger.down_total = int(meta["ledger"].get("down_total", 0))
    c.wire_up, c.wire_down, c.eval_bytes = (int(v) for v in meta["wire"])
    c.last_grad_norm_sq = meta.get("last_grad_norm_sq")
    c.state = "running"
    c.resumed_from = f"{used} (round {c.round})"
    c.state_detail = f"resumed from {c.resumed_from}; waiting for workers"
    c.rounds_started_at = time.time()
    ended = meta.get("ended")
    if ended and ended["reason"] in FINISHED_REASONS and (saved.rounds, saved.tol) == (c.cfg.rounds, c.cfg.tol):
        # Finished before a restart (e.g. a rescheduled pod): nothing to run again, and no worker to wait for; its
        # log keeps its last round (which an extended run would redo, hence the two offsets).
        c.finished_before = ended["message"]
        return meta.get("log_end", meta.get("log_offset"))
    log.info("resumed run %s at round %d from %s", c.run_id, c.round, used)
    return meta.get("log_offset")
