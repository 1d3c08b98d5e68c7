"""The sparse vector that travels between workers and the master, and the arithmetic on it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
        """target += scale * self, in place. Indices are unique, so plain fancy indexing adds each once."""
        if self.indices is None:
            if scale == 1.0:
                target += self.values
            else:
                target += scale * self.values
        elif scale == 1.0:
            target[self.indices] += self.values
        else:
            target[self.indices] += scale * self.values


def sparse_sum(vectors: list[SparseVector], dim: int) -> SparseVector:
    """Sum of vectors, added in the order given; sparse over the union of the supports unless one is dense.

    The order is part of the contract: float addition is not associative, and the master and every replica must
    get the same bits, so callers pass messages in rank order. Both sparse paths add every coordinate's values
    one after another in rank order starting from 0.0 (``np.bincount`` adds each bin's weights in input order),
    so they give exactly the bits of adding the vectors one by one. float32 vectors (``--dtype float32``) are
    summed in float32 the same way (``np.add.at``: bincount would add in float64, which no float32 replica does).
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
    if total * 64 >= dim:
        # Many entries for the dimension: accumulate into a dense buffer (np.zeros is calloc, so untouched pages
        # cost nothing) and find the support with a mask: O(entries + d/8), no sort.
        idx = np.concatenate([v.indices for v in vectors])
        acc = np.zeros(dim, dtype=dtype)
        # np.add.at is unbuffered and goes through the entries in order: rank order within every coordinate.
        np.add.at(acc, idx, np.concatenate([v.values for v in vectors]))
        mark = np.zeros(dim, dtype=bool)
        mark[idx] = True
        support = np.flatnonzero(mark)
        return SparseVector(dim, support.astype(INDEX_DTYPE), acc[support])
    idx = np.concatenate([v.indices for v in vectors])
    vals = np.concatenate([v.values for v in vectors])
    support, inverse = np.unique(idx, return_inverse=True)
    if dtype == F32:
        summed = np.zeros(support.shape[0], dtype=F32)
        np.add.at(summed, inverse, vals)
    else:
        summed = np.bincount(inverse, weights=vals, minlength=support.shape[0])
    return SparseVector(dim, support.astype(INDEX_DTYPE, copy=False), summed)
