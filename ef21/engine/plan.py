"""From a run configuration and the facts of the problem to everything both sides of a run agree on.

The simulator resolves a ``Plan`` from its in-process problem; the networked master resolves the same plan from
what the workers report at set-up (L_i, shard sizes, curvature), and hands each worker its part in the Start
message. Both go through these functions, so the stepsize, weights and every other constant are the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ef21.compression.compressors import Compressor, Float32Values, layerwise_topk, make_compressor, theory_alpha
from ef21.errors import UserError
from ef21.methods import DIANA, UNBIASED_METHODS, Method, MethodParams, make_method
from ef21.methods.downlink import BroadcastCompressor, PrimalBroadcast, primal_rule
from ef21.methods.estimators import Estimator, batch_size_for, default_page_p, make_estimator
from ef21.methods.optim import make_optimizer
from ef21.methods.participation import participation_count
from ef21.methods.prox import parse_prox
from ef21.methods.replica import StepRule
from ef21.methods.stepsize import FAMILY, TheoryConstants, family_stepsize, theory_stepsize
from ef21.methods.variants import extensions
from ef21.problems.layout import ModelLayout
from ef21.problems.problem import local_objective, quadratic_mean

from .config import RunConfig, make_x0
from .nodes import MasterNode, WorkerSetting
from .tree import check_tree


def resolve_method(cfg: RunConfig, d: int, layout: ModelLayout | None = None) -> tuple[Method, Compressor]:
    """The method (with its parameters resolved) and compressor of a config, checked against each other, against
    d and (layer-wise Top-k) against the model's tensors."""
    method = make_method(cfg.method)
    if cfg.k_per_tensor is not None and not method.uncompressed:
        comp = layerwise_topk(cfg.k_per_tensor, cfg.k_floor, [] if layout is None else layout.tensors(), d)
    else:
        comp = make_compressor("identity" if method.uncompressed else cfg.compressor, cfg.k, d)
    if cfg.encoding == "compact":
        comp = Float32Values(comp)
    if cfg.method in UNBIASED_METHODS:
        if comp.omega(d) is None:
            raise UserError(f"{cfg.method} needs an unbiased compressor (urandk, natural or identity); "
                            f"{comp.name} is biased (its theory takes E Q(v) = v)")
    elif method.needs_contractive and comp.alpha(d) is None:
        raise UserError(
            f"{cfg.method} needs a contractive compressor; {comp.name} is only unbiased "
            f"(use its contractive version, e.g. crandk for urandk)"
        )
    return make_method(cfg.method, method_params(cfg, comp, d)), comp


def method_params(cfg: RunConfig, comp: Compressor, d: int) -> MethodParams:
    """The methods' parameters, with the defaults that follow from the compressor: DIANA's α = 1/(ω+1) (the largest
    its theory allows), MARINA's p = 1/(ω+1) (k/d for urandk: the 3PC code's choice), EControl's η = α (its
    theory ties η to the compressor's δ = α; η well above α lets the error e_i grow: measured,
    docs/methods-family.md)."""
    omega = comp.omega(d)
    top = 1.0 if omega is None else 1.0 / (omega + 1.0)
    if cfg.method == "diana" and cfg.diana_alpha is not None and cfg.diana_alpha > top:
        raise UserError(f"--diana-alpha must lie in (0, 1/(omega+1)] = (0, {top:.6g}] for {comp.name} at d = {d}, "
                        f"got {cfg.diana_alpha}")
    return MethodParams(
        clag_zeta=cfg.clag_zeta,
        econtrol_eta=(comp.alpha(d) or 1.0) if cfg.econtrol_eta is None else cfg.econtrol_eta,
        diana_alpha=top if cfg.diana_alpha is None else cfg.diana_alpha,
        marina_p=top if cfg.marina_p is None else cfg.marina_p, seed=cfg.seed, full_start=cfg.init == "full")


def is_primal(cfg: RunConfig) -> bool:
    """EF21-P: the broadcast compresses the model, and the workers' replica is the shared point w."""
    return cfg.downlink_k is not None and cfg.downlink_method == "ef21-p"


def worker_rule(cfg: RunConfig, method: Method, gamma: float) -> StepRule:
    """The rule of a worker's replica: the model's (``step_rule``), or with EF21-P the shared point's."""
    rule = step_rule(cfg, method, gamma)
    return primal_rule(rule.x_step) if is_primal(cfg) else rule


