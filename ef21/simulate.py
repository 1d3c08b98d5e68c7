"""The single-process simulator: n ``WorkerNode``s and one ``MasterNode`` in a loop, no network."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .accounting import CommLedger, sends_selector
from .config import RunConfig, make_x0
from .engine import MasterNode, WorkerNode, WorkerReport, is_eval_round
from .errors import UserError
from .plan import Plan, constants_for, make_plan, resolve_method
from .problem import Problem, build_problem
from .prox import gradient_mapping_sq, parse_prox
from .stepsize import TheoryConstants

__all__ = ["RoundRecord", "RunResult", "constants_for", "make_record", "resolve_method", "simulate", "stop_check",
           "plan_for"]

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

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class RunResult:
    x: np.ndarray
    records: list[RoundRecord]
    constants: TheoryConstants
    stop_reason: str  # "rounds", "tol" or "diverged"
    message: str = ""
    xs: list[np.ndarray] = field(default_factory=list)


def plan_for(cfg: RunConfig, problem: Problem) -> Plan:
    return make_plan(cfg, problem.d, problem.L, problem.L_i, problem.n_samples)


def mean_gradient(grads: list[np.ndarray]) -> np.ndarray:
    """(1/n)Σ∇f_i, summed in rank order."""
    grad = np.zeros_like(grads[0])
    for g in grads:
        grad += g
    grad /= len(grads)
    return grad


def mean_metrics(metrics: list[dict[str, float] | None] | None) -> dict[str, float] | None:
    """The workers' metrics averaged name by name (in rank order), or None when some worker has none."""
    if not metrics or any(m is None for m in metrics):
        return None
    names = sorted(set().union(*metrics))  # type: ignore[arg-type]
    return {k: math.fsum(m.get(k, math.nan) for m in metrics) / len(metrics) for k in names}  # type: ignore[union-attr]


def make_record(
    t: int, fs: list[float] | None, distortions: list[float] | None, grads: list[np.ndarray] | None,
    ledger: CommLedger, elapsed_s: float, *, prox_at: tuple[object, np.ndarray, float] | None = None,
    metrics: list[dict[str, float] | None] | None = None, **extra: object,
) -> RoundRecord:
    """A log line from the workers' figures, given in rank order. What is not known is null: ‖∇f‖² without
    every gradient, f and G in a round that left workers out or did not evaluate. ``prox_at``: (prox, x^t, γ)
    for EF21-Prox's gradient mapping."""
    grad_norm_sq = grad_map = None
    if grads is not None:
        grad = mean_gradient(grads)
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
        **extra,  # type: ignore[arg-type]
    )


def summarize_round(t: int, reports: list[WorkerReport], ledger: CommLedger, t0: float,
                    master: MasterNode, prox: object | None = None) -> RoundRecord:
    """The log line of a round: figures only when every worker evaluated (an evaluation round)."""
    evaluated = all(r.grad is not None for r in reports)
    fs = [r.f for r in reports] if evaluated else None
    dist = [r.distortion for r in reports] if evaluated and all(r.distortion is not None for r in reports) else None
    grads = [r.grad for r in reports] if evaluated else None
    prox_at = None if prox is None else (prox, master.x, master.replica.x_step)
    return make_record(t, fs, dist, grads, ledger, time.perf_counter() - t0,  # type: ignore[arg-type]
                       g_norm_sq=g_norm_sq(master), prox_at=prox_at,
                       metrics=[r.metrics for r in reports] if evaluated else None)


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


def simulate(
    cfg: RunConfig,
    problem: Problem | None = None,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    keep_iterates: bool = False,
    missing: dict[int, list[int]] | None = None,
    eval_every: int = 1,
) -> RunResult:
    """Run ``cfg`` in one process. ``keep_iterates`` keeps x^t of every round (for tests and comparisons).

    ``missing`` replays a participation pattern (round → ranks left out, e.g. read from a networked run's log):
    those workers still compute, but their messages are dropped and they keep their state (EF21-PP). Sampled
    participation (``cfg.participation``) leaves out the ranks its draw leaves out, as the service does.
    ``eval_every``: f, ‖∇f‖² and G are evaluated (and logged) every this many rounds and at the last, as the
    networked master's ``--eval-every`` does; the tolerance can only stop the run on those rounds.
    """
    problem = problem or build_problem(cfg)
    d, n = problem.d, problem.n
    plan = plan_for(cfg, problem)
    x0 = make_x0(cfg.x0, d, problem.x0)
    workers = [
        WorkerNode(plan.method, plan.compressor, obj, i, gamma=plan.gamma, x0=x0, setting=plan.worker_setting(i))
        for i, obj in enumerate(problem.objectives)
    ]
    master = plan.master_node(x0)
    prox = None if cfg.prox is None else parse_prox(cfg.prox)
    ledger = CommLedger(n, selector=sends_selector(plan.method))
    records: list[RoundRecord] = []
    xs: list[np.ndarray] = []
    t0 = time.perf_counter()
    stop, message = "rounds", ""
    missing = missing or {}
    if missing and not plan.method.tolerates_missing:
        raise UserError(f"{cfg.method} cannot leave workers out of a round (only ef21 and ef21plus can)")
    for t in range(cfg.rounds + 1):
        if keep_iterates:
            xs.append(master.x.copy())
        evaluate = is_eval_round(t, eval_every, cfg.rounds)
        reports = [w.step(evaluate=evaluate) for w in workers]
        replayed = set(missing.get(t, ()))
        sampled_out = {i for i, r in enumerate(reports) if r.message is None}
        left_out = replayed | sampled_out
        messages = [None if i in left_out else r.message for i, r in enumerate(reports)]
        ledger.record(t, messages)
        rec = summarize_round(t, reports, ledger, t0, master, prox)
        if left_out:
            rec = dataclasses.replace(rec, missing=sorted(left_out))
            if replayed - sampled_out:
                # G is of the estimates the workers hold after the round; a worker whose message was dropped
                # keeps its previous estimate, not the one its report measured, so G is unknown here (as in a
                # networked run's partial round). A worker that sampling left out measured its kept estimate.
                rec = dataclasses.replace(rec, G=None)
        ended = stop_check(rec, bool(np.isfinite(master.x).all()), cfg)
        if ended is not None:
            records.append(rec)
            if on_round is not None:
                on_round(rec)
            stop, message = ended
            break
        down = master.fold(messages)
        ledger.record_down(t, down)
        master.apply(down)
        for i, w in enumerate(workers):
            w.apply(down, included=i not in left_out)
        records.append(rec)
        if on_round is not None:
            on_round(rec)
    return RunResult(master.x.copy(), records, plan.constants, stop, message, xs)
