"""A worker's method vectors as torch float64 tensors on the model's device (``ef21.compression.ops``'s contract):
the gradient stays the tensor autograd made, and the difference, Top-k and g_i's update run where it lives. The
same code on CPU and CUDA; only a compressed message (k entries) and an evaluation's dense gradient cross to
numpy. One kernel is chosen by device: on CPU, where a tensor and a numpy array share memory, Top-k's selection is
numpy's on a view (faster there than torch's ``nonzero``); elsewhere it is ``torch.topk`` (``host_select``). Every operation gives numpy's float64 bits: elementwise IEEE arithmetic, Top-k with numpy's choice among
ties, and ‖v‖² summed by numpy's dot (a logged figure, on a host view of v).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ef21.compression.compressors import _SAMPLE_SIZE, _SAMPLED_MAX_FRACTION, _SAMPLED_MIN_D, Compressor, TopK, compress
from ef21.compression.sparse import INDEX_DTYPE, SparseVector


class TorchOps:
    """``ArrayOps`` on ``torch`` tensors (float64) on ``device``."""

    name = "torch"

    def __init__(self, torch: Any, device: Any, host_select: bool | None = None) -> None:
        self._torch = torch
        self.device = torch.device(device)
        self.host_select = self.device.type == "cpu" if host_select is None else bool(host_select)
        """Select Top-k's entries with numpy's kernel on a view of the tensor (CPU, where memory is shared: numpy's
        compare-and-flatnonzero is ~5× torch's ``nonzero`` there), else with ``torch.topk`` where the tensor
        lives. Both pick the same entries (``top_k_indices``)."""
        self._last: tuple[np.ndarray, Any] | None = None

    def from_numpy(self, a: np.ndarray) -> Any:
        return self._torch.tensor(np.asarray(a, dtype=np.float64), dtype=self._torch.float64, device=self.device)

    def to_numpy(self, v: Any) -> np.ndarray:
        return v.detach().cpu().numpy()

    def empty_like(self, v: Any) -> Any:
        return self._torch.empty_like(v)

    def copy(self, v: Any) -> Any:
        return v.clone()

    def subtract(self, a: Any, b: Any, out: Any) -> Any:
        return self._torch.sub(a, b, out=out)

    def multiply(self, a: Any, s: float, out: Any) -> Any:
        return self._torch.mul(a, s, out=out)

    def _index(self, indices: np.ndarray) -> Any:
        # A step converts its message's indices once and uses them thrice (g_i's old values, its update, an
        # undo): the last conversion is kept, keyed by the array itself (held, so its id stays its own).
        if self._last is not None and self._last[0] is indices:
            return self._last[1]
        t = self._torch.from_numpy(np.asarray(indices, dtype=np.int64)).to(self.device)
        self._last = (indices, t)
        return t

    def _values(self, values: np.ndarray) -> Any:
        return self._torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(self.device)

    def take(self, v: Any, indices: np.ndarray) -> Any:
        return self._torch.index_select(v, 0, self._index(indices))

    def put(self, v: Any, indices: np.ndarray, values: Any) -> None:
        v.index_copy_(0, self._index(indices), values)

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
        if isinstance(compressor, TopK) and not self.host_select:
            idx = self.top_k_indices(x, compressor.k, buffer)
            return SparseVector(x.shape[0], idx.cpu().numpy().astype(INDEX_DTYPE), x[idx].cpu().numpy())
        # numpy's kernels on a host view of x (CPU), or any other compressor (numpy code: it reads a copy from a
        # GPU). Compressors never alias their input.
        return compress(compressor, self.to_numpy(x), rng, None if buffer is None else self.to_numpy(buffer))

    def top_k_indices(self, x: Any, k: int, mag: Any | None = None) -> Any:
        """The indices (int64, ascending) of numpy's ``top_k_indices``: the k largest |x_j|, the lowest indices
        among equal magnitudes at the k-th. For k ≪ d the same cut as numpy's first (a threshold read off a strided
        sample keeps the entries at or above it; if k of them pass, every entry ≥ the k-th magnitude is among
        them), so ``torch.topk`` runs on a few thousand entries instead of d."""
        torch = self._torch
        d = x.shape[0]
        if k >= d:
            return torch.arange(d, device=x.device)
        mag = torch.abs(x) if mag is None else torch.abs(x, out=mag)
        pool = None
        if d >= _SAMPLED_MIN_D and k * _SAMPLED_MAX_FRACTION <= d:
            sample = mag[:: max(1, d // _SAMPLE_SIZE)]
            m = sample.shape[0]
            want = min(m, math.ceil(m * (2 * k + 32) / d) + 4)
            cand = torch.nonzero(mag >= torch.topk(sample, want, sorted=False).values.min()).flatten()
            pool = cand if cand.shape[0] >= k else None
        picked = self._select(mag if pool is None else mag[pool], k)
        return picked if pool is None else pool[picked]  # pool is ascending: so is pool[picked]

    def _select(self, mag: Any, k: int) -> Any:
        """Positions (ascending) of the k largest of ``mag``, the lowest among ties at the k-th. ``torch.topk``
        picks among ties as it likes, so a tie at the k-th that it cut (rare with real gradients) is settled the
        numpy way."""
        torch = self._torch
        if k >= mag.shape[0]:
            return torch.arange(mag.shape[0], device=mag.device)
        top, idx = torch.topk(mag, k, sorted=False)
        tau = top.min()
        if int(torch.count_nonzero(mag == tau)) != int(torch.count_nonzero(top == tau)):
            above = torch.nonzero(mag > tau).flatten()
            ties = torch.nonzero(mag == tau).flatten()[: k - above.shape[0]]
            idx = torch.cat([above, ties])
        return torch.sort(idx).values
