"""A complete ef21 objective: ridge regression on data each worker generates for itself.

    ef21 simulate --objective examples/ridge.py:make --objective-arg rows=400 --workers 4 --k 2 --rounds 300
    ef21 run      --objective examples/ridge.py:make --objective-arg rows=400 --workers 4 --k 2 --rounds 300

Copy it and replace the data and the loss with yours: only ``d`` and ``value_and_grad`` are required.
"""

from __future__ import annotations

import numpy as np


class Ridge:
    """f_i(x) = ½·mean_j (a_jᵀx − b_j)² + ½λ‖x‖² over this worker's rows."""

    def __init__(self, A: np.ndarray, b: np.ndarray, lam: float, test: tuple[np.ndarray, np.ndarray]) -> None:
        self.A, self.b, self.lam, self.test = A, b, lam, test
        self.d = A.shape[1]  # required: the dimension of x
        self.n_samples = A.shape[0]  # optional, with grad_batch: minibatch estimators (--estimator sgd|page|sgdm)

    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:  # required
        r = self.A @ x - self.b
        f = 0.5 * float(r @ r) / self.n_samples + 0.5 * self.lam * float(x @ x)
        return f, self.A.T @ r / self.n_samples + self.lam * x

    def grad_batch(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:  # optional: the gradient over some rows
        A, b = self.A[rows], self.b[rows]
        return A.T @ (A @ x - b) / rows.shape[0] + self.lam * x

    def smoothness(self) -> float:  # optional: L_i, for the theory stepsize (else --stepsize is required)
        return float(np.linalg.eigvalsh(self.A.T @ self.A / self.n_samples)[-1]) + self.lam

    def x0(self) -> np.ndarray:  # optional: where to start (default zeros; --x0 overrides it)
        return np.zeros(self.d)

    def metrics(self, x: np.ndarray) -> dict[str, float]:  # optional: logged every evaluation round
        A, b = self.test
        r = A @ x - b
        return {"test_rmse": float(np.sqrt(r @ r / b.shape[0]))}


def make(ctx) -> Ridge:  # ctx: rank, n, seed, options (--objective-arg KEY=VALUE), shard (with --data)
    rows = int(ctx.options.get("rows", 200))
    d = int(ctx.options.get("dim", 20))
    lam = float(ctx.options.get("lam", 0.01))
    truth = np.random.default_rng(ctx.seed).standard_normal(d)  # the same model on every worker
    rng = np.random.default_rng([ctx.seed, ctx.rank])  # each worker's own rows
    A = rng.standard_normal((rows, d)) * (1.0 + ctx.rank)  # heterogeneous workers
    b = A @ truth + 0.1 * rng.standard_normal(rows)
    A_test = rng.standard_normal((50, d))
    return Ridge(A, b, lam, (A_test, A_test @ truth))
