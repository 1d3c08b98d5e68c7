"""The single-process simulator: n ``WorkerNode``s and one ``MasterNode`` in a loop, no network."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ef21.errors import UserError
from ef21.methods.prox import parse_prox
from ef21.methods.stepsize import TheoryConstants
from ef21.problems.problem import Problem, build_problem

from .accounting import CommLedger, sends_selector
from .config import RunConfig, make_x0
from .nodes import MasterNode, WorkerNode, WorkerReport, is_eval_round, sends_eval_grad
from .plan import Plan, make_plan
from .records import RoundRecord, g_norm_sq, make_record, stop_check
from .tree import Tree

__all__ = ["RunResult", "plan_for", "simulate"]


@dataclass
class RunResult:
    x: np.ndarray
    records: list[RoundRecord]
    constants: TheoryConstants
    stop_reason: str  # "rounds", "tol" or "diverged"
    message: str = ""
    xs: list[np.ndarray] = field(default_factory=list)
    state: dict[str, np.ndarray] = field(default_factory=dict)
    """The master's replicated state beside x at the end (a model's buffers, the optimizer's state)."""


def plan_for(cfg: RunConfig, problem: Problem) -> Plan:
    return make_plan(cfg, problem.d, problem.L, problem.L_i, problem.n_samples, layout=problem.layout)


def summarize_round(t: int, reports: list[WorkerReport], ledger: CommLedger, t0: float,
                    master: MasterNode, prox: object | None, cfg: RunConfig, tree: Tree | None = None) -> RoundRecord:
    """The log line of a round: figures only when every worker evaluated (an evaluation round); ‖∇f‖² from the
    gradients a networked worker would send (``sends_eval_grad``), summed through the aggregators' ``tree``."""
    evaluated = all(r.grad is not None for r in reports)
    fs = [r.f for r in reports] if evaluated else None
    dist = [r.distortion for r in reports] if evaluated and all(r.distortion is not None for r in reports) else None
    grads = [r.grad if sends_eval_grad(cfg.eval_grad, cfg.tol, r.metrics is not None) else None
             for r in reports] if evaluated else None
    prox_at = None if prox is None else (prox, master.x, master.replica.x_step)
    grads_of = None
    if tree is not None and grads is not None and all(g is not None for g in grads):
        grads, grads_of = tree.grad_sums(grads), tree.n  # type: ignore[arg-type]
    return make_record(t, fs, dist, grads, ledger, time.perf_counter() - t0,  # type: ignore[arg-type]
                       g_norm_sq=g_norm_sq(master), prox_at=prox_at, grads_of=grads_of,
                       metrics=[r.metrics for r in reports] if evaluated else None)


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
    x0 = make_x0(cfg.x0, d, problem.x0, cfg.np_dtype)
    workers = [
        WorkerNode(plan.method, plan.compressor, obj, i, gamma=plan.gamma, x0=x0, setting=plan.worker_setting(i),
                   buffers=problem.buffers0)
        for i, obj in enumerate(problem.objectives)
    ]
    # Through aggregators the master sees block sums only, so it keeps no per-worker rows (ef21.engine.tree).
    tree = Tree(n, cfg.aggregators) if cfg.aggregators else None
    master = plan.master_node(x0, rows_dtype=np.float64 if tree is None else None, buffers=problem.buffers0)
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
        rec = summarize_round(t, reports, ledger, t0, master, prox, cfg, tree)
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
        down = master.fold(messages if tree is None else tree.fold(messages, d))
        ledger.record_down(t, down)
        master.apply(down)
        for i, w in enumerate(workers):
            w.apply(down, included=i not in left_out)
        records.append(rec)
        if on_round is not None:
            on_round(rec)
    state = {k: a.copy() for k, a in master.replica.extra_state().items()}
    return RunResult(master.x.copy(), records, plan.constants, stop, message, xs, state)
