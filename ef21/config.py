"""The run configuration shared by the simulator, the master and the workers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

PROBLEMS = ("logreg", "lsq", "quadratic")
INIT_MODES = ("full", "compressed")
ENCODINGS = ("plain", "compact")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's iterates. Two runs with equal configs give the same x, bit for bit."""

    data: str = "mushrooms"
    """A shipped dataset name, ``synthetic:N:D[:SEED]``, or a path to a LIBSVM or .npz file."""
    problem: str = "logreg"
    """``logreg`` (nonconvex-regularized logistic regression), ``lsq`` (least squares) or ``quadratic``
    (synthetic separable quadratic of dimension ``dim``; no data file)."""
    lam: float = 0.1
    """λ of the logistic regularizer."""
    workers: int = 20
    """n, the number of workers (and shards)."""
    shuffle: int | None = None
    """Shuffle rows with this seed before sharding; None keeps the file order (the paper's split)."""
    method: str = "ef21"
    compressor: str = "topk"
    k: int | None = 1
    init: str = "full"
    """g_i⁰: ``full`` (uncompressed ∇f_i(x⁰), the official experiments) or ``compressed`` (C(∇f_i(x⁰)))."""
    stepsize: float | None = None
    """Base stepsize; None takes the theory stepsize."""
    stepsize_mult: float = 1.0
    mu: float | None = None
    """PL constant; when given, the base stepsize follows Theorem 3."""
    rounds: int = 1000
    tol: float = 0.0
    """Stop once ‖∇f(x^t)‖² < tol."""
    x0: str = "zeros"
    """``zeros``, ``normal:SEED`` (N(0, I)) or a path to a .npy file."""
    seed: int = 0
    """Seed of randomized compressors; each worker's generator is derived from (seed, rank, round)."""
    dim: int = 1000
    """d of the ``quadratic`` problem."""
    encoding: str = "plain"
    """How messages travel: ``plain`` (float64 values, uint32 indices) or ``compact`` (the workers' values rounded
    to float32, indices Elias–Fano coded both ways). Compact changes the iterates — workers update their state
    with the rounded values they send — so it is part of the configuration, and the simulator does the same."""

    def __post_init__(self) -> None:
        if self.problem not in PROBLEMS:
            raise UserError(f"unknown problem {self.problem!r}; choose one of {', '.join(PROBLEMS)}")
        if self.init not in INIT_MODES:
            raise UserError(f"--init must be one of {', '.join(INIT_MODES)}, got {self.init!r}")
        if self.workers <= 0:
            raise UserError(f"--workers must be positive, got {self.workers}")
        if self.rounds < 0:
            raise UserError(f"--rounds must be >= 0, got {self.rounds}")
        if self.stepsize is not None and not self.stepsize > 0:
            raise UserError(f"--stepsize must be positive, got {self.stepsize}")
        if not self.stepsize_mult > 0:
            raise UserError(f"--stepsize-mult must be positive, got {self.stepsize_mult}")
        if self.mu is not None and not self.mu > 0:
            raise UserError(f"--mu must be positive, got {self.mu}")
        if self.encoding not in ENCODINGS:
            raise UserError(f"--encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}")
        if self.problem == "quadratic" and self.dim <= 0:
            raise UserError(f"--dim must be positive, got {self.dim}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(RunConfig)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        return RunConfig(**d)


def make_x0(spec: str, d: int) -> np.ndarray:
    """x⁰ from ``zeros``, ``normal:SEED`` or a .npy path, checked against d."""
    if spec == "zeros":
        return np.zeros(d)
    if spec.startswith("normal:"):
        try:
            seed = int(spec.split(":", 1)[1])
        except ValueError:
            raise UserError(f"bad --x0 {spec!r}; use normal:SEED") from None
        return np.random.default_rng(seed).standard_normal(d)
    path = Path(spec)
    try:
        x0 = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"--x0 {spec}: no such file (use zeros, normal:SEED or a .npy path)") from None
    except Exception as exc:
        raise UserError(f"--x0 {spec}: cannot read .npy ({exc})") from None
    x0 = np.asarray(x0, dtype=np.float64).reshape(-1)
    if x0.shape[0] != d:
        raise UserError(f"--x0 {spec}: has {x0.shape[0]} entries, the problem has d = {d}")
    if not np.all(np.isfinite(x0)):
        raise UserError(f"--x0 {spec}: non-finite values")
    return x0
