"""Local objectives f_i with value, gradient and smoothness constant.

Each worker holds one objective over its shard. Conventions are stated per class; the theory stepsize is only
right when L_i is consistent with the gradient actually computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from ef21.compression import kernels

# Above this dimension λ_max(AᵀA) is found by power iteration on A instead of an eigensolver on the d×d Gram,
# and data files are held as sparse (CSR) matrices.
GRAM_MAX_D = 2048


class Objective(Protocol):
    """What a worker's local objective f_i gives. Built-in objectives and user plugins (``ef21.problems.plugins``) alike;
    everything but ``d`` and ``value_and_grad`` is optional for plugins (see docs/objectives.md)."""

    d: int

    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]: ...

    def smoothness(self) -> float:
        """L_i."""

    def gram(self) -> np.ndarray | None:
        """AᵀA of the local rows (d×d) when the objective has a design matrix and d is small, else None."""

    def diagonal(self) -> np.ndarray | None:
        """The curvature diagonal of a separable objective, else None."""


def offers_gram(obj: Any) -> bool:
    """Whether ``obj.gram()`` gives a matrix, without building it where the answer is known: a design matrix has
    one for d ≤ GRAM_MAX_D, a separable objective gives its diagonal instead; anything else is asked."""
    if isinstance(obj, _DesignMatrix):
        return obj.d <= GRAM_MAX_D
    if isinstance(obj, SeparableQuadratic):
        return False
    gram = getattr(obj, "gram", None)
    return callable(gram) and gram() is not None


def is_sparse(A: Any) -> bool:
    return hasattr(A, "tocsr")


@dataclass
class PowerIteration:
    """λ_max of a symmetric positive semidefinite operator, one product at a time.

    The caller hands out ``vector`` and feeds back the operator applied to it (``feed``), so the products may be
    computed anywhere — in this process, or by the workers over the network (each returns A_iᵀA_i v; the sums
    are taken in rank order) — and every party that runs the same sequence gets the same λ to the last bit.
    Stops when λ changes by less than ``tol`` relative, or after ``max_iter`` products.
    """

    d: int
    seed: int = 0
    tol: float = 1e-10
    max_iter: int = 300
    vector: np.ndarray = field(init=False)
    value: float = field(init=False, default=0.0)
    iterations: int = field(init=False, default=0)
    done: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        v = np.random.default_rng([self.seed, 104729]).standard_normal(self.d)
        self.vector = v / np.linalg.norm(v)

    def feed(self, w: np.ndarray) -> None:
        new = float(np.linalg.norm(w))
        self.iterations += 1
        if new == 0.0 or not np.isfinite(new):
            self.value, self.done = (0.0 if new == 0.0 else new), True
            return
        converged = abs(new - self.value) <= self.tol * new
        self.value = new
        self.vector = w / new
        self.done = converged or self.iterations >= self.max_iter

    def run(self, apply: Callable[[np.ndarray], np.ndarray]) -> float:
        while not self.done:
            self.feed(apply(self.vector))
        return self.value


def lambda_max_gram(A: Any) -> float:
    """Largest eigenvalue of AᵀA (= ‖A‖₂²): an eigensolver on the Gram for small d, else power iteration."""
    d = A.shape[1]
    if d <= GRAM_MAX_D:
        G = A.T @ A
        return float(np.linalg.eigvalsh(G.toarray() if is_sparse(G) else G)[-1])
    return PowerIteration(d).run(lambda v: A.T @ (A @ v))


def logistic_loss_and_slope(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log(1 + e^−m) and σ(−m) = 1/(1 + e^m), elementwise, from e^−|m| only: no overflow for any margin."""
    e = np.exp(-np.abs(m))
    loss = np.maximum(-m, 0.0) + np.log1p(e)
    return loss, _slope(m, e)


def _slope(m: np.ndarray, e: np.ndarray) -> np.ndarray:
    """σ(−m) from e = e^−|m|."""
    return np.where(m >= 0, e, 1.0) / (1.0 + e)


class _DesignMatrix:
    """What objectives over a data matrix A (N_i × d) share."""

    A: np.ndarray

    @property
    def d(self) -> int:
        return self.A.shape[1]

    @property
    def n_rows(self) -> int:
        return self.A.shape[0]

    @property
    def n_samples(self) -> int:
        """N_i: the rows minibatches are drawn from."""
        return self.A.shape[0]

    def value(self, x: np.ndarray) -> float:
        return self.value_and_grad(x)[0]  # type: ignore[attr-defined]

    def grad(self, x: np.ndarray) -> np.ndarray:
        return self.value_and_grad(x)[1]  # type: ignore[attr-defined]

    def gram(self) -> np.ndarray | None:
        if self.d > GRAM_MAX_D:
            return None
        G = self.A.T @ self.A
        return G.toarray() if is_sparse(G) else G

    def gram_matvec(self, v: np.ndarray) -> np.ndarray:
        """A_iᵀA_i v without forming the Gram: one step of the distributed power iteration for L."""
        return self.A.T @ (self.A @ v)

    def diagonal(self) -> None:
        return None

    def _transpose_times(self, coef: np.ndarray, A: Any) -> np.ndarray:
        # coef @ A for a dense A (the BLAS call the published figures were computed with); Aᵀcoef for CSR.
        return A.T @ coef if is_sparse(A) else coef @ A


