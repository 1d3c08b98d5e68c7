"""A worker's method vectors as torch float64 tensors on the model's device (``ef21.compression.ops``'s contract):
the gradient stays the tensor autograd made, and the difference, Top-k and g_i's update run where it lives. The
same code on CPU and CUDA; only a compressed message (k entries) and an evaluation's dense gradient cross to
numpy. Every operation gives numpy's float64 bits: elementwise IEEE arithmetic, Top-k with numpy's choice among
ties, and ‖v‖² summed by numpy's dot (a logged figure, on a host view of v).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ef21.compression.compressors import Compressor, TopK, compress
from ef21.compression.sparse import INDEX_DTYPE, SparseVector


class TorchOps:
    """``ArrayOps`` on ``torch`` tensors (float64) on ``device``."""

    name = "torch"

    def __init__(self, torch: Any, device: Any) -> None:
        self._torch = torch
        self.device = device

    def from_numpy(self, a: np.ndarray) -> Any:
        return self._torch.tensor(np.asarray(a, dtype=np.float64), dtype=self._torch.float64, device=self.device)

    def to_numpy(self, v: Any) -> np.ndarray:
        return v.detach().cpu().numpy()

    def empty(self, d: int) -> Any:
        return self._torch.empty(d, dtype=self._torch.float64, device=self.device)

    def copy(self, v: Any) -> Any:
        return v.clone()

    def subtract(self, a: Any, b: Any, out: Any) -> Any:
        return self._torch.sub(a, b, out=out)

    def multiply(self, a: Any, s: float, out: Any) -> Any:
        return self._torch.mul(a, s, out=out)

    def _index(self, indices: np.ndarray) -> Any:
        return self._torch.from_numpy(np.asarray(indices, dtype=np.int64)).to(self.device)

    def _values(self, values: np.ndarray) -> Any:
        return self._torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(self.device)

    def take(self, v: Any, indices: np.ndarray) -> Any:
        return v[self._index(indices)]

    def put(self, v: Any, indices: np.ndarray, values: Any) -> None:
        v[self._index(indices)] = values

    def add_sparse(self, target: Any, vec: SparseVector, scale: float = 1.0) -> None:
        # numpy's add_to computes scale·values first, then adds once per entry (indices are unique): the same here.
        values = self._values(vec.values if scale == 1.0 else scale * vec.values)
        if vec.indices is None:
            target.add_(values)
        else:
            target.index_add_(0, self._index(vec.indices), values)

    def sq_norm(self, v: Any) -> float:
        host = self.to_numpy(v)
        return float(host @ host)

    def owns(self, v: Any) -> bool:
        return bool(self._torch.is_tensor(v) and v.dtype == self._torch.float64 and v.device == self.device)

    def all_finite(self, v: Any) -> bool:
        # One dot, no d-long temporary (a finite sum of squares means every entry is finite); an overflow to
        # Inf is settled entry by entry.
        return math.isfinite(float(self._torch.dot(v, v))) or bool(self._torch.isfinite(v).all())

    def compress(self, compressor: Compressor, x: Any, rng: np.random.Generator | None,
                 buffer: Any | None) -> SparseVector:
        if isinstance(compressor, TopK):
            idx = self.top_k_indices(x, compressor.k, buffer)
            return SparseVector(x.shape[0], idx.cpu().numpy().astype(INDEX_DTYPE), x[idx].cpu().numpy())
        # Any other compressor is numpy code: it reads a host view of x (a copy from a GPU), never aliasing it.
        return compress(compressor, self.to_numpy(x), rng, None)

    def top_k_indices(self, x: Any, k: int, mag: Any | None = None) -> Any:
        """The indices (int64, ascending) of numpy's ``top_k_indices``: the k largest |x_j|, the lowest indices
        among equal magnitudes at the k-th. ``torch.topk`` picks among ties as it likes, so a tie at the k-th
        magnitude that it cut (rare with real gradients) is settled the numpy way."""
        torch = self._torch
        d = x.shape[0]
        if k >= d:
            return torch.arange(d, device=x.device)
        mag = torch.abs(x) if mag is None else torch.abs(x, out=mag)
        top, idx = torch.topk(mag, k, sorted=False)
        tau = top.min()
        if int(torch.count_nonzero(mag == tau)) != int(torch.count_nonzero(top == tau)):
            above = torch.nonzero(mag > tau).flatten()
            ties = torch.nonzero(mag == tau).flatten()[: k - above.shape[0]]
            idx = torch.cat([above, ties])
        return torch.sort(idx).values
