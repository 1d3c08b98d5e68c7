"""Fused loops over d for a worker's steady round, compiled by numba when it is installed (``pip install
'ef21[fast]'``); without it, ``None`` from each entry point sends the caller down its numpy path, which gives the
same bits (``tests/test_passes.py`` checks both).

numpy makes one pass over d per operation, each with a temporary or a kept buffer: EF21's Top-k step reads
``grad`` and ``g_i`` to write the residual, reads that to write its magnitudes, compares them with a threshold and
finds the survivors (four passes), and ``x −= s·g`` is two. A compiled loop does each in one:

* ``residual_candidates``: the ascending positions j with |grad_j − g_i,j| ≥ t, into a kept buffer — Top-k's
  sampled path (``ef21.compression.compressors.top_k_indices``) without ever storing the residual;
* ``sub_scaled``: x ← x − s·g, the product rounded before the subtraction as numpy's two operations round it (no
  fused multiply-add: numba leaves fast-math off, so LLVM does not contract the two).

The magnitude is computed as numpy computes it, |a − b| in the vectors' dtype, so the candidates (and therefore the
selection and its ties) are the same; what is left (the exact selection among ~2k candidates, the k values)
is k-sized numpy work shared with the numpy path.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

MIN_D = 1 << 15
"""Below this d a pass is a few microseconds and numba's import and first dispatch (about 2 s each on a loaded
2-core machine, the compiled code cached on disk after the first process) would cost more than a run saves: the
numpy path runs, and small runs (the tests' mushrooms, d = 112) never import numba."""


def numba_or_none() -> Any:
    """numba where it is installed (``ef21[fast]``), else None: each compiled section imports it through this, when
    it is first used."""
    try:
        import numba
    except ImportError:
        return None
    return numba


def njit(numba: Any) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit`` as every compiled loop here takes it (nogil, no bounds checks), cached on disk where numba finds
    a writable place for its cache — beside the source, or the user's cache directory (``NUMBA_CACHE_DIR``) — and
    compiled in memory where it finds none. numba refuses ``cache=True`` outright there ("no locator available"):
    an installed package in a container whose user has no writable home, which would otherwise turn the first large
    message into an internal error."""
    def decorate(fn: Callable[..., Any]) -> Any:
        try:
            return numba.njit(cache=True, nogil=True, boundscheck=False)(fn)
        except RuntimeError:  # no cache locator: compile in this process only (1-2 s once)
            return numba.njit(nogil=True, boundscheck=False)(fn)
    return decorate


@functools.cache  # imported and compiled on the first round that uses them, not at every ef21 start
def _compile() -> tuple[Callable[..., int], Callable[..., None]] | None:
    numba = numba_or_none()
    if numba is None:
        return None

    @njit(numba)
    def candidates(grad: Any, g_i: Any, t: Any, out: Any) -> int:  # pragma: no cover - compiled
        """Writes the positions with |grad − g_i| ≥ t into ``out`` in ascending order; returns their count, or
        −1 once ``out`` is full (the caller then takes the full selection)."""
        cap = out.shape[0]
        m = 0
        for j in range(grad.shape[0]):
            if abs(grad[j] - g_i[j]) >= t:
                if m == cap:
                    return -1
                out[m] = j
                m += 1
        return m

    @njit(numba)
    def sub_scaled(x: Any, s: Any, g: Any) -> None:  # pragma: no cover - compiled
        for j in range(x.shape[0]):
            x[j] = x[j] - s * g[j]

    return candidates, sub_scaled


def available(d: int = MIN_D) -> bool:
    """Whether the compiled loops are in use for vectors of d entries (numba importable, d ≥ ``MIN_D``)."""
    return d >= MIN_D and _compile() is not None


def residual_candidates(grad: np.ndarray, g_i: np.ndarray, t: float, out: np.ndarray) -> np.ndarray | None:
    """Ascending positions with |grad − g_i| ≥ t (a view of ``out``), in one pass over d; None without numba or
    when more than ``out`` holds pass (the caller's numpy path decides then)."""
    kernels = _compile() if grad.shape[0] >= MIN_D else None
    if kernels is None:
        return None
    m = kernels[0](grad, g_i, grad.dtype.type(t), out)
    return None if m < 0 else out[:m]


def sub_scaled(x: np.ndarray, s: float, g: np.ndarray) -> bool:
    """x ← x − s·g in one pass (s rounded to x's dtype first, as numpy takes a Python float); False without numba
    (the caller does it with numpy)."""
    kernels = _compile() if x.shape[0] >= MIN_D else None
    if kernels is None or x.dtype != g.dtype:
        return False
    kernels[1](x, x.dtype.type(s), g)
    return True


# -- the master's fold: a stable radix sort of the n messages' entries ---------------------------------------------
#
# Summing n sparse vectors in rank order needs their entries grouped by coordinate, each group in rank order, and
# the groups in ascending coordinate order (the downlink's support). A comparison sort (numpy's merge of the n
# ascending runs) is O(m·log n) for m = n·k entries. A least-significant-digit radix sort is stable and linear:
# p counting passes over the m (index, value) pairs with 2^b buckets each, where p·b covers the index width
# (two passes of ≤ 16 bits for any d ≤ 2^32): O(p·(m + 2^b)), no term in d, and stability keeps each coordinate's
# entries in the order they came, the rank order. One more pass adds each group up from 0.0 in that order, which
# is the addition ``np.bincount``/``np.add.at`` perform, so the bits are the numpy path's.

FOLD_MIN_ENTRIES = 1 << 12
"""Below this many entries numpy's merge costs microseconds: small rounds (and the tests' d = 112 runs) never import
numba for the fold."""


@functools.cache
def _compile_fold() -> Callable[..., int] | None:
    numba = numba_or_none()
    if numba is None:
        return None

    @njit(numba)
    def radix_sum(idx: Any, vals: Any, bits: int, out_idx: Any, out_vals: Any,
                  tmp_idx: Any, tmp_vals: Any) -> int:  # pragma: no cover - compiled
        """Sorts the (idx, vals) pairs stably by idx (LSD radix, the ``bits`` of an index split into passes of
        ≤ 16), then writes each distinct index once, with the sum of its values added in input order from zero,
        into ``out_idx``/``out_vals``; returns how many. ``idx``/``vals`` are clobbered (they are scratch)."""
        m = idx.shape[0]
        passes = max(1, (bits + 15) // 16)
        width = (bits + passes - 1) // passes
        buckets = 1 << width
        mask = buckets - 1
        count = np.empty(buckets + 1, dtype=np.int64)
        src_i, src_v, dst_i, dst_v = idx, vals, tmp_idx, tmp_vals
        shift = 0
        for _ in range(passes):
            count[:] = 0
            for j in range(m):
                count[((np.int64(src_i[j]) >> shift) & mask) + 1] += 1
            for b in range(buckets):
                count[b + 1] += count[b]
            for j in range(m):  # in input order: the stable part
                b = (np.int64(src_i[j]) >> shift) & mask
                p = count[b]
                dst_i[p] = src_i[j]
                dst_v[p] = src_v[j]
                count[b] = p + 1
            src_i, src_v, dst_i, dst_v = dst_i, dst_v, src_i, src_v
            shift += width
        zero = out_vals.dtype.type(0)
        s = -1
        last = np.int64(-1)
        for j in range(m):
            i = np.int64(src_i[j])
            if i != last:
                s += 1
                out_idx[s] = src_i[j]
                out_vals[s] = zero
                last = i
            out_vals[s] += src_v[j]  # in the values' dtype: a float32 run adds in float32, as its replicas do
        return s + 1

    return radix_sum


def radix_fold(idx: np.ndarray, vals: np.ndarray, dim: int, min_entries: int = FOLD_MIN_ENTRIES
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """The sum of the entries (``idx``, ``vals``: every message's entries concatenated in rank order, taken over as
    scratch) as (ascending support, sums), in O(m); None without numba or below ``min_entries`` (the caller's numpy
    merge gives the same bits)."""
    m = idx.shape[0]
    kernel = _compile_fold() if m >= min_entries else None
    if kernel is None:
        return None
    out_idx = np.empty(m, dtype=idx.dtype)
    out_vals = np.empty(m, dtype=vals.dtype)
    count = kernel(idx, vals, max(1, (dim - 1).bit_length()), out_idx, out_vals,
                   np.empty_like(idx), np.empty_like(vals))
    return out_idx[:count], out_vals[:count]


# --- Evaluation rounds: the candidates and the compression error in the same pass -------------------------------
# A separate section (its own compiled function and entry point), so the steady round's kernel above stays as it is.

_BLOCK = 1024
"""The error's partial sums run over blocks of this many entries, then add up: a rounding error of about
(1024 + d/1024)·ε instead of a plain running sum's d·ε (ε of float64, which the sum is kept in for either dtype)."""


@functools.cache
def _compile_with_error() -> Callable[..., tuple[int, float]] | None:
    numba = numba_or_none()
    if numba is None:
        return None

    @njit(numba)
    def candidates_and_rest(grad: Any, g_i: Any, t: Any, out: Any, block: int) -> tuple[int, float]:  # pragma: no cover
        """``candidates`` above, and Σ (grad_j − g_i,j)² over the positions that are NOT candidates (each residual
        rounded to the vectors' dtype as numpy's subtraction rounds it, then squared and summed in float64); the
        count is −1 once ``out`` is full."""
        cap = out.shape[0]
        d = grad.shape[0]
        m = 0
        total = 0.0
        for start in range(0, d, block):
            part = 0.0
            for j in range(start, min(start + block, d)):
                r = grad[j] - g_i[j]
                if abs(r) >= t:
                    if m == cap:
                        return -1, 0.0
                    out[m] = j
                    m += 1
                else:
                    w = np.float64(r)
                    part += w * w
            total += part
        return m, total

    return candidates_and_rest


def residual_candidates_and_rest(grad: np.ndarray, g_i: np.ndarray, t: float, out: np.ndarray
                                 ) -> tuple[np.ndarray, float] | None:
    """``residual_candidates`` and, in the same pass over d, Σ (grad − g_i)² over the positions that are not
    candidates (float64), which an evaluation round's ‖r − C(r)‖² needs; None as ``residual_candidates`` gives it
    (no numba, a small d, a full ``out``). ``_compile`` is the switch for every compiled loop: where it gives None,
    this does too."""
    kernel = _compile_with_error() if grad.shape[0] >= MIN_D and _compile() is not None else None
    if kernel is None:
        return None
    m, rest = kernel(grad, g_i, grad.dtype.type(t), out, _BLOCK)
    return None if m < 0 else (out[:m], float(rest))


# --- The separable quadratic's gradient in one pass ------------------------------------------------------------------
# ``ef21.problems.objectives.SeparableQuadratic``, what the benchmarks' worker runs "so that they measure the system
# rather than the gradient": numpy's h * (x − c) makes two passes with a temporary, and for a float32 x two more
# (mixed-dtype ufuncs cast through buffers); one loop reads h, x, c and writes the gradient in x's dtype.

@functools.cache
def _compile_scaled_difference() -> Callable[..., None] | None:
    numba = numba_or_none()
    if numba is None:
        return None

    @njit(numba)
    def scaled_difference(h: Any, x: Any, c: Any, out: Any) -> None:  # pragma: no cover - compiled
        for j in range(out.shape[0]):
            out[j] = h[j] * (x[j] - c[j])

    return scaled_difference


def scaled_difference(h: np.ndarray, x: np.ndarray, c: np.ndarray, out: np.ndarray) -> bool:
    """out ← h·(x − c) in one pass: h and c float64, x float64 or float32 (widened exactly, as numpy's mixed
    subtraction widens it), the float64 product rounded once to out's dtype, as numpy writes it (a difference then a
    product: nothing for a fused multiply-add to contract). False without numba or below ``MIN_D``: numpy then."""
    if x.shape[0] < MIN_D or _compile() is None or h.dtype != np.float64 or c.dtype != np.float64:
        return False
    if out.dtype != x.dtype or x.dtype not in (np.float64, np.float32):
        return False
    kernel = _compile_scaled_difference()
    if kernel is None:
        return False
    kernel(h, x, c, out)
    return True


# -- the decoder's checks: one pass over a received vector -------------------------------------------------------------
#
# Every vector the master receives is checked before it reaches any state (``ef21.compression.codec.decode``): its
# values finite, its indices strictly increasing and below d. numpy does that in two passes with a temporary (a dot
# product for the values, a comparison of each index with the next into k bytes and a scan of those); one compiled
# loop reads each entry once and keeps nothing. Finiteness is read off the bits, so the loop is integer work that
# vectorises without fast-math: an IEEE value is NaN or ±Inf iff its exponent bits are all ones, and adding one unit
# of the exponent's lowest bit to the masked exponent then carries into the sign bit, which no finite value's does.

MIN_ENTRIES = 1 << 13
"""Below this many entries numpy's passes cost a few microseconds and numba's import (about 2 s on a loaded 2-core
machine, once a process) is not worth it: small messages, and the tests' small runs, never import numba."""

CHECK_OK, CHECK_NON_FINITE, CHECK_NOT_INCREASING, CHECK_OUT_OF_RANGE = 0, 1, 2, 3
"""What ``vector_checks`` found, the first in this order (the order in which the numpy path raises)."""


@functools.cache  # imported and compiled when the first large vector arrives, not at every ef21 start
def _compile_checks() -> Callable[..., int] | None:
    numba = numba_or_none()
    if numba is None:
        return None

    @njit(numba)
    def scan(bits: Any, exp: Any, carry: Any, idx: Any, sparse: Any) -> tuple[bool, bool]:  # pragma: no cover
        """(some value non-finite, some index not above the one before it), reading each entry once; the loop
        has no exit, so that it vectorises."""
        n = bits.shape[0]
        acc = (bits[0] & exp) + carry if n else exp - exp
        order = False
        if sparse:
            for j in range(1, n):
                acc |= (bits[j] & exp) + carry
                order |= idx[j] <= idx[j - 1]
        else:
            for j in range(1, n):
                acc |= (bits[j] & exp) + carry
        return (acc & (exp + carry)) != 0, order  # exp + carry: the sign bit alone

    @njit(numba)
    def checks(idx: Any, vals: Any, dim: Any, sparse: Any) -> int:  # pragma: no cover - compiled
        """One pass over ``vals`` (float64 or float32) and, when ``sparse``, over ``idx`` (as many)."""
        if vals.itemsize == 8:
            bad, order = scan(vals.view(np.uint64), np.uint64(0x7FF0000000000000), np.uint64(1 << 52), idx, sparse)
        else:
            bad, order = scan(vals.view(np.uint32), np.uint32(0x7F800000), np.uint32(1 << 23), idx, sparse)
        if bad:
            return CHECK_NON_FINITE
        if not sparse or idx.shape[0] == 0:
            return CHECK_OK
        if order:
            return CHECK_NOT_INCREASING
        return CHECK_OUT_OF_RANGE if idx[idx.shape[0] - 1] >= dim else CHECK_OK

    return checks


def vector_checks(idx: np.ndarray | None, vals: np.ndarray, dim: int) -> int | None:
    """One of the ``CHECK_*`` codes for a received vector (``idx`` None: a dense one; else as many indices as
    values), in one pass; None without numba or below ``MIN_ENTRIES`` (the caller checks with numpy)."""
    kernel = _compile_checks() if vals.shape[0] >= MIN_ENTRIES else None
    if kernel is None:
        return None
    return kernel(vals[:0] if idx is None else idx, vals, dim, idx is not None)  # type: ignore[no-any-return]
