"""The status document (``GET /status``, the ``Status`` call, ``ef21 status``): the run as an operator reads it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ef21.methods.variants import variant_name

if TYPE_CHECKING:
    from .coordinator import Coordinator


def status_document(c: Coordinator) -> dict:
    cfg, rec, k = c.cfg, c.latest, c.constants
    m = c.members
    now = time.time()
    rounds_done = c.rounds_completed
    rate = None
    if c.rounds_started_at is not None and rounds_done:
        rate = rounds_done / max(now - c.rounds_started_at, 1e-9)
    banned = m.bans.note(m.free_ranks()) if c.state in ("waiting", "running") else ""
    return {
        "run_id": c.run_id,
        "state": c.state,
        "detail": "; ".join(x for x in (c.state_detail, banned) if x),
        "round": c.round,
        "rounds_completed": rounds_done,
        "rounds_planned": cfg.rounds,
        "rounds_per_second": rate,
        "method": cfg.method,
        "variant": variant_name(cfg),
        "compressor": cfg.compressor,
        "k": cfg.k,
        "downlink_k": cfg.downlink_k,
        "estimator": cfg.estimator,
        "participation": None if c.plan is None else c.plan.participation,
        "objective": m.objective_id,
        "gamma": None if k is None else k.gamma,
        "constants": None if k is None else k.__dict__,
        "data": cfg.data,
        "problem": cfg.problem,
        "data_fingerprint": None if m.reference is None else m.reference[0],
        "workers_expected": c.n,
        "workers_connected": m.connected(),
        "workers": [m.sessions[r].describe() for r in sorted(m.sessions)],
        "round_timeout_s": c.opts.round_timeout,
        "min_workers": c.book.rules.min_workers,
        "stale_ranks": c.book.stale_ranks(),
        "bans": m.bans.describe(),
        "late_messages": c.book.late_messages,
        "refused_messages": dict(sorted(m.refused.items())),
        "endpoints": c.endpoints,
        "resumed_from": c.resumed_from,
        "effective_config": c.opts.effective_config,
        "latest": None if rec is None else {
            "round": rec.round, "f": rec.f, "grad_norm_sq": rec.grad_norm_sq,
            "last_grad_norm_sq": c.last_grad_norm_sq, "G": rec.G, "bits_per_worker": rec.bits_per_worker,
            "wire_bytes_up": rec.wire_bytes_up, "wire_bytes_down": rec.wire_bytes_down, "eval_bytes": rec.eval_bytes,
            "missing": rec.missing,
            "bits_down_per_worker": rec.bits_down_per_worker, "grad_map_norm_sq": rec.grad_map_norm_sq,
            "metrics": rec.metrics,
        },
        "g_norm_sq": c.g_norm,
        "stop_reason": c.stop_reason or None,
        "elapsed_s": round(now - c.started_at, 3),
    }
