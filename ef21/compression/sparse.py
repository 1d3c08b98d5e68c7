"""The sparse vector that travels between workers and the master, and the arithmetic on it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels

INDEX_DTYPE = np.dtype("<u4")
VALUE_DTYPE = np.dtype("<f8")
F32 = np.dtype("<f4")


def value_dtype(a: np.ndarray) -> np.dtype:
    """The dtype a vector's values keep: float32 stays float32 (a ``--dtype float32`` run), anything else is
    float64."""
    return F32 if a.dtype == F32 else VALUE_DTYPE


@dataclass(frozen=True, eq=False)
class SparseVector:
    """A vector of length ``dim``: ``values`` at ``indices`` and zero elsewhere.

    ``indices is None`` means the vector is dense (``values`` has length ``dim``): identity, sign and natural
    compressors produce dense vectors, and sending indices for them would only cost bytes.
    Indices, when present, are sorted, unique, uint32.
    """

    dim: int
    indices: np.ndarray | None
    values: np.ndarray

    def __init__(self, dim: int, indices: np.ndarray | None, values: np.ndarray) -> None:
        # A frozen dataclass's generated __init__ sets each field through object.__setattr__ (~0.4 µs for these
        # three); the master builds one for every vector it decodes, so the fields go straight into the instance's
        # dict, as codec.EncodedVector does (tests/test_fastwire.py checks that this signature lists the fields).
        fields = self.__dict__
        fields["dim"], fields["indices"], fields["values"] = dim, indices, values

    @staticmethod
    def dense(values: np.ndarray) -> SparseVector:
        v = np.asarray(values)
        v = np.asarray(v, dtype=value_dtype(v))
        return SparseVector(v.shape[0], None, v)

    @staticmethod
    def zeros(dim: int, dtype: np.dtype | type = np.float64) -> SparseVector:
        return SparseVector(dim, np.zeros(0, dtype=INDEX_DTYPE), np.zeros(0, dtype=dtype))

    @property
    def is_dense(self) -> bool:
        return self.indices is None

    @property
    def nnz(self) -> int:
        """Number of values carried (d for a dense vector): what the paper's bit count is based on."""
        return int(self.values.shape[0])

    def scaled(self, w: float) -> SparseVector:
        """w·self as a new vector (the same support)."""
        return SparseVector(self.dim, self.indices, self.values * w)

    def to_dense(self) -> np.ndarray:
        if self.indices is None:
            return self.values.copy()
        out = np.zeros(self.dim, dtype=self.values.dtype)
        out[self.indices] = self.values
        return out

    def add_to(self, target: np.ndarray, scale: float = 1.0) -> None:
        """target += scale * self, in place. Indices are unique, so each entry is added once: into a float64 target,
        or one of the values' own dtype (a float32 run's g_i and g), by ``np.add.at`` (one pass; ~2x faster than fancy
        indexing's gather, add and scatter, with the same bits: one addition an entry in the target's dtype), into
        float32 from float64 values by fancy indexing, which adds in float64 and rounds once."""
        values = self.values if scale == 1.0 else scale * self.values
        if self.indices is None:
            target += values
        elif target.dtype == np.float64 or target.dtype == values.dtype:
            np.add.at(target, self.indices, values)
        else:
            target[self.indices] += values


