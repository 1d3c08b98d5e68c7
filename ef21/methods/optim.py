"""The master's step on the aggregate g as the optimizers people train networks with: SGD with momentum and
Nesterov, Adam, AdamW, global-norm clipping, and a learning-rate schedule (constant or cosine, either after a
linear warm-up).

Shaped like optax: a ``Transform`` is a pair of pure functions, ``init(d) -> state`` and
``update(u, state, x) -> (u, state)``, with all state explicit (named float64 arrays, the step count included), and
an optimizer is a ``chain`` of them — clip → (weight decay) → momentum or Adam → (decoupled weight decay) →
−lr_t — applied to the aggregate g. Every replica (the master's and each worker's) runs the same chain on the same
g with this code, so they all hold the same x and the same optimizer state (``ef21.methods.replica``); the state
travels with a Start or Resync and sits in checkpoints, so a replacement worker or a resumed master continues
exactly.

The arithmetic follows ``torch.optim`` (``SGD``, ``Adam``, ``AdamW``), ``torch.nn.utils.clip_grad_norm_`` and
``torch.optim.lr_scheduler`` (``LinearLR`` then ``CosineAnnealingLR`` in a ``SequentialLR``), so a recipe moves
over unchanged; ``tests/test_optim.py`` feeds both the same g sequence and compares the iterates.

What the theory covers: EF21's analysis is for x ← x − γg with a constant γ (EF21-HB: SGD with momentum), so
plain SGD, SGD with momentum and coupled (L2) weight decay — EF21 on f + (λ/2)‖x‖², whose extra gradient the master
adds exactly — are covered; Adam, AdamW, Nesterov, clipping and warm-up are heuristics (docs/pytorch.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol

import numpy as np

from ef21.errors import UserError

State = dict[str, np.ndarray]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")


class Transform(NamedTuple):
    """A pure update of the direction u (the aggregate g at the start of a chain)."""

    init: Callable[[int], State]
    update: Callable[[np.ndarray, State, np.ndarray], tuple[np.ndarray, State]]


def _count(state: State) -> int:
    return int(state["count"][0])


def _counted(c: int) -> np.ndarray:
    # Float64 like every other piece of state: it travels and checksums as one (exact below 2^53).
    return np.array([float(c)])


def chain(*transforms: Transform) -> Transform:
    """Apply ``transforms`` in order; the state is theirs, each name prefixed with its position."""

    def init(d: int) -> State:
        return {f"{i}.{k}": v for i, t in enumerate(transforms) for k, v in t.init(d).items()}

    def update(u: np.ndarray, state: State, x: np.ndarray) -> tuple[np.ndarray, State]:
        out: State = {}
        for i, t in enumerate(transforms):
            prefix = f"{i}."
            mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            u, new = t.update(u, mine, x)
            out.update({prefix + k: v for k, v in new.items()})
        return u, out

    return Transform(init, update)


def clip_by_global_norm(max_norm: float) -> Transform:
    """u · min(1, max_norm/(‖u‖ + 1e-6)): ``torch.nn.utils.clip_grad_norm_``, whose 1e-6 keeps a zero norm finite."""

    def update(u: np.ndarray, state: State, x: np.ndarray) -> tuple[np.ndarray, State]:
        norm = math.sqrt(float(u @ u))
        return u * min(1.0, max_norm / (norm + 1e-6)), state

    return Transform(lambda d: {}, update)


def add_weight_decay(wd: float) -> Transform:
    """u + λx: L2 weight decay before the optimizer (torch's ``weight_decay`` of SGD and Adam), or AdamW's decoupled
    decay after it (then −lr_t·(Adam's direction + λx): torch's x·(1 − lr·λ) step)."""

    def update(u: np.ndarray, state: State, x: np.ndarray) -> tuple[np.ndarray, State]:
        return u + wd * x, state

    return Transform(lambda d: {}, update)


def trace(momentum: float, nesterov: bool = False) -> Transform:
    """SGD's momentum buffer b ← μb + u (b = u on the first step, as torch), the direction b or, with Nesterov,
    u + μb. Without Nesterov this is EF21-HB's v (``Replica``'s heavy ball), step for step."""

    def init(d: int) -> State:
        return {"trace": np.zeros(d), "count": _counted(0)}

    def update(u: np.ndarray, state: State, x: np.ndarray) -> tuple[np.ndarray, State]:
        c = _count(state)
        buf = u.copy() if c == 0 else momentum * state["trace"] + u
        out = u + momentum * buf if nesterov else buf
        return out, {"trace": buf, "count": _counted(c + 1)}

    return Transform(init, update)


def scale_by_adam(beta1: float, beta2: float, eps: float) -> Transform:
    """Adam's direction m̂/(√v̂ + ε) with torch's arithmetic: m ← m + (1 − β₁)(u − m) (its ``lerp``),
    v ← β₂v + (1 − β₂)u², and the bias corrections of step t = count + 1."""

    def init(d: int) -> State:
        return {"mu": np.zeros(d), "nu": np.zeros(d), "count": _counted(0)}

    def update(u: np.ndarray, state: State, x: np.ndarray) -> tuple[np.ndarray, State]:
        t = _count(state) + 1
        mu = state["mu"] + (1 - beta1) * (u - state["mu"])
        nu = beta2 * state["nu"] + (1 - beta2) * u * u
        bc1 = 1 - beta1**t
        bc2 = 1 - beta2**t
        direction = mu / (np.sqrt(nu) / math.sqrt(bc2) + eps) / bc1
        return direction, {"mu": mu, "nu": nu, "count": _counted(t)}

    return Transform(init, update)


@dataclass(frozen=True)
class LrSchedule:
    """lr_t of step t = 0, 1, …: ``warmup`` steps of a linear ramp peak·(t + 1)/(warmup + 1) (torch's ``LinearLR``
    from 1/(warmup + 1) to 1 over ``warmup`` steps, so no step is wasted at 0 and the peak comes where the ramp
    ends), then ``constant`` at the peak or ``cosine`` from the peak down to ``end`` at step ``horizon``
    (``CosineAnnealingLR`` with T_max = horizon − warmup), staying at ``end`` after it."""

    kind: str
    peak: float
    warmup: int = 0
    horizon: int = 0
    end: float = 0.0

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return self.peak * (t + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return self.peak
        span = self.horizon - self.warmup
        progress = min(t - self.warmup, span) / span
        return self.end + (self.peak - self.end) * (1 + math.cos(math.pi * progress)) / 2

    def describe(self) -> str:
        ramp = f"{self.warmup} warm-up rounds, then " if self.warmup else ""
        if self.kind == "constant":
            return f"{ramp}constant lr {self.peak:.6g}"
        return f"{ramp}cosine from {self.peak:.6g} to {self.end:.6g} at round {self.horizon}"


def scale_by_schedule(schedule: Callable[[int], float]) -> Transform:
    """−lr_t·u, the step x + u of an ``update``; t counts the steps taken."""

    def init(d: int) -> State:
        return {"count": _counted(0)}

    def update(u: np.ndarray, state: State, x: np.ndarray) -> tuple[np.ndarray, State]:
        c = _count(state)
        return -schedule(c) * u, {"count": _counted(c + 1)}

    return Transform(init, update)


class OptimizerSpec(Protocol):
    """The settings that decide the optimizer (``ef21.engine.config.RunConfig`` has them all)."""

    @property
    def optimizer(self) -> str | None: ...
    @property
    def momentum(self) -> float: ...
    @property
    def nesterov(self) -> bool: ...
    @property
    def beta1(self) -> float: ...
    @property
    def beta2(self) -> float: ...
    @property
    def eps(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def clip_norm(self) -> float | None: ...
    @property
    def lr_schedule(self) -> str: ...
    @property
    def warmup(self) -> int: ...
    @property
    def decay_rounds(self) -> int | None: ...
    @property
    def min_lr(self) -> float: ...
    @property
    def rounds(self) -> int: ...
    @property
    def method(self) -> str: ...
    @property
    def prox(self) -> str | None: ...
    @property
    def mu(self) -> float | None: ...
    @property
    def stepsize(self) -> float | None: ...


def uses_optimizer(cfg: OptimizerSpec) -> bool:
    return cfg.optimizer is not None


def schedule_of(cfg: OptimizerSpec, lr: float) -> LrSchedule:
    horizon = cfg.decay_rounds if cfg.decay_rounds is not None else cfg.rounds
    return LrSchedule(cfg.lr_schedule, lr, cfg.warmup, horizon, cfg.min_lr)


def make_optimizer(cfg: OptimizerSpec, lr: float) -> Transform:
    """The chain of ``cfg``'s optimizer with peak learning rate ``lr`` (the run's stepsize γ)."""
    assert cfg.optimizer is not None
    parts = [] if cfg.clip_norm is None else [clip_by_global_norm(cfg.clip_norm)]
    if cfg.optimizer in ("sgd", "adam") and cfg.weight_decay:
        parts.append(add_weight_decay(cfg.weight_decay))
    if cfg.optimizer == "sgd":
        if cfg.momentum > 0.0:
            parts.append(trace(cfg.momentum, cfg.nesterov))
    else:
        parts.append(scale_by_adam(cfg.beta1, cfg.beta2, cfg.eps))
        if cfg.optimizer == "adamw" and cfg.weight_decay:
            parts.append(add_weight_decay(cfg.weight_decay))
    parts.append(scale_by_schedule(schedule_of(cfg, lr)))
    return chain(*parts)


def describe(cfg: OptimizerSpec, lr: float) -> str:
    """One line: the optimizer and its schedule, for the run's header."""
    assert cfg.optimizer is not None
    bits = [cfg.optimizer]
    if cfg.optimizer == "sgd" and cfg.momentum:
        bits.append(f"momentum {cfg.momentum:g}" + (" nesterov" if cfg.nesterov else ""))
    if cfg.optimizer != "sgd":
        bits.append(f"betas ({cfg.beta1:g}, {cfg.beta2:g}) eps {cfg.eps:g}")
    if cfg.weight_decay:
        bits.append(f"weight decay {cfg.weight_decay:g}" + (" (decoupled)" if cfg.optimizer == "adamw" else ""))
    if cfg.clip_norm is not None:
        bits.append(f"clip {cfg.clip_norm:g}")
    return f"optimizer {', '.join(bits)}; {schedule_of(cfg, lr).describe()}"


