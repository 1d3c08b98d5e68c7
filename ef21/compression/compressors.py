"""Compressors: contractive (B(α)) and unbiased (U(ω)) maps from R^d to sparse or dense vectors.

Every compressor exposes the constant the theory needs: ``alpha(d)`` for contractive ones
(E‖C(x) − x‖² ≤ (1 − α)‖x‖²), ``omega(d)`` for unbiased ones (E C(x) = x, E‖C(x) − x‖² ≤ ω‖x‖²).
Randomized compressors take their generator as an argument rather than holding a global one: the caller derives
it from (seed, rank, round), so a run is reproducible and a replaced worker continues the same random stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ef21.errors import UserError

from . import kernels
from .sparse import INDEX_DTYPE, SparseVector


class Compressor(Protocol):
    """Maps x to C(x). The result never shares memory with x: callers reuse x as scratch afterwards."""

    name: str
    randomized: bool

    def alpha(self, d: int) -> float | None:
        """Contraction constant α ∈ (0, 1], or None when the compressor is not contractive."""

    def omega(self, d: int) -> float | None:
        """Variance constant ω ≥ 0 of an unbiased compressor, or None when it is biased."""

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> SparseVector: ...


def top_k_indices(x: np.ndarray, k: int, mag_out: np.ndarray | None = None) -> np.ndarray:
    """Indices of the k largest |x_j|, sorted ascending; among equal magnitudes the lower index wins.

    O(d), never a full sort. For k ≪ d a threshold t read off a strided sample of |x| cuts the vector down to
    the few entries with |x_j| ≥ t first, and the exact selection runs on those: if at least k entries pass,
    t is at most the k-th largest magnitude τ, so every entry ≥ τ (ties included) is among them and the result
    is the same as selecting on all of x. When the sample misleads (fewer than k pass), the full selection runs.
    """
    d = x.shape[0]
    if k >= d:
        return np.arange(d, dtype=INDEX_DTYPE)
    mag = np.abs(x) if mag_out is None else np.abs(x, out=mag_out)  # ``mag_out``: a kept d-long buffer
    if sampled_path(d, k):
        cand = _candidates(mag, k)
        if cand is not None:
            return cand[_select(mag[cand], k)].astype(INDEX_DTYPE, copy=False)
    return _select(mag, k).astype(INDEX_DTYPE, copy=False)


# The sampled path pays one compare and one flatnonzero over d; below these sizes one argpartition is cheaper.
_SAMPLED_MIN_D = 16384
_SAMPLED_MAX_FRACTION = 16
_SAMPLE_SIZE = 2048


def sampled_path(d: int, k: int) -> bool:
    """Whether Top-k of k out of d cuts the vector down with a sampled threshold first (``top_k_indices``)."""
    return d >= _SAMPLED_MIN_D and k * _SAMPLED_MAX_FRACTION <= d


def sample_stride(d: int) -> int:
    return max(1, d // _SAMPLE_SIZE)


def sampled_threshold(sample: np.ndarray, d: int, k: int) -> float:
    """The threshold read off ``sample`` (the magnitudes at every ``sample_stride(d)``-th position)."""
    m = sample.shape[0]
    # Aim at about 2k + 32 survivors; the sample's own estimate of the quantile is off by ~sqrt of the count.
    want = min(m, math.ceil(m * (2 * k + 32) / d) + 4)
    return np.partition(sample, m - want)[m - want]


def _candidates(mag: np.ndarray, k: int) -> np.ndarray | None:
    """Ascending indices of the entries with magnitude ≥ a sampled threshold, or None when fewer than k pass."""
    d = mag.shape[0]
    t = sampled_threshold(mag[:: sample_stride(d)], d, k)
    cand = np.flatnonzero(mag >= t)
    return cand if cand.shape[0] >= k else None


def _select(mag: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest entries of mag (ascending), lowest positions first among ties at the k-th."""
    d = mag.shape[0]
    if k >= d:
        return np.arange(d)
    part = np.argpartition(mag, d - k)
    tau = mag[part[d - k]]
    at_tau = mag == tau
    if np.count_nonzero(at_tau) == 1:  # no tie at the k-th magnitude (the usual case): argpartition's top k
        return _ascending(part[d - k:], d)
    above = np.flatnonzero(mag > tau)
    ties = np.flatnonzero(at_tau)[: k - above.shape[0]]
    return _ascending(np.concatenate([above, ties]), d)


def _ascending(pos: np.ndarray, m: int) -> np.ndarray:
    """``pos`` (distinct positions below m) in ascending order. Where m is a few times their count — the sampled
    path's ~2k candidates — marking them in an m-long mask and reading its nonzeros is O(m) and ~13x faster than
    sorting them (20 against 266 µs for k = 10⁴); otherwise (k ≪ m) the sort, O(k·log k)."""
    if m > 16 * pos.shape[0]:
        pos.sort()
        return pos
    mask = np.zeros(m, dtype=bool)
    mask[pos] = True
    return np.flatnonzero(mask)


