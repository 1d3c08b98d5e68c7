"""From a run configuration to the per-worker objectives and the constants the theory needs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import RunConfig
from .data import Dataset, load_dataset, make_shard, shard_bounds
from .objectives import LeastSquares, LogisticRegression, Objective, SeparableQuadratic, lambda_max_gram


@dataclass(eq=False)
class Problem:
    """f = (1/n) Σ f_i with its smoothness constants."""

    objectives: list[Objective]
    L: float
    """Smoothness of f, computed on the whole data (not the mean of the L_i)."""
    L_i: list[float]
    f_lower: float
    """A lower bound of f (0 for the losses here), for the Theorem 2 bound."""

    @property
    def n(self) -> int:
        return len(self.objectives)

    @property
    def d(self) -> int:
        return self.objectives[0].d

    @property
    def L_tilde(self) -> float:
        """L̃ = sqrt(mean L_i²)."""
        return math.sqrt(sum(v * v for v in self.L_i) / len(self.L_i))


def quadratic_worker(cfg: RunConfig, rank: int) -> SeparableQuadratic:
    """Worker ``rank``'s share of the synthetic quadratic: curvatures in [0.5, 1.5], centres N(0, 1).

    Each worker's data is generated from (seed, rank) alone, so a worker needs no file and d can be huge.
    """
    rng = np.random.default_rng([cfg.seed, 7919, rank])
    return SeparableQuadratic(rng.uniform(0.5, 1.5, cfg.dim), rng.standard_normal(cfg.dim))


def local_objective(cfg: RunConfig, rank: int, ds: Dataset | None) -> Objective:
    """Worker ``rank``'s objective: its shard of ``ds`` (the whole dataset; ignored for ``quadratic``)."""
    if cfg.problem == "quadratic":
        return quadratic_worker(cfg, rank)
    assert ds is not None
    shard = make_shard(ds, rank, cfg.workers, cfg.shuffle)
    if cfg.problem == "logreg":
        return LogisticRegression(shard.A, shard.y, cfg.lam)
    return LeastSquares(shard.A, shard.y)


def global_smoothness_from_grams(cfg: RunConfig, gram_sum: np.ndarray, n_rows: int) -> float:
    """L of the whole problem from Σ_i A_iᵀA_i = AᵀA (what workers can compute without pooling data)."""
    lam_max = float(np.linalg.eigvalsh(gram_sum)[-1])
    if cfg.problem == "logreg":
        return lam_max / (4.0 * n_rows) + 2.0 * cfg.lam
    return 2.0 * lam_max / n_rows


def build_problem(cfg: RunConfig, ds: Dataset | None = None) -> Problem:
    if cfg.problem == "quadratic":
        objs = [quadratic_worker(cfg, i) for i in range(cfg.workers)]
        L = float(np.mean([o.h for o in objs], axis=0).max())
        return Problem(objs, L, [o.smoothness() for o in objs], f_lower=0.0)
    if ds is None:
        ds = load_dataset(cfg.data, problem=cfg.problem)
    shard_bounds(ds.n_rows, cfg.workers)  # raises a clear error when there are fewer rows than workers
    objs = [local_objective(cfg, i, ds) for i in range(cfg.workers)]
    lam_max = lambda_max_gram(ds.A)
    if cfg.problem == "logreg":
        L = lam_max / (4.0 * ds.n_rows) + 2.0 * cfg.lam
    else:
        L = 2.0 * lam_max / ds.n_rows
    return Problem(objs, L, [o.smoothness() for o in objs], f_lower=0.0)
