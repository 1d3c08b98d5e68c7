"""From a run configuration to the per-worker objectives and the constants the theory needs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ef21.errors import UserError

from .data import BUILTIN, DataInfo, Dataset, data_info, load_dataset, load_shard, make_shard, shard_bounds
from .layout import ModelLayout, check_same_layout
from .objectives import LeastSquares, LogisticRegression, PowerIteration, SeparableQuadratic, offers_gram

__all__ = ["Problem", "ProblemSpec", "build_problem", "local_objective", "quadratic_mean", "problem_fingerprint"]


class ProblemSpec(Protocol):
    """The settings that decide a problem (``ef21.engine.config.RunConfig`` has them all)."""

    @property
    def data(self) -> str | None: ...
    @property
    def problem(self) -> str: ...
    @property
    def objective(self) -> str | None: ...
    @property
    def objective_args(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def lam(self) -> float: ...
    @property
    def workers(self) -> int: ...
    @property
    def shuffle(self) -> int | None: ...
    @property
    def seed(self) -> int: ...
    @property
    def dim(self) -> int: ...


def quadratic_mean(L_i: list[float]) -> float:
    """L̃ = sqrt(mean L_i²), summed in rank order."""
    return math.sqrt(sum(v * v for v in L_i) / len(L_i))


@dataclass(eq=False)
class Problem:
    """f = (1/n) Σ f_i with its smoothness constants (None where the objective gives none)."""

    objectives: list[Any]
    L: float | None
    """Smoothness of f, computed on the whole data (not the mean of the L_i)."""
    L_i: list[float] | None
    f_lower: float
    """A lower bound of f (0 for the losses here), for the Theorem 2 bound."""
    x0: np.ndarray | None = None
    """The objective's own start (a plugin's initial weights), used when --x0 is not given."""
    layout: ModelLayout | None = None
    """A model's tensors (the same on every worker, checked)."""
    buffers0: np.ndarray | None = None
    """A model's initial buffers b⁰ (rank 0's, as the networked master takes them)."""

    @property
    def n(self) -> int:
        return len(self.objectives)

    @property
    def d(self) -> int:
        return self.objectives[0].d

    @property
    def L_tilde(self) -> float | None:
        return None if self.L_i is None else quadratic_mean(self.L_i)

    @property
    def n_samples(self) -> list[int | None]:
        return [getattr(o, "n_samples", None) for o in self.objectives]


def quadratic_worker(cfg: ProblemSpec, rank: int) -> SeparableQuadratic:
    """Worker ``rank``'s share of the synthetic quadratic: curvatures in [0.5, 1.5], centres N(0, 1).

    Each worker's data is generated from (seed, rank) alone, so a worker needs no file and d can be huge.
    """
    rng = np.random.default_rng([cfg.seed, 7919, rank])
    return SeparableQuadratic(rng.uniform(0.5, 1.5, cfg.dim), rng.standard_normal(cfg.dim))


def quadratic_fingerprint(cfg: ProblemSpec) -> str:
    """The quadratic has no data file: (dim, seed) determine every worker's share, so they are its fingerprint."""
    return f"quadratic:{cfg.dim}:{cfg.seed}"


def streams_shards(spec: str) -> bool:
    """Whether a worker reads only its own rows of ``spec`` (files and the sparse generator), rather than
    loading it whole and slicing (the shipped and dense synthetic sets, which are small)."""
    return spec not in BUILTIN and not spec.startswith("synthetic:") and not spec.endswith(".npz")


def worker_shard(cfg: ProblemSpec, rank: int, ds: Dataset | None = None, info: DataInfo | None = None) -> Any:
    assert cfg.data is not None
    if ds is not None:
        return make_shard(ds, rank, cfg.workers, cfg.shuffle)
    return load_shard(cfg.data, rank, cfg.workers, cfg.shuffle, problem=cfg.problem, info=info)


def local_objective(cfg: ProblemSpec, rank: int, ds: Dataset | None = None, shard: Any = None,
                    info: DataInfo | None = None) -> Any:
    """Worker ``rank``'s objective: a plugin's, the quadratic's share, or its shard of the data (``ds``: the whole
    dataset already in memory; ``shard``: the worker's rows already loaded; else they are read now)."""
    if cfg.objective is not None:
        from .plugins import build_objective

        if shard is None and cfg.data is not None:
            shard = worker_shard(cfg, rank, ds, info)
        return build_objective(cfg.objective, cfg.objective_args, rank, cfg.workers, cfg.seed, shard)
    if cfg.problem == "quadratic":
        return quadratic_worker(cfg, rank)
    if shard is None:
        shard = worker_shard(cfg, rank, ds, info)
    if cfg.problem == "logreg":
        return LogisticRegression(shard.A, shard.y, cfg.lam)
    return LeastSquares(shard.A, shard.y)


def sum_in_rank_order(parts: list[np.ndarray]) -> np.ndarray:
    """Σ parts, added in the order given: the master and the simulator must get the same bits."""
    acc = np.zeros_like(parts[0])
    for p in parts:
        acc += p
    return acc