@dataclass(frozen=True)
class Identity:
    name: str = "identity"
    randomized: bool = False

    def alpha(self, d: int) -> float:
        return 1.0

    def omega(self, d: int) -> float:
        return 0.0

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> SparseVector:
        return SparseVector.dense(x.copy())


@dataclass(frozen=True)
class TopK:
    """Greedy sparsifier: deterministic, positively homogeneous, not additive. α = k/d (worst case)."""

    k: int
    name: str = "topk"
    randomized: bool = False

    def alpha(self, d: int) -> float:
        return min(self.k, d) / d

    def omega(self, d: int) -> None:
        return None

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> SparseVector:
        idx = top_k_indices(x, self.k)
        return SparseVector(x.shape[0], idx, x[idx])

    def compress_with(self, x: np.ndarray, rng: np.random.Generator | None, buffer: np.ndarray) -> SparseVector:
        """The same vector as ``self(x)``, its magnitudes computed into ``buffer`` (d-long, x's dtype,
        overwritten) instead of a fresh temporary."""
        idx = top_k_indices(x, self.k, buffer)
        return SparseVector(x.shape[0], idx, x[idx])

    def compress_difference(self, a: np.ndarray, b: np.ndarray, cand: np.ndarray) -> SparseVector | None:
        """``self(a − b)`` without forming a − b: one compiled pass over d finds the entries whose |a − b| reaches
        the sampled threshold (``kernels.residual_candidates``, into the kept ``cand``), and the exact selection
        runs on those, as ``top_k_indices`` does on the same candidates — so the same indices, ties and values.
        None where that path does not apply (no numba, a small d or a large k, a sample that misleads): the
        caller then compresses a − b as usual."""
        out = self._fused(a, b, cand, with_error=False)
        return None if out is None else out[0]

    def compress_difference_with_error(self, a: np.ndarray, b: np.ndarray, cand: np.ndarray
                                       ) -> tuple[SparseVector, float] | None:
        """``compress_difference`` and the compression error ‖r − C(r)‖² of r = a − b from the same single pass
        (an evaluation round's distortion): the kernel sums r_j² over the entries that are not candidates, and the
        candidates left out of the selection add theirs (the k selected ones contribute exactly 0: C(r)_j = r_j).
        Never ‖r‖² − Σ_selected r_j², which would cancel. The same r_j² as numpy's ``sq_norm(r − C(r))`` in
        another summation order (float64 partial sums here, numpy's dot there): the value agrees to rounding
        (about 1e-15 relative in float64; a float32 dot's own error, about 1e-7, in float32), not bit for bit."""
        return self._fused(a, b, cand, with_error=True)

    def _fused(self, a: np.ndarray, b: np.ndarray, cand: np.ndarray, *, with_error: bool
               ) -> tuple[SparseVector, float] | None:
        d, k = a.shape[0], self.k
        if not (sampled_path(d, k) and kernels.available(d)):
            return None
        stride = sample_stride(d)
        t = sampled_threshold(np.abs(a[::stride] - b[::stride]), d, k)
        rest = 0.0
        if with_error:
            found = kernels.residual_candidates_and_rest(a, b, t, cand)
            cand_idx = None if found is None else found[0]
            rest = 0.0 if found is None else found[1]
        else:
            cand_idx = kernels.residual_candidates(a, b, t, cand)
        if cand_idx is None or cand_idx.shape[0] < k:
            return None
        picked = a[cand_idx] - b[cand_idx]
        sel = _select(np.abs(picked), k)
        if with_error:
            left = np.ones(picked.shape[0], dtype=bool)
            left[sel] = False
            out = picked[left].astype(np.float64)
            rest += float(out @ out)
        return SparseVector(d, cand_idx[sel].astype(INDEX_DTYPE), picked[sel]), rest


def compress(compressor: Compressor, x: np.ndarray, rng: np.random.Generator | None,
             buffer: np.ndarray | None) -> SparseVector:
    """``compressor(x, rng)``, with a d-long scratch ``buffer`` for the compressors that can use one (Top-k)."""
    with_buffer = getattr(compressor, "compress_with", None)
    if buffer is None or with_buffer is None:
        return compressor(x, rng)
    return with_buffer(x, rng, buffer)


def _random_support(d: int, k: int, rng: np.random.Generator | None) -> np.ndarray:
    if rng is None:
        raise ValueError("a randomized compressor needs a generator")
    idx = rng.choice(d, size=min(k, d), replace=False)
    idx.sort()
    return idx.astype(INDEX_DTYPE, copy=False)


