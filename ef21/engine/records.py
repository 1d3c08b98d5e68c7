"""A round's line in the log, and when a run stops: the same rules for the simulator and the networked master."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ef21.methods.prox import gradient_mapping_sq

from .accounting import CommLedger
from .config import RunConfig
from .nodes import MasterNode

# Beyond this the run is declared divergent: nothing converging on these problems gets near it.
DIVERGENCE_LIMIT = 1e100


@dataclass(frozen=True)
class RoundRecord:
    """One line of the JSONL log: the state x^t and the communication spent to reach it."""

    round: int
    f: float
    grad_norm_sq: float
    G: float
    bits_per_worker: float
    payload_bits_per_worker: float
    elapsed_s: float
    g_norm_sq: float | None = None
    """‖g‖² of the aggregate that moved x^{t−1} to x^t (null at round 0)."""
    wire_bytes_up: int | None = None
    """Cumulative bytes of all uplink Update messages as received (networked runs only)."""
    wire_bytes_down: int | None = None
    """Cumulative bytes of all downlink RoundResult messages as sent, over all workers."""
    uplink_msg_bytes: float | None = None
    """Mean size of this round's Update messages."""
    eval_bytes: int | None = None
    """Cumulative bytes of the exact-gradient evaluations (not compressed communication)."""
    missing: list[int] | None = None
    """Ranks whose message this round left out (partial participation, stragglers); null when all took part."""
    bits_down_per_worker: float | None = None
    """Cumulative downlink bits each worker received, in the paper's convention (32 per value, round 0 excluded)."""
    grad_map_norm_sq: float | None = None
    """EF21-Prox: ‖G_γ(x^t)‖², the gradient mapping's squared norm (the stationarity measure with a prox)."""
    metrics: dict[str, float] | None = None
    """A plugin objective's metrics, averaged over the workers (evaluation rounds)."""
    grad_norm_skipped: bool | None = None
    """True on an evaluation round whose ‖∇f‖² was left out: the objective reports its own metrics and
    ``--eval-grad`` was not given, so no worker sent its dense gradient (null otherwise)."""

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def mean_gradient(grads: list[np.ndarray], n: int | None = None) -> np.ndarray:
    """(1/n)Σ∇f_i, summed in rank order; ``n`` given: ``grads`` are an aggregator tier's block sums over n ranks in
    all, added in block order (``ef21.engine.tree``)."""
    grad = np.zeros_like(grads[0])
    for g in grads:
        grad += g
    grad /= len(grads) if n is None else n
    return grad


def mean_metrics(metrics: list[dict[str, float] | None] | None) -> dict[str, float] | None:
    """The workers' metrics averaged name by name (in rank order), or None when some worker has none."""
    if not metrics or any(m is None for m in metrics):
        return None
    names = sorted(set().union(*metrics))  # type: ignore[arg-type]
    return {k: math.fsum(m.get(k, math.nan) for m in metrics) / len(metrics) for k in names}  # type: ignore[union-attr]


def make_record(
    t: int, fs: list[float] | None, distortions: list[float] | None, grads: list[np.ndarray | None] | None,
    ledger: CommLedger, elapsed_s: float, *, prox_at: tuple[object, np.ndarray, float] | None = None,
    metrics: list[dict[str, float] | None] | None = None, grads_of: int | None = None, **extra: object,
) -> RoundRecord:
    """A log line from the workers' figures, given in rank order. What is not known is null: ‖∇f‖² without
    every gradient, f and G in a round that left workers out or did not evaluate. ``prox_at``: (prox, x^t, γ)
    for EF21-Prox's gradient mapping. ``grads_of``: the gradients are block sums over this many ranks."""
    grad_norm_sq = grad_map = skipped = None
    if grads is not None and any(g is None for g in grads):
        grads, skipped = None, True  # left out by design (``sends_eval_grad``), said so in the log
    if grads is not None:
        grad = mean_gradient(grads, grads_of)  # type: ignore[arg-type]
        grad_norm_sq = float(grad @ grad)
        if prox_at is not None:
            prox, x, gamma = prox_at
            grad_map = gradient_mapping_sq(prox, x, grad, gamma)  # type: ignore[arg-type]
    return RoundRecord(
        round=t,
        f=None if fs is None else math.fsum(fs) / len(fs),  # type: ignore[arg-type]
        grad_norm_sq=grad_norm_sq,  # type: ignore[arg-type]
        G=None if distortions is None else math.fsum(distortions) / len(distortions),  # type: ignore[arg-type]
        bits_per_worker=ledger.bits_per_worker,
        payload_bits_per_worker=ledger.payload_bits_per_worker,
        elapsed_s=elapsed_s,
        bits_down_per_worker=ledger.bits_down_per_worker,
        grad_map_norm_sq=grad_map,
        metrics=mean_metrics(metrics),
        grad_norm_skipped=skipped,
        **extra,  # type: ignore[arg-type]
    )


def g_norm_sq(master: MasterNode) -> float | None:
    g = master.replica.g
    return None if master.round == 0 else float(g @ g)


def divergence(rec: RoundRecord, x_finite: bool) -> str | None:
    vals = (0.0 if rec.f is None else rec.f, 0.0 if rec.grad_norm_sq is None else rec.grad_norm_sq)
    if not all(math.isfinite(v) for v in vals) or not x_finite:
        return f"diverged at round {rec.round}: non-finite values (f={rec.f}, |grad f|^2={rec.grad_norm_sq})"
    if (rec.grad_norm_sq or 0.0) > DIVERGENCE_LIMIT or abs(rec.f or 0.0) > DIVERGENCE_LIMIT:
        return f"diverged at round {rec.round}: |grad f|^2 = {rec.grad_norm_sq:.3g}, f = {rec.f:.3g}"
    return None


def stop_check(rec: RoundRecord, x_finite: bool, cfg: RunConfig) -> tuple[str, str] | None:
    """Whether the run ends after this round: ("diverged" | "tol" | "rounds", message), else None.

    ``x_finite``: whether every entry of x^t is finite (the caller may have found out off its critical path).
    With a prox the tolerance applies to the gradient mapping ‖G_γ(x^t)‖² (‖∇f‖² need not vanish there)."""
    bad = divergence(rec, x_finite)
    if bad is not None:
        return "diverged", bad
    if cfg.prox is not None:
        if rec.grad_map_norm_sq is not None and rec.grad_map_norm_sq < cfg.tol:
            return "tol", f"|G_gamma|^2 = {rec.grad_map_norm_sq:.3g} < tol {cfg.tol:g} at round {rec.round}"
    elif rec.grad_norm_sq is not None and rec.grad_norm_sq < cfg.tol:
        return "tol", f"|grad f|^2 = {rec.grad_norm_sq:.3g} < tol {cfg.tol:g} at round {rec.round}"
    if rec.round >= cfg.rounds:
        return "rounds", f"{cfg.rounds} rounds done"
    return None