def gram_sum(objectives: list[Any]) -> np.ndarray | None:
    """Σ_i A_iᵀA_i, each Gram built and added in rank order and then let go: O(d²) memory whatever n (the master
    asks its workers for their Grams one at a time and adds them in the same order: the same bits). None when
    some objective has no Gram."""
    acc = None
    for o in objectives:
        G = o.gram()
        if G is None:
            return None
        if acc is None:
            acc = np.zeros_like(G)
        acc += G
        del G
    return acc


def smoothness_from_lambda(cfg: ProblemSpec, lam_max: float, n_rows: int) -> float:
    """L of the whole problem from λ_max(AᵀA) = λ_max(Σ_i A_iᵀA_i)."""
    if cfg.problem == "logreg":
        return lam_max / (4.0 * n_rows) + 2.0 * cfg.lam
    return 2.0 * lam_max / n_rows


def global_smoothness_from_grams(cfg: ProblemSpec, gram_sum: np.ndarray, n_rows: int) -> float:
    """L of the whole problem from Σ_i A_iᵀA_i = AᵀA (what workers can compute without pooling data)."""
    return smoothness_from_lambda(cfg, float(np.linalg.eigvalsh(gram_sum)[-1]), n_rows)


def global_smoothness_from_diagonals(diag_sum: np.ndarray, n_workers: int) -> float:
    """L of f = (1/n) Σ f_i for separable f_i: the largest entry of the mean curvature diagonal."""
    return float((diag_sum / n_workers).max())


def global_power_iteration(d: int) -> PowerIteration:
    """The power iteration for λ_max(Σ_i A_iᵀA_i) that the master runs with its workers (and the simulator in
    one process): same start, same stopping rule, products summed in rank order."""
    return PowerIteration(d)


def global_smoothness(cfg: ProblemSpec, objectives: list[Any], n_rows: int) -> float | None:
    """L from the workers' curvature: diagonals, Grams, or a power iteration over their A_iᵀA_i v; for a
    plugin with none of these, mean L_i (an upper bound, f being the mean of the f_i); None without L_i."""
    diags = [o.diagonal() for o in objectives]
    if all(v is not None for v in diags):
        return global_smoothness_from_diagonals(sum_in_rank_order(diags), len(objectives))
    grams = gram_sum(objectives) if all(offers_gram(o) for o in objectives) else None
    if grams is not None:
        if cfg.objective is not None:  # a user's Gram: its λ_max is the curvature of mean f_i·n
            return float(np.linalg.eigvalsh(grams)[-1]) / len(objectives)
        return global_smoothness_from_grams(cfg, grams, n_rows)
    if cfg.objective is None and all(hasattr(o, "gram_matvec") for o in objectives):
        pi = global_power_iteration(objectives[0].d)
        lam = pi.run(lambda v: sum_in_rank_order([o.gram_matvec(v) for o in objectives]))
        return smoothness_from_lambda(cfg, lam, n_rows)
    L_i = [o.smoothness() for o in objectives]
    if any(v is None for v in L_i):
        return None
    return sum(L_i) / len(L_i)


def build_problem(cfg: ProblemSpec, ds: Dataset | None = None) -> Problem:
    n = cfg.workers
    info = None
    if cfg.objective is None and cfg.problem == "quadratic":
        objs: list[Any] = [quadratic_worker(cfg, i) for i in range(n)]
        rows = 0
    else:
        if cfg.data is not None and ds is None:
            if streams_shards(cfg.data):
                info = data_info(cfg.data, problem=cfg.problem)
            else:
                ds = load_dataset(cfg.data, problem=cfg.problem)
        if cfg.data is not None:
            shard_bounds(ds.n_rows if ds is not None else info.n_rows, n)  # type: ignore[union-attr]
        objs = [local_objective(cfg, i, ds, info=info) for i in range(n)]
        rows = sum(getattr(o, "n_rows", 0) for o in objs)
        dims = {o.d for o in objs}
        if len(dims) > 1:
            raise UserError(f"the objective's dimension differs between workers: "
                            f"{', '.join(f'rank {i}: d={o.d}' for i, o in enumerate(objs))}")
    layout = check_same_layout([getattr(o, "layout", lambda: None)() for o in objs])
    L_vals = [o.smoothness() for o in objs]
    L_i = None if any(v is None for v in L_vals) else [float(v) for v in L_vals]
    L = global_smoothness(cfg, objs, rows)
    x0 = getattr(objs[0], "x0", lambda: None)()
    b0 = getattr(objs[0], "initial_buffers", lambda: None)()
    return Problem(objs, L, L_i, f_lower=0.0, x0=x0, layout=layout, buffers0=b0)


def problem_fingerprint(cfg: ProblemSpec) -> str:
    """The data's fingerprint as the master and workers compare it (the quadratic: its parameters)."""
    if cfg.objective is None and cfg.problem == "quadratic":
        return quadratic_fingerprint(cfg)
    if cfg.data is None:
        return "no-data"
    return data_info(cfg.data, problem=cfg.problem).fingerprint