def resolve_downlink(cfg: RunConfig, d: int) -> Compressor | None:
    if cfg.downlink_k is None:
        return None
    if cfg.downlink_k > d:
        raise UserError(f"--downlink-k must satisfy 0 < K <= d = {d}, got {cfg.downlink_k}")
    comp = make_compressor(cfg.downlink_compressor, cfg.downlink_k, d)
    if comp.alpha(d) is None:
        raise UserError(f"--downlink-compressor {cfg.downlink_compressor} is not contractive; "
                        f"{'EF21-P' if is_primal(cfg) else 'EF21-BC'} needs one")
    return comp


def smoothness_weights(L_i: list[float]) -> np.ndarray:
    """EF21-W's w_i = L_i / Σ_j L_j (summed in rank order)."""
    total = sum(L_i)
    return np.array([v / total for v in L_i])


def constants_for(cfg: RunConfig, method: Method, comp: Compressor, L: float | None, L_i: list[float] | None,
                  d: int) -> TheoryConstants:
    if cfg.method in FAMILY:
        p = method_params(cfg, comp, d)
        params = ({"zeta": p.clag_zeta} if cfg.method in ("clag", "lag") else {"eta": p.econtrol_eta}
                  if cfg.method == "econtrol" else {"diana_alpha": p.diana_alpha} if cfg.method == "diana"
                  else {"marina_p": p.marina_p})
        return family_stepsize(
            cfg.method, L, None if L_i is None else quadratic_mean(L_i), theory_alpha(comp, d), n=cfg.workers,
            omega=comp.omega(d) if cfg.method in UNBIASED_METHODS else None, params=params,
            multiplier=cfg.stepsize_mult, override=cfg.stepsize, primal=is_primal(cfg))
    ext = extensions(cfg)
    count = participation_count(cfg.participation, cfg.workers)
    if ext == ["P"]:  # EF21 with EF21-P: no theory pairs them; Theorem 2 of the uplink alone
        return theory_stepsize(L, None if L_i is None else quadratic_mean(L_i), theory_alpha(comp, d),
                               multiplier=cfg.stepsize_mult, override=cfg.stepsize,
                               note="EF21-P + EF21 is a heuristic: no bound covers it")
    note = "/".join(e for e in ext if e not in ("PP", "W"))
    if cfg.estimator in ("sgd", "page"):
        note = "/".join(filter(None, [note, cfg.estimator.upper()]))
    if note:
        note = f"the authors' code's choice for {note}"
    return theory_stepsize(
        L,
        None if L_i is None else quadratic_mean(L_i),
        theory_alpha(comp, d),
        mu=cfg.mu,
        uncompressed=method.uncompressed,
        multiplier=cfg.stepsize_mult,
        override=cfg.stepsize,
        L_am=None if L_i is None else sum(L_i) / len(L_i),
        participation=None if count is None else count / cfg.workers,
        weighted=cfg.weights == "smoothness",
        note=note,
    )


@dataclass(frozen=True, eq=False)
class Plan:
    cfg: RunConfig
    d: int
    method: Method
    compressor: Compressor
    constants: TheoryConstants
    rule: StepRule
    estimator: Estimator
    taus: list[int]
    page_p: float
    weights: np.ndarray | None
    participation: int | None
    downlink: Compressor | None
    layout: ModelLayout | None = None

    @property
    def gamma(self) -> float:
        return self.constants.gamma

    @property
    def primal(self) -> bool:
        return is_primal(self.cfg)

    def worker_setting(self, rank: int) -> WorkerSetting:
        scale = 1.0 if self.weights is None else 1.0 / (self.cfg.workers * float(self.weights[rank]))
        return WorkerSetting(
            gamma=self.gamma, rule=primal_rule(self.rule.x_step) if self.primal else self.rule,
            init="full" if self.cfg.init == "full" else "compressed",
            seed=self.cfg.seed, n=self.cfg.workers, estimator=self.estimator, tau=self.taus[rank],
            page_p=self.page_p, grad_scale=scale, participation=self.participation)

    def master_node(self, x0: np.ndarray, rows_dtype: object = np.float64,
                    buffers: np.ndarray | None = None) -> MasterNode:
        if rows_dtype is not None and np.dtype(rows_dtype).itemsize > x0.dtype.itemsize:
            rows_dtype = x0.dtype  # ``full`` rows of a float32 run are float32: the workers' g_i, exactly
        if self.downlink is not None and self.primal:
            primal = PrimalBroadcast.start(self.downlink, x0, self.rule.x_step, self.cfg.seed)
            return MasterNode(self.method, self.cfg.workers, x0, gamma=self.gamma, rule=self.rule,
                              rows_dtype=rows_dtype, primal=primal)
        bc = None if self.downlink is None else BroadcastCompressor.start(self.downlink, self.d, self.cfg.seed, x0.dtype)
        return MasterNode(self.method, self.cfg.workers, x0, gamma=self.gamma, rule=self.rule,
                          weights=self.weights, downlink=bc, rows_dtype=rows_dtype, buffers=buffers)


