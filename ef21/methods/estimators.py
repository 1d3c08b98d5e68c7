"""Gradient estimators: what a worker compresses against, in place of its full local gradient ∇f_i.

- ``full``: ∇f_i(x) (EF21 as in the paper).
- ``sgd``: the mean gradient over a minibatch of τ_i rows drawn without replacement from the shard, the
  regularizer taken whole (EF21-SGD; method doc §3.6).
- ``page``: v ← ∇f_i(x) with probability p (one coin for all workers), else v ← v + ĝ_I(x) − ĝ_I(x_prev) with the
  same minibatch I at both points (EF21-PAGE; §3.7).
- ``sgdm``: v ← (1 − η)v + η·ĝ_I(x) (EF21-SGDM; §3.13).

Round 0 always uses the full local gradient (g_i⁰ = ∇f_i(x⁰) and v⁰ = g_i⁰, as the official code does). Every
random choice comes from generators derived from (seed, rank, round) — PAGE's coin from (seed, round) alone, so
every worker draws the same coin without being told — so a run replays exactly and a replacement worker continues
the same minibatch stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ef21.errors import UserError

from .streams import BATCH_STREAM, PAGE_COIN_STREAM


def batch_rng(seed: int, rank: int, round_: int) -> np.random.Generator:
    return np.random.default_rng([seed, rank, round_, BATCH_STREAM])


def page_coin(seed: int, round_: int, p: float) -> bool:
    """PAGE's shared coin: True (a full-gradient round) with probability p, the same on every worker."""
    return bool(np.random.default_rng([seed, round_, PAGE_COIN_STREAM]).random() < p)


def draw_batch(rng: np.random.Generator, n_samples: int, tau: int) -> np.ndarray:
    """τ distinct row positions of a shard, ascending (ascending rows read the design matrix in memory order)."""
    idx = rng.choice(n_samples, size=tau, replace=False)
    idx.sort()
    return idx


@dataclass(frozen=True)
class EstimateContext:
    round: int
    rank: int
    seed: int
    tau: int
    """This worker's minibatch size τ_i."""
    page_p: float


class Estimator(Protocol):
    name: str
    stochastic: bool

    def needs_full(self, state: Any, ctx: EstimateContext) -> bool:
        """Whether this round's estimate is the full local gradient (so the worker computes it anyway)."""

    def estimate(self, state: Any, objective: Any, x: np.ndarray, x_prev: np.ndarray | None,
                 full: np.ndarray | None, ctx: EstimateContext) -> tuple[np.ndarray, Any]:
        """(the vector to compress against, the new state). ``full`` is ∇f_i(x) when the caller has it. The
        returned vector is never modified by the caller."""


@dataclass(frozen=True)
class Full:
    name: str = "full"
    stochastic: bool = False

    def needs_full(self, state: Any, ctx: EstimateContext) -> bool:
        return True

    def estimate(self, state, objective, x, x_prev, full, ctx):  # type: ignore[no-untyped-def]
        assert full is not None
        return full, None


def _minibatch_grad(objective: Any, x: np.ndarray, ctx: EstimateContext) -> np.ndarray:
    idx = draw_batch(batch_rng(ctx.seed, ctx.rank, ctx.round), objective.n_samples, ctx.tau)
    return objective.grad_batch(x, idx)


@dataclass(frozen=True)
class SGD:
    name: str = "sgd"
    stochastic: bool = True

    def needs_full(self, state: Any, ctx: EstimateContext) -> bool:
        return ctx.round == 0

    def estimate(self, state, objective, x, x_prev, full, ctx):  # type: ignore[no-untyped-def]
        if ctx.round == 0:
            return full, None
        return _minibatch_grad(objective, x, ctx), None


@dataclass(frozen=True)
class PAGE:
    """State: v (the estimate). Needs x_prev, the point of the previous round."""

    name: str = "page"
    stochastic: bool = True

    def needs_full(self, state: Any, ctx: EstimateContext) -> bool:
        return state is None or ctx.round == 0 or page_coin(ctx.seed, ctx.round, ctx.page_p)

    def estimate(self, state, objective, x, x_prev, full, ctx):  # type: ignore[no-untyped-def]
        if self.needs_full(state, ctx):
            # Round 0, a coin that says "full", or a replacement worker with no v: restart from ∇f_i(x).
            assert full is not None
            return full, full
        assert x_prev is not None
        idx = draw_batch(batch_rng(ctx.seed, ctx.rank, ctx.round), objective.n_samples, ctx.tau)
        v = state + objective.grad_batch(x, idx)
        v -= objective.grad_batch(x_prev, idx)
        return v, v


@dataclass(frozen=True)
class SGDM:
    eta: float = 0.1
    name: str = "sgdm"
    stochastic: bool = True

    def needs_full(self, state: Any, ctx: EstimateContext) -> bool:
        return state is None

    def estimate(self, state, objective, x, x_prev, full, ctx):  # type: ignore[no-untyped-def]
        if state is None:
            assert full is not None
            return full, full
        v = (1.0 - self.eta) * state
        v += self.eta * _minibatch_grad(objective, x, ctx)
        return v, v


def make_estimator(name: str, sgdm_eta: float = 0.1) -> Estimator:
    if name == "full":
        return Full()
    if name == "sgd":
        return SGD()
    if name == "page":
        return PAGE()
    if name == "sgdm":
        return SGDM(sgdm_eta)
    raise UserError(f"unknown estimator {name!r}")


def batch_size_for(n_samples: int | None, batch_size: int | None, batch_fraction: float | None, rank: int) -> int:
    """τ_i of one worker, checked against its shard (N_i rows)."""
    if batch_size is None and batch_fraction is None:
        return 0
    if n_samples is None:
        raise UserError(f"rank {rank}: the objective has no samples to draw minibatches from "
                        f"(it needs n_samples and grad_batch(x, rows))")
    if batch_size is not None:
        if batch_size > n_samples:
            raise UserError(f"--batch-size {batch_size} is larger than rank {rank}'s shard ({n_samples} rows)")
        return batch_size
    assert batch_fraction is not None
    return max(1, int(batch_fraction * n_samples))


def default_page_p(taus: list[int], n_samples: list[int]) -> float:
    """p = mean_i τ_i/(τ_i + N_i), the official code's choice, summed in rank order."""
    return sum(t / (t + m) for t, m in zip(taus, n_samples)) / len(taus)
