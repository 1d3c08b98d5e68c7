"""A PyTorch model, a loss and a dataset as an ef21 objective (``pip install -e '.[torch]'``).

    model = seeded(ctx.seed, lambda: MyNet())          # the same initial weights on every worker
    return TorchObjective(model, torch.nn.CrossEntropyLoss(), X_shard, y_shard, test=(X_test, y_test))

f_i(x) is the loss (a mean over rows) of the model whose trainable parameters, flattened in ``parameters()`` order,
are x. What the method sees is float64 (x, gradients, its own state); the model computes in ``dtype``:

- ``float32`` (the default): x is rounded to float32 when it is loaded into the model, gradients come back in
  float32 and are widened exactly. The method's iterate, EF21's g_i and g stay float64, so no rounding accumulates
  across rounds; the model is evaluated at the float32 point nearest x.
- ``float64``: the model and data are converted to double; about 2× the time per gradient on CPU for matrix-heavy
  models (see docs/benchmarks/pytorch.md), nothing rounded anywhere.

Either way a gradient is a deterministic function of (x, rows) for a fixed number of intra-op threads, which is
what makes ``ef21 run`` equal ``ef21 simulate`` bit for bit: ``threads`` (default 1) pins torch's intra-op pool,
because a reduction split over a different number of threads adds in a different order. One thread is also what
you want with several worker processes on one machine (they would otherwise oversubscribe the cores).

The model runs in ``eval()`` mode: no dropout, BatchNorm uses its running statistics. f_i must be a function of x
alone for EF21's error feedback (and for a replacement worker to continue exactly); buffers are not part of x.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["TorchObjective", "seeded", "require_torch"]


def require_torch() -> Any:
    """Import torch, or fail with the line that says how to get it."""
    try:
        import torch
    except ImportError:
        from ef21.errors import UserError

        raise UserError("this objective needs PyTorch: pip install torch==2.13.0 (CPU wheel), "
                        "or pip install -e '.[torch]'") from None
    return torch


def seeded(seed: int, build: Callable[[], Any]) -> Any:
    """``build()`` (a module constructor) under ``torch.manual_seed(seed)``, leaving torch's global generator as it
    was: every worker given the same seed builds the same initial weights, and the factory has no side effect."""
    torch = require_torch()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


_DTYPES = ("float32", "float64")


class TorchObjective:
    """An ``nn.Module`` + loss + (X, y) as an ef21 objective: ``d``, ``value_and_grad``, ``n_samples`` with
    ``grad_batch`` (minibatch estimators), ``x0`` (the model's initial weights) and ``metrics`` (held-out loss and,
    for classification, accuracy). No ``smoothness()``: a network has no known L, so ``--stepsize`` is required.

    ``loss(output, target)`` must return the mean over the rows (``nn.CrossEntropyLoss()``, ``nn.MSELoss()``).
    ``test``: a held-out (X, y) evaluated by ``metrics`` under ``torch.no_grad()``; every worker reports its own and
    ef21 logs the mean over the workers, so give each worker the whole held-out set (exact) or equal slices.
    """

    def __init__(self, model: torch.nn.Module, loss: Callable[[Any, Any], Any], X: Any, y: Any, *,
                 test: tuple[Any, Any] | None = None, dtype: str = "float32", threads: int | None = 1) -> None:
        torch = require_torch()
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if threads is not None:
            torch.set_num_threads(int(threads))
        self._torch = torch
        self._dtype = torch.float32 if dtype == "float32" else torch.float64
        self.model = model.to(self._dtype).eval()
        self.loss = loss
        self.X, self.y = self._tensor(X), self._target(y)
        if self.X.shape[0] != self.y.shape[0] or self.X.shape[0] == 0:
            raise ValueError(f"X has {self.X.shape[0]} rows and y {self.y.shape[0]}: need the same, at least one")
        self.test = None if test is None else (self._tensor(test[0]), self._target(test[1]))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.d = sum(p.numel() for p in self.params)
        self.n_samples = int(self.X.shape[0])
        # The parameters become views of one flat buffer, so loading x is a single copy (and cast) into it.
        self._flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        offset = 0
        for p in self.params:
            p.data = self._flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self._x0 = self._flat.to(torch.float64).numpy().copy()

    def _tensor(self, a: Any) -> torch.Tensor:
        return self._torch.as_tensor(np.asarray(a) if not self._torch.is_tensor(a) else a).to(self._dtype)

    def _target(self, a: Any) -> torch.Tensor:
        t = self._torch.as_tensor(np.asarray(a) if not self._torch.is_tensor(a) else a)
        # Class labels stay integers (cross-entropy wants int64); regression targets follow the model's dtype.
        return t.to(self._dtype) if t.is_floating_point() else t.to(self._torch.int64)

    def _load(self, x: np.ndarray) -> None:
        with self._torch.no_grad():
            self._flat.copy_(self._torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)))

    def _loss_and_grad(self, x: np.ndarray, X: torch.Tensor, y: torch.Tensor) -> tuple[float, np.ndarray]:
        torch = self._torch
        self._load(x)
        with torch.enable_grad():
            loss = self.loss(self.model(X), y)
            if loss.dim() != 0:
                raise ValueError(f"the loss must be a scalar (a mean over the rows), got shape {tuple(loss.shape)}")
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss is {value} on {X.shape[0]} rows")
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(self.params, grads)])
        return value, flat.to(torch.float64).numpy()

    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """f_i(x) and ∇f_i(x) over the whole shard."""
        return self._loss_and_grad(x, self.X, self.y)

    def grad_batch(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The gradient of the mean loss over ``rows`` of the shard (drawn by ef21 from (seed, rank, round))."""
        idx = self._torch.from_numpy(np.asarray(rows, dtype=np.int64))
        return self._loss_and_grad(x, self.X[idx], self.y[idx])[1]

    def x0(self) -> np.ndarray:
        """The model's initial weights (build it with ``seeded`` so that every worker has the same)."""
        return self._x0.copy()

    def metrics(self, x: np.ndarray) -> dict[str, float]:
        """Held-out loss and accuracy (the share of rows whose largest output is the label) at x."""
        if self.test is None:
            return {}
        torch = self._torch
        X, y = self.test
        self._load(x)
        with torch.no_grad():
            out = self.model(X)
            out_metrics = {"test_loss": float(self.loss(out, y))}
            if not y.is_floating_point() and out.dim() == 2:
                out_metrics["test_acc"] = float((out.argmax(dim=1) == y).to(torch.float64).mean())
        return out_metrics
