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
        return quadratic_mean(self.L_i)


def quadratic_mean(L_i: list[float]) -> float:
    """L̃ = sqrt(mean L_i²), summed in rank order."""
    return math.sqrt(sum(v * v for v in L_i) / len(L_i))


def quadratic_worker(cfg: RunConfig, rank: int) -> SeparableQuadratic:
    """Worker ``rank``'s share of the synthetic quadratic: curvatures in [0.5, 1.5], centres N(0, 1).

    Each worker's data is generated from (seed, rank) alone, so a worker needs no file and d can be huge.
    """
    rng = np.random.default_rng([cfg.seed, 7919, rank])
    return SeparableQuadratic(rng.uniform(0.5, 1.5, cfg.dim), rng.standard_normal(cfg.dim))


def quadratic_fingerprint(cfg: RunConfig) -> str:
    """The quadratic has no data file: (dim, seed) determine every worker's share, so they are its fingerprint."""
    return f"quadratic:{cfg.dim}:{cfg.seed}"


def local_objective(cfg: RunConfig, rank: int, ds: Dataset | None) -> Objective:
    """Worker ``rank``'s objective: its shard of ``ds`` (the whole dataset; ignored for ``quadratic``)."""
    if cfg.problem == "quadratic":
        return quadratic_worker(cfg, rank)
    assert ds is not None
    shard = make_shard(ds, rank, cfg.workers, cfg.shuffle)
    if cfg.problem == "logreg":
        return LogisticRegression(shard.A, shard.y, cfg.lam)
    return LeastSquares(shard.A, shard.y)


def sum_in_rank_order(parts: list[np.ndarray]) -> np.ndarray:
    """Σ parts, added in the order given: the master and the simulator must get the same bits."""
    acc = np.zeros_like(parts[0])
    for p in parts:
        acc += p
    return acc


def global_smoothness_from_grams(cfg: RunConfig, gram_sum: np.ndarray, n_rows: int) -> float:
    """L of the whole problem from Σ_i A_iᵀA_i = AᵀA (what workers can compute without pooling data)."""
    lam_max = float(np.linalg.eigvalsh(gram_sum)[-1])
    if cfg.problem == "logreg":
        return lam_max / (4.0 * n_rows) + 2.0 * cfg.lam
    return 2.0 * lam_max / n_rows


def global_smoothness_from_diagonals(diag_sum: np.ndarray, n_workers: int) -> float:
    """L of f = (1/n) Σ f_i for separable f_i: the largest entry of the mean curvature diagonal."""
    return float((diag_sum / n_workers).max())


def global_smoothness(cfg: RunConfig, objectives: list[Objective], n_rows: int) -> float | None:
    """L from the workers' curvature summaries, or None when they have none (large d: computed on full data)."""
    diags = [o.diagonal() for o in objectives]
    if all(v is not None for v in diags):
        return global_smoothness_from_diagonals(sum_in_rank_order(diags), len(objectives))
    grams = [o.gram() for o in objectives]
    if all(v is not None for v in grams):
        return global_smoothness_from_grams(cfg, sum_in_rank_order(grams), n_rows)
    return None


def build_problem(cfg: RunConfig, ds: Dataset | None = None) -> Problem:
    if cfg.problem == "quadratic":
        objs = [quadratic_worker(cfg, i) for i in range(cfg.workers)]
        L = global_smoothness(cfg, objs, 0)
        assert L is not None
        return Problem(objs, L, [o.smoothness() for o in objs], f_lower=0.0)
    if ds is None:
        ds = load_dataset(cfg.data, problem=cfg.problem)
    shard_bounds(ds.n_rows, cfg.workers)  # raises a clear error when there are fewer rows than workers
    objs = [local_objective(cfg, i, ds) for i in range(cfg.workers)]
    # The same computation as the networked master (sum of the shards' AᵀA in rank order), so both runs get
    # the same γ to the last bit; it equals λ_max of the whole data's AᵀA.
    L = global_smoothness(cfg, objs, ds.n_rows)
    if L is None:
        lam_max = lambda_max_gram(ds.A)
        L = lam_max / (4.0 * ds.n_rows) + 2.0 * cfg.lam if cfg.problem == "logreg" else 2.0 * lam_max / ds.n_rows
    return Problem(objs, L, [o.smoothness() for o in objs], f_lower=0.0)