def sparse_sum(vectors: list[SparseVector], dim: int) -> SparseVector:
    """Sum of vectors, added in the order given; sparse over the union of the supports unless one is dense.

    The order is part of the contract: float addition is not associative, and the master and every replica must
    get the same bits, so callers pass messages in rank order. Every path adds each coordinate's values one after
    another in rank order starting from 0.0 (``np.bincount`` adds each bin's weights in input order, ``np.add.at``
    goes through its entries in order), so they all give exactly the bits of adding the vectors one by one.

    Cost, for m = Σ nnz entries of n vectors, none of it a term in d while the union is small:
    * with numba (``ef21[fast]``), O(m) by a stable radix sort of the entries (``kernels.radix_fold``) while
      m ≤ d/4;
    * without it, O(m·log n) by a merge of the n ascending runs (``_merged_sum``) while m·log2(n) ≤ d/4;
    * past those, the union is a good part of d and a d-long mask costs less (``_masked_sum``, O(m + d), which is
      O(m) there).
    docs/benchmarks/master.md has the measurements behind the switches.
    float32 vectors (``--dtype float32``) are summed in float32 the same way (``np.add.at``: bincount would add in
    float64, which no float32 replica does).
    """
    dtype = np.result_type(*(v.values.dtype for v in vectors)) if vectors else np.dtype(np.float64)
    if any(v.indices is None for v in vectors):
        acc = np.zeros(dim, dtype=dtype)
        for v in vectors:
            v.add_to(acc)
        return SparseVector(dim, None, acc)
    if not vectors:
        return SparseVector.zeros(dim, dtype)
    if len(vectors) == 1:
        v = vectors[0]
        return SparseVector(dim, v.indices, v.values + 0.0)  # + 0.0: the same bits as 0.0 + v, as a copy
    total = sum(v.nnz for v in vectors)
    if not total:  # every vector empty (CLAG's skips, a round of zero messages): the merge needs one entry
        return SparseVector.zeros(dim, dtype)
    idx = np.concatenate([v.indices for v in vectors])  # type: ignore[misc]
    vals = np.concatenate([v.values for v in vectors])
    if total * RADIX_PER_MASK <= dim:
        fast = kernels.radix_fold(idx, vals, dim)  # None: no numba, or too few entries to be worth it
        if fast is not None:
            return SparseVector(dim, fast[0], fast[1])
    if total * max(1, (len(vectors) - 1).bit_length()) * MERGE_PER_MASK > dim:
        return _masked_sum(idx, vals, dim, dtype)
    return _merged_sum(idx, vals, dim, dtype)


RADIX_PER_MASK = 4
"""The radix sort's two scatter passes over an entry against the mask's coordinates: beyond m = d/4 the d-long mask
costs less (measured, benchmarks/master_cost.py)."""
MERGE_PER_MASK = 4
"""How many coordinates of the d-long mask (an O(d) pass, plus page faults of fresh memory) cost as much as one
entry of the merge moves, per level of log2(n): measured, benchmarks/master_cost.py."""


def _merged_sum(idx: np.ndarray, vals: np.ndarray, dim: int, dtype: np.dtype = np.dtype(np.float64)
                ) -> SparseVector:
    """The sum by merging the ascending index runs: a stable sort (timsort, which finds the n runs and merges them
    in O(m·log n)) keeps each coordinate's entries in rank order, so ``np.bincount`` over the merged order adds them
    as the rank-ordered sum does."""
    order = np.argsort(idx, kind="stable")
    merged = idx[order]
    first = np.empty(merged.shape[0], dtype=bool)
    first[0] = True
    np.not_equal(merged[1:], merged[:-1], out=first[1:])
    support = merged[first]
    slot = np.cumsum(first) - 1  # each merged entry's place in the support
    vals = vals[order]
    if dtype == F32:
        summed = np.zeros(support.shape[0], dtype=F32)
        np.add.at(summed, slot, vals)
    else:
        summed = np.bincount(slot, weights=vals, minlength=support.shape[0])
    return SparseVector(dim, support.astype(INDEX_DTYPE, copy=False), summed)


def _masked_sum(idx: np.ndarray, vals: np.ndarray, dim: int, dtype: np.dtype = np.dtype(np.float64)
                ) -> SparseVector:
    """The sum through d-long buffers: accumulate into a dense one (np.zeros is calloc, so untouched pages cost
    nothing) and find the support with a mask: O(m + d), no sort."""
    acc = np.zeros(dim, dtype=dtype)
    # np.add.at is unbuffered and goes through the entries in order: rank order within every coordinate.
    np.add.at(acc, idx, vals)
    mark = np.zeros(dim, dtype=bool)
    mark[idx] = True
    support = np.flatnonzero(mark)
    return SparseVector(dim, support.astype(INDEX_DTYPE), acc[support])
