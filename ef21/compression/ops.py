"""Where a worker's method vectors live: the few array operations a method step and a replica need, so that the
same method code runs on numpy arrays (``NUMPY``) or on another backend's vectors (PyTorch's, on the model's
device: ``ef21.problems.torch.ops``) without a fork of the methods.

The contract every backend keeps: the same bits as numpy in float64 (the master is numpy, and a worker's replica
must hold the master's bits), and what travels — a compressed vector — leaves as numpy arrays only at the codec
boundary (``SparseVector``: k entries, never d). Backends are chosen by the objective (its ``array_ops()``), not
by the method: a method step asks ``ctx.ops`` for the operations below and never names a library.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .compressors import Compressor, compress
from .sparse import SparseVector


class ArrayOps(Protocol):
    """Vector operations on one backend's d-long float64 vectors (``Vec``: an ndarray, or a torch tensor)."""

    name: str

    def from_numpy(self, a: np.ndarray) -> Any:
        """A float64 copy of ``a`` on the backend (its device)."""

    def to_numpy(self, v: Any) -> np.ndarray:
        """``v`` as numpy: a view where the backend shares host memory (numpy, torch on CPU), else a copy."""

    def empty_like(self, v: Any) -> Any:
        """An uninitialised vector of ``v``'s length, dtype and device (a kept buffer of the run's vectors)."""

    def copy(self, v: Any) -> Any: ...

    def subtract(self, a: Any, b: Any, out: Any) -> Any:
        """out ← a − b (``out`` may be ``a``)."""

    def multiply(self, a: Any, s: float, out: Any) -> Any:
        """out ← a·s."""

    def compress(self, compressor: Compressor, x: Any, rng: np.random.Generator | None,
                 buffer: Any | None) -> SparseVector:
        """``compressor(x)`` as numpy's ``compress`` gives it (the same entries, ties included), as numpy arrays."""

    def take(self, v: Any, indices: np.ndarray) -> Any:
        """v[indices] (a copy)."""

    def put(self, v: Any, indices: np.ndarray, values: Any) -> None:
        """v[indices] ← values (``values`` from ``take``)."""

    def add_sparse(self, target: Any, vec: SparseVector, scale: float = 1.0) -> None:
        """target += scale·vec, in place, with ``SparseVector.add_to``'s bits."""

    def sq_norm(self, v: Any) -> float:
        """‖v‖², numpy's dot (one summation order for every backend, so a logged G is the same bits)."""

    def owns(self, v: Any) -> bool:
        """Whether ``v`` is one of this backend's vectors (float64, on its device)."""

    def all_finite(self, v: Any) -> bool:
        """No NaN or Inf in ``v``."""


class NumpyOps:
    """The method vectors as numpy arrays, float64 or a ``--dtype float32`` run's float32 (every operation keeps its
    operands' dtype): what every process uses unless its objective offers another."""

    name = "numpy"

    def from_numpy(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, dtype=np.float32 if a.dtype == np.float32 else np.float64, copy=True)

    def to_numpy(self, v: np.ndarray) -> np.ndarray:
        return v

    def empty_like(self, v: np.ndarray) -> np.ndarray:
        return np.empty_like(v)

    def copy(self, v: np.ndarray) -> np.ndarray:
        return v.copy()

    def subtract(self, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
        return np.subtract(a, b, out=out)

    def multiply(self, a: np.ndarray, s: float, out: np.ndarray) -> np.ndarray:
        return np.multiply(a, s, out=out)

    def compress(self, compressor: Compressor, x: np.ndarray, rng: np.random.Generator | None,
                 buffer: np.ndarray | None) -> SparseVector:
        return compress(compressor, x, rng, buffer)

    def take(self, v: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return v[indices]

    def put(self, v: np.ndarray, indices: np.ndarray, values: np.ndarray) -> None:
        v[indices] = values

    def add_sparse(self, target: np.ndarray, vec: SparseVector, scale: float = 1.0) -> None:
        vec.add_to(target, scale)

    def sq_norm(self, v: np.ndarray) -> float:
        return float(v @ v)

    def owns(self, v: Any) -> bool:
        return isinstance(v, np.ndarray) and v.dtype in (np.float64, np.float32)

    def all_finite(self, v: np.ndarray) -> bool:
        return bool(np.all(np.isfinite(v)))


NUMPY = NumpyOps()