def step_rule(cfg: RunConfig, method: Method, gamma: float) -> StepRule:
    """How every replica moves x: γ (1 for EF, whose messages carry it), EF21-HB's η, EF21-Prox's operator, or the
    master's optimizer on g with peak learning rate γ (then momentum is the optimizer's), or DIANA's shifted step."""
    if cfg.optimizer is not None:
        return StepRule(gamma, optimizer=make_optimizer(cfg, gamma))
    prox = None if cfg.prox is None else parse_prox(cfg.prox)
    return StepRule(1.0 if method.gamma_in_message else gamma, cfg.momentum, prox,
                    shift=method.alpha if isinstance(method, DIANA) else None)


def make_plan(cfg: RunConfig, d: int, L: float | None, L_i: list[float] | None,
              n_samples: list[int | None], constants: TheoryConstants | None = None,
              layout: ModelLayout | None = None) -> Plan:
    """``L_i``: every worker's smoothness (None if some objective has none); ``n_samples``: every shard's rows
    (None where the objective has no samples). ``constants``: those of a run being resumed (kept as saved).
    ``layout``: the model's tensors, when the objective is a model."""
    method, comp = resolve_method(cfg, d, layout)
    downlink = resolve_downlink(cfg, d)
    if cfg.weights == "smoothness" and L_i is None:
        raise UserError("--weights smoothness needs every worker's L_i, and the objective gives none")
    if is_primal(cfg) and layout is not None and layout.buffer_size > 0:
        # The workers hold w, not x: a model's buffers would need a broadcast of their own beside C_P(x − w).
        raise UserError("--downlink-method ef21-p does not carry a model's buffers (BatchNorm's statistics); "
                        "use a model without buffers or --downlink-method ef21-bc")
    if cfg.aggregators:
        check_tree(cfg.method, weighted=cfg.weights == "smoothness", buffers=layout is not None and layout.buffer_size > 0)
    consts = constants if constants is not None else constants_for(cfg, method, comp, L, L_i, d)
    rule = step_rule(cfg, method, consts.gamma)
    estimator = make_estimator(cfg.estimator, cfg.sgdm_eta)
    taus = [batch_size_for(m, cfg.batch_size, cfg.batch_fraction, r) if estimator.stochastic else 0
            for r, m in enumerate(n_samples)]
    page_p = 1.0
    if cfg.estimator == "page":
        page_p = cfg.page_p if cfg.page_p is not None else default_page_p(taus, [int(m or 0) for m in n_samples])
    weights = smoothness_weights(L_i) if cfg.weights == "smoothness" and L_i is not None else None
    return Plan(cfg, d, method, comp, consts, rule, estimator, taus, page_p, weights,
                participation_count(cfg.participation, cfg.workers), downlink, layout)


def check_objective(cfg: RunConfig) -> None:
    """Build rank 0's objective and evaluate it once at x⁰: what ``ef21 run`` does before it starts n workers, so
    that an objective that cannot work (fails to import, raises, wrong shape, NaN, no L without --stepsize) is
    one error line, not n."""
    obj = local_objective(cfg, 0)
    if cfg.stepsize is None and obj.smoothness() is None:
        raise UserError(f"objective {cfg.objective} gives no smoothness constant (no smoothness() method), so there "
                        f"is no theory stepsize: give --stepsize")
    x0 = make_x0(cfg.x0, obj.d, obj.x0() if hasattr(obj, "x0") else None)
    resolve_method(cfg, obj.d, getattr(obj, "layout", lambda: None)())  # e.g. --k-per-tensor against the tensors
    obj.value_and_grad(x0)
    if cfg.estimator != "full":
        batch_size_for(getattr(obj, "n_samples", None), cfg.batch_size, cfg.batch_fraction, 0)