def check_optimizer(cfg: OptimizerSpec) -> None:
    """The optimizer's flags on their own and against the method: one-line refusals."""
    opt = cfg.optimizer
    given = [flag for flag, on in (("--nesterov", cfg.nesterov), ("--weight-decay", cfg.weight_decay != 0.0),
                                   ("--clip-norm", cfg.clip_norm is not None),
                                   ("--lr-schedule", cfg.lr_schedule != "constant"), ("--warmup", cfg.warmup != 0),
                                   ("--decay-rounds", cfg.decay_rounds is not None), ("--min-lr", cfg.min_lr != 0.0))
             if on]
    if opt is None:
        if given:
            raise UserError(f"{given[0]} is an option of --optimizer ({', '.join(OPTIMIZERS)}); give one")
        return
    if opt not in OPTIMIZERS:
        raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {opt!r}")
    if cfg.method == "ef":
        raise UserError("--optimizer does not combine with --method ef: EF's messages carry γ inside the compressed "
                        "vector, so there is no aggregate gradient for an optimizer to transform (use ef21)")
    if cfg.prox is not None:
        raise UserError("--optimizer does not combine with --prox: EF21-Prox's step is x <- prox(x - gamma g); "
                        "drop one of them")
    if cfg.mu is not None:
        raise UserError("--mu (the PL stepsize of Theorem 3) is for the plain step, not --optimizer")
    if opt != "sgd" and cfg.momentum > 0.0:
        raise UserError(f"--momentum is SGD's; --optimizer {opt} has --beta1 (default 0.9)")
    if cfg.nesterov and (opt != "sgd" or cfg.momentum <= 0.0):
        raise UserError("--nesterov needs --optimizer sgd with --momentum > 0")
    if opt != "sgd" and cfg.stepsize is None:
        raise UserError(f"--optimizer {opt} needs --stepsize (its learning rate): the theory stepsize is SGD's")
    for name, v, lo, hi in (("--beta1", cfg.beta1, 0.0, 1.0), ("--beta2", cfg.beta2, 0.0, 1.0)):
        if not lo <= v < hi:
            raise UserError(f"{name} must lie in [0, 1), got {v}")
    if not (math.isfinite(cfg.eps) and cfg.eps > 0):
        raise UserError(f"--eps must be positive, got {cfg.eps}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise UserError(f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    if cfg.clip_norm is not None and not (math.isfinite(cfg.clip_norm) and cfg.clip_norm > 0):
        raise UserError(f"--clip-norm must be positive, got {cfg.clip_norm}")
    if cfg.lr_schedule not in SCHEDULES:
        raise UserError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {cfg.lr_schedule!r}")
    if cfg.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {cfg.warmup}")
    if not (math.isfinite(cfg.min_lr) and cfg.min_lr >= 0):
        raise UserError(f"--min-lr must be >= 0, got {cfg.min_lr}")
    if cfg.lr_schedule == "cosine":
        horizon = cfg.decay_rounds if cfg.decay_rounds is not None else cfg.rounds
        if horizon <= cfg.warmup:
            raise UserError(f"--lr-schedule cosine decays after the warm-up: the horizon ({horizon} rounds, "
                            f"--decay-rounds or --rounds) must exceed --warmup {cfg.warmup}")
    elif cfg.decay_rounds is not None or cfg.min_lr != 0.0:
        raise UserError("--decay-rounds and --min-lr are options of --lr-schedule cosine")
