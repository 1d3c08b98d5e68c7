"""The single-process simulator: n ``WorkerNode``s and one ``MasterNode`` in a loop, no network."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .accounting import CommLedger, sends_selector
from .compressors import Compressor, Float32Values, make_compressor, theory_alpha
from .config import RunConfig, make_x0
from .engine import MasterNode, WorkerNode, WorkerReport
from .errors import UserError
from .methods import Method, make_method
from .problem import Problem, build_problem
from .stepsize import TheoryConstants, theory_stepsize

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


def resolve_method(cfg: RunConfig, d: int) -> tuple[Method, Compressor]:
    """The method and compressor of a config, checked against each other and against d."""
    method = make_method(cfg.method)
    comp = make_compressor("identity" if method.uncompressed else cfg.compressor, cfg.k, d)
    if cfg.encoding == "compact":
        comp = Float32Values(comp)
    if method.needs_contractive and comp.alpha(d) is None:
        raise UserError(
            f"{cfg.method} needs a contractive compressor; {comp.name} is only unbiased "
            f"(use its contractive version, e.g. crandk for urandk)"
        )
    return method, comp


def constants_for(cfg: RunConfig, method: Method, comp: Compressor, L: float, L_tilde: float, d: int) -> TheoryConstants:
    return theory_stepsize(
        L,
        L_tilde,
        theory_alpha(comp, d),
        mu=cfg.mu,
        uncompressed=method.uncompressed,
        multiplier=cfg.stepsize_mult,
        override=cfg.stepsize,
    )


def make_record(
    t: int, fs: list[float] | None, distortions: list[float] | None, grads: list[np.ndarray] | None,
    ledger: CommLedger, elapsed_s: float, **extra: object,
) -> RoundRecord:
    """A log line from the workers' figures, given in rank order. What is not known is null: ‖∇f‖² without
    every gradient, f and G in a round that left workers out."""
    grad_norm_sq = None
    if grads is not None:
        grad = np.zeros_like(grads[0])
        for g in grads:
            grad += g
        grad /= len(grads)
        grad_norm_sq = float(grad @ grad)
    return RoundRecord(
        round=t,
        f=None if fs is None else math.fsum(fs) / len(fs),  # type: ignore[arg-type]
        grad_norm_sq=grad_norm_sq,  # type: ignore[arg-type]
        G=None if distortions is None else math.fsum(distortions) / len(distortions),  # type: ignore[arg-type]
        bits_per_worker=ledger.bits_per_worker,
        payload_bits_per_worker=ledger.payload_bits_per_worker,
        elapsed_s=elapsed_s,
        **extra,  # type: ignore[arg-type]
    )


def summarize_round(t: int, reports: list[WorkerReport], ledger: CommLedger, t0: float,
                    master: MasterNode) -> RoundRecord:
    return make_record(t, [r.f for r in reports], [r.distortion for r in reports], [r.grad for r in reports],
                       ledger, time.perf_counter() - t0, g_norm_sq=g_norm_sq(master))


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

    ``x_finite``: whether every entry of x^t is finite (the caller may have found out off its critical path)."""
    bad = divergence(rec, x_finite)
    if bad is not None:
        return "diverged", bad
    if rec.grad_norm_sq is not None and rec.grad_norm_sq < cfg.tol:
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
) -> RunResult:
    """Run ``cfg`` in one process. ``keep_iterates`` keeps x^t of every round (for tests and comparisons).

    ``missing`` replays a participation pattern (round → ranks left out, e.g. read from a networked run's log):
    those workers still compute, but their messages are dropped and they keep their state (EF21-PP).
    """
    problem = problem or build_problem(cfg)
    d, n = problem.d, problem.n
    method, comp = resolve_method(cfg, d)
    consts = constants_for(cfg, method, comp, problem.L, problem.L_tilde, d)
    x0 = make_x0(cfg.x0, d)
    init = "full" if cfg.init == "full" else "compressed"
    workers = [
        WorkerNode(method, comp, obj, i, gamma=consts.gamma, x0=x0, init=init, seed=cfg.seed)
        for i, obj in enumerate(problem.objectives)
    ]
    master = MasterNode(method, n, x0, gamma=consts.gamma)
    ledger = CommLedger(n, selector=sends_selector(method))
    records: list[RoundRecord] = []
    xs: list[np.ndarray] = []
    t0 = time.perf_counter()
    stop, message = "rounds", ""
    missing = missing or {}
    if missing and not method.tolerates_missing:
        raise UserError(f"{cfg.method} cannot leave workers out of a round (only ef21 and ef21plus can)")
    for t in range(cfg.rounds + 1):
        if keep_iterates:
            xs.append(master.x.copy())
        reports = [w.step() for w in workers]
        left_out = set(missing.get(t, ()))
        messages = [None if i in left_out else r.message for i, r in enumerate(reports)]
        ledger.record(t, messages)
        rec = summarize_round(t, reports, ledger, t0, master)
        if left_out:
            # G is of the estimates the workers hold after the round; a left-out worker keeps its previous one,
            # not the one its report measured, so G is unknown here (as in a networked run's partial round).
            rec = dataclasses.replace(rec, missing=sorted(left_out), G=None)
        records.append(rec)
        if on_round is not None:
            on_round(rec)
        ended = stop_check(rec, bool(np.isfinite(master.x).all()), cfg)
        if ended is not None:
            stop, message = ended
            break
        down = master.aggregate(messages)
        for i, w in enumerate(workers):
            w.apply(down, included=i not in left_out)
    return RunResult(master.x.copy(), records, consts, stop, message, xs)