@dataclass(frozen=True)
class RandK:
    """k uniformly random coordinates, unscaled: biased, contractive with E‖C(x)−x‖² = (1 − k/d)‖x‖²."""

    k: int
    name: str = "randk"
    randomized: bool = True

    def alpha(self, d: int) -> float:
        return min(self.k, d) / d

    def omega(self, d: int) -> None:
        return None

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> SparseVector:
        idx = _random_support(x.shape[0], self.k, rng)
        return SparseVector(x.shape[0], idx, x[idx])


@dataclass(frozen=True)
class ScaledRandK:
    """(d/k)·x_S for a uniform random S of size k: unbiased, ω = d/k − 1."""

    k: int
    name: str = "urandk"
    randomized: bool = True

    def alpha(self, d: int) -> float | None:
        w = self.omega(d)
        return 1.0 - w if w < 1.0 else None

    def omega(self, d: int) -> float:
        return d / min(self.k, d) - 1.0

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> SparseVector:
        d = x.shape[0]
        idx = _random_support(d, self.k, rng)
        return SparseVector(d, idx, x[idx] * (d / idx.shape[0]))


@dataclass(frozen=True)
class Natural:
    """Natural compression: each coordinate rounded at random to a neighbouring power of two, unbiased, ω = 1/8."""

    name: str = "natural"
    randomized: bool = True

    def alpha(self, d: int) -> float:
        # ω < 1 makes an unbiased compressor contractive with α = 1 − ω.
        return 1.0 - self.omega(d)

    def omega(self, d: int) -> float:
        return 1.0 / 8.0

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> SparseVector:
        if rng is None:
            raise ValueError("a randomized compressor needs a generator")
        mag = np.abs(x)
        out = np.zeros_like(x)
        nz = mag > 0
        m, e = np.frexp(mag[nz])  # mag = m·2^e with m in [0.5, 1): lower power of two is 2^(e−1)
        low = np.ldexp(1.0, e - 1)
        p_up = mag[nz] / low - 1.0
        up = rng.random(p_up.shape[0]) < p_up
        out[nz] = np.where(up, 2.0 * low, low) * np.sign(x[nz])
        return SparseVector.dense(out)


@dataclass(frozen=True)
class ScaledSign:
    """(‖x‖₁/d)·sign(x): deterministic, ‖C(x) − x‖² = ‖x‖² − ‖x‖₁²/d, so α ≥ 1/d (worst case used)."""

    name: str = "sign"
    randomized: bool = False

    def alpha(self, d: int) -> float:
        return 1.0 / d

    def omega(self, d: int) -> None:
        return None

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> SparseVector:
        d = x.shape[0]
        return SparseVector.dense((np.abs(x).sum() / d) * np.sign(x))


@dataclass(frozen=True)
class ContractiveUnbiased:
    """U/(ω + 1) for an unbiased U ∈ U(ω): contractive with α = 1/(ω + 1)."""

    inner: ScaledRandK | Natural
    name: str = "contractive"
    randomized: bool = True

    def alpha(self, d: int) -> float:
        return 1.0 / (self.inner.omega(d) + 1.0)

    def omega(self, d: int) -> None:
        return None

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> SparseVector:
        u = self.inner(x, rng)
        return SparseVector(u.dim, u.indices, u.values * self.alpha(u.dim))


@dataclass(frozen=True)
class LayerwiseTopK:
    """Top-k within each parameter tensor (``ks[j]`` of tensor j's ``sizes[j]`` contiguous entries of x): a global k
    goes to the largest tensors' largest entries and can starve small ones (biases, norms) for many rounds.

    Deterministic and positively homogeneous like Top-k; per tensor ‖C(x_j) − x_j‖² ≤ (1 − k_j/d_j)‖x_j‖², so
    ‖C(x) − x‖² ≤ (1 − min_j k_j/d_j)‖x‖²: α = min_j k_j/d_j, attained by an x spread evenly over the tensor with the
    smallest ratio. The output is one sparse vector over x (ascending indices, tensor after tensor), so it travels
    as any Top-k message."""

    sizes: tuple[int, ...]
    ks: tuple[int, ...]
    name: str = "topk-per-tensor"
    randomized: bool = False

    def alpha(self, d: int) -> float:
        return min(k / n for k, n in zip(self.ks, self.sizes))

    def omega(self, d: int) -> None:
        return None

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> SparseVector:
        parts, offset = [], 0
        for n, k in zip(self.sizes, self.ks):
            parts.append(top_k_indices(x[offset:offset + n], k).astype(np.int64) + offset)
            offset += n
        idx = np.concatenate(parts).astype(INDEX_DTYPE, copy=False)
        return SparseVector(x.shape[0], idx, x[idx])

    @property
    def k(self) -> int:
        return sum(self.ks)