@dataclass
class LogisticRegression(_DesignMatrix):
    """f_i(x) = mean_j log(1 + exp(−y_j a_jᵀx)) + λ Σ_l x_l²/(1 + x_l²), the paper's nonconvex-regularized loss.

    L_i = λ_max(A_iᵀA_i/(4N_i)) + 2λ: the logistic part's Hessian is AᵀDA/N with D ≤ 1/4, and the regularizer's
    second derivative λ(2 − 6x²)/(1 + x²)³ lies in [−λ/2, 2λ].
    """

    A: np.ndarray
    y: np.ndarray
    lam: float = 0.1
    _L: float | None = field(default=None, repr=False)

    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        m = self.y * (self.A @ x)
        loss, slope = logistic_loss_and_slope(m)
        g, reg = self._grad_at(x, slope, with_reg=True)
        assert reg is not None
        return float(loss.sum()) / self.n_rows + self.lam * reg, g

    def grad(self, x: np.ndarray) -> np.ndarray:
        """The gradient of ``value_and_grad`` (the same bits) without the loss's log1p pass and sums."""
        m = self.y * (self.A @ x)
        return self._grad_at(x, _slope(m, np.exp(-np.abs(m))), with_reg=False)[0]

    def _grad_at(self, x: np.ndarray, slope: np.ndarray, *, with_reg: bool) -> tuple[np.ndarray, float | None]:
        """g = coef·A + 2λx/(q·q) with q = 1 + x² (and the regularizer Σ x²/q when asked), in two scratch vectors
        of d instead of five: at d = 10⁶ the temporaries, not the data, set a worker's peak memory
        (benchmarks/sparse_scale.py). Only commutative swaps of the plain formula, so the bits are the same."""
        # d/dm log(1 + e^−m) = −σ(−m)
        coef = (-1.0 / self.n_rows) * (self.y * slope)
        x2 = x * x
        q = x2 + 1.0
        reg = None
        if with_reg:
            np.divide(x2, q, out=x2)
            reg = float(x2.sum())
        np.multiply(q, q, out=q)
        np.multiply(x, 2.0 * self.lam, out=x2)
        np.divide(x2, q, out=x2)
        del q
        g = self._transpose_times(coef, self.A)
        g += x2
        return g, reg

    def grad_batch(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The gradient of the mean loss over ``rows`` of the shard, plus the whole regularizer's (EF21-SGD)."""
        A, y = self.A[rows], self.y[rows]
        _, slope = logistic_loss_and_slope(y * (A @ x))
        coef = (-1.0 / rows.shape[0]) * (y * slope)
        q = 1.0 + x * x
        return self._transpose_times(coef, A) + (2.0 * self.lam) * x / (q * q)

    def smoothness(self) -> float:
        if self._L is None:
            self._L = lambda_max_gram(self.A) / (4.0 * self.n_rows) + 2.0 * self.lam
        return self._L


@dataclass
class LeastSquares(_DesignMatrix):
    """f_i(x) = (1/N_i)‖A_i x − b_i‖², gradient (2/N_i)A_iᵀ(A_i x − b_i), L_i = λ_max(2A_iᵀA_i/N_i).

    This is the loss as the official code writes it, with its true gradient and smoothness (the B&W repository's
    L_i). The EF21 repository instead codes the gradient (1/N_i)Aᵀ(Ax − b), i.e. the gradient of half this loss.
    """

    A: np.ndarray
    b: np.ndarray
    _L: float | None = field(default=None, repr=False)

    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        r = self.A @ x - self.b
        return float(r @ r) / self.n_rows, (2.0 / self.n_rows) * (self.A.T @ r)

    def grad_batch(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        A = self.A[rows]
        return (2.0 / rows.shape[0]) * (A.T @ (A @ x - self.b[rows]))

    def smoothness(self) -> float:
        if self._L is None:
            self._L = 2.0 * lambda_max_gram(self.A) / self.n_rows
        return self._L


@dataclass
class SeparableQuadratic:
    """f_i(x) = ½ Σ_j h_j (x_j − c_j)², a diagonal quadratic: O(d) value and gradient for any d (10⁶ and more).

    It exists so that benchmarks can measure the system rather than the gradient. L_i = max h_j, μ_i = min h_j.
    """

    h: np.ndarray
    c: np.ndarray
    accepts_float32 = True
    """A ``--dtype float32`` run hands it x in float32 (``WorkerNode._point``) and takes a float32 gradient: computed
    in float64 all the same (x − c widens x exactly, as the float64 copy the worker would make), rounded once — the
    bits of the widen-compute-round boundary without its two passes over d."""

    @property
    def d(self) -> int:
        return self.h.shape[0]

    def value(self, x: np.ndarray) -> float:
        r = x - self.c
        return 0.5 * float(np.dot(self.h * r, r))

    def grad(self, x: np.ndarray) -> np.ndarray:
        out = np.empty(x.shape[0], dtype=x.dtype)
        if kernels.scaled_difference(self.h, x, self.c, out):
            return out  # one compiled pass (numba, d ≥ 2^15), numpy's bits
        # float32 x: the float64 product rounded to float32 as the ufunc writes it (astype's rounding).
        return np.multiply(self.h, x - self.c, out=out, casting="same_kind")

    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        # float32 x widened first (exactly): numpy's same-dtype loops beat its mixed-dtype ones, which cast in chunks.
        r = x - self.c if x.dtype == np.float64 else np.subtract(wide := x.astype(np.float64), self.c, out=wide)
        hr = self.h * r
        return 0.5 * float(np.dot(hr, r)), hr if x.dtype == np.float64 else hr.astype(x.dtype)

    def smoothness(self) -> float:
        return float(self.h.max())

    def gram(self) -> None:
        return None

    def diagonal(self) -> np.ndarray:
        return self.h