def parse_k_per_tensor(spec: str) -> float | int:
    """``--k-per-tensor``: a count (an integer ≥ 1) or a fraction in (0, 1)."""
    try:
        count = int(spec)
    except ValueError:
        count = None
    if count is not None:
        if count < 1:
            raise UserError(f"--k-per-tensor must be a count >= 1 or a fraction in (0, 1), got {spec!r}")
        return count
    try:
        frac = float(spec)
    except ValueError:
        frac = math.nan
    if not 0.0 < frac < 1.0:
        raise UserError(f"--k-per-tensor must be a count >= 1 or a fraction in (0, 1), got {spec!r}")
    return frac


def layerwise_topk(spec: str, floor: int, tensors: list[tuple[str, int]], d: int) -> LayerwiseTopK:
    """Layer-wise Top-k for ``tensors`` (name, size) in the order they sit in x: a count per tensor (never more
    than a tensor holds), or a fraction of each, rounded up, with at least ``floor`` entries (capped at the size)."""
    if not tensors:
        raise UserError("--k-per-tensor needs an objective that reports its parameter tensors (a PyTorch model, "
                        "ef21.problems.torch); this one gives only d")
    sizes = tuple(int(n) for _, n in tensors)
    if sum(sizes) != d:
        raise UserError(f"the objective's tensors hold {sum(sizes)} entries, but d = {d}")
    k = parse_k_per_tensor(spec)
    if isinstance(k, int):
        small = [(name, n) for name, n in tensors if n < k]
        if small:
            name, n = min(small, key=lambda t: t[1])
            raise UserError(f"--k-per-tensor {k} is larger than tensor {name!r} ({n} entries); give a count <= {n} "
                            f"or a fraction of each tensor (e.g. 0.01) with --k-floor")
        ks = tuple(k for _ in sizes)
    else:
        ks = tuple(min(n, max(floor, math.ceil(k * n))) for n in sizes)
    return LayerwiseTopK(sizes, ks)


COMPRESSOR_NAMES = ("identity", "topk", "randk", "urandk", "natural", "sign", "crandk", "cnatural")
NEEDS_K = {"topk", "randk", "urandk", "crandk"}


class Float32Values:
    """The inner compressor with its values rounded to float32: what the compact encoding sends.

    The worker updates its state with the rounded values (they are what the master receives), so EF21's
    feedback absorbs the rounding like any other compression error. α and ω are the inner compressor's: the
    rounding adds a relative error of at most 2⁻²⁴ per value, far below any α the theory uses.
    """

    def __init__(self, inner: Compressor) -> None:
        self.inner = inner
        self.name = inner.name
        self.randomized = inner.randomized

    def alpha(self, d: int) -> float | None:
        return self.inner.alpha(d)

    def omega(self, d: int) -> float | None:
        return self.inner.omega(d)

    def __call__(self, x: np.ndarray, rng: np.random.Generator | None = None) -> SparseVector:
        c = self.inner(x, rng)
        return SparseVector(c.dim, c.indices, c.values.astype(np.float32).astype(c.values.dtype))


def make_compressor(name: str, k: int | None, d: int) -> Compressor:
    """Build a compressor by its CLI name, checking k against d (0 < k ≤ d)."""
    if name in NEEDS_K:
        if k is None:
            raise UserError(f"compressor {name!r} needs --k")
        if not 0 < k <= d:
            raise UserError(f"--k must satisfy 0 < k <= d = {d}, got {k}")
    if name == "identity":
        return Identity()
    if name == "topk":
        return TopK(k)
    if name == "randk":
        return RandK(k)
    if name == "urandk":
        return ScaledRandK(k)
    if name == "natural":
        return Natural()
    if name == "sign":
        return ScaledSign()
    if name == "crandk":
        return ContractiveUnbiased(ScaledRandK(k), name="crandk")
    if name == "cnatural":
        return ContractiveUnbiased(Natural(), name="cnatural")
    raise UserError(f"unknown compressor {name!r}; choose one of {', '.join(COMPRESSOR_NAMES)}")


def max_entries(comp: Compressor, d: int) -> int:
    """The most values one output of ``comp`` carries: k for the k-sparsifiers (whatever wraps them), d for the
    rest. A receiver refuses a message that holds more: no honest sender produces it."""
    while isinstance(comp, (Float32Values, ContractiveUnbiased)):
        comp = comp.inner
    if isinstance(comp, (TopK, RandK, ScaledRandK, LayerwiseTopK)):
        return min(comp.k, d)
    return d


def theory_alpha(comp: Compressor, d: int) -> float:
    """α used by the stepsize rule: the contraction constant, or 1/(ω+1) for an unbiased-only compressor."""
    a = comp.alpha(d)
    if a is not None:
        return a
    w = comp.omega(d)
    assert w is not None
    return 1.0 / (w + 1.0)


def log2_ceil(d: int) -> int:
    return max(1, math.ceil(math.log2(d))) if d > 1 else 1
