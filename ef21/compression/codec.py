"""The sparse codec: a SparseVector to and from raw little-endian bytes, with validation on decode.

Protobuf stays at the edge (``ef21_wire``): this module only turns arrays into buffers and back, so it is
testable here and the same rules apply whatever carries the bytes. Decoding never trusts its input: every
property the math relies on (dimension, index range, strictly increasing indices, finite values, matching
lengths) is checked before a vector reaches any state.

Two layouts:

* plain — indices as uint32, values as float64 (or float32): 12 bytes an entry;
* compact — values as float32 and indices in the Elias–Fano code (``pack_indices``): about 2 + log2(d/k) bits an
  index, so Top-k of d = 10⁶ with k ≥ 100 takes under 6 bytes an entry.

Encoding hands out views of the vector's own arrays where it can (no copy): the transport copies them once
into the message it sends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import kernels
from .sparse import F32, INDEX_DTYPE, VALUE_DTYPE, SparseVector

Buffer = bytes | memoryview


class CodecError(ValueError):
    """A vector on the wire is malformed; the message says what is wrong."""


@dataclass(frozen=True)
class EncodedVector:
    dim: int
    indices: Buffer
    values: Buffer
    dense: bool
    float32: bool = False
    index_bits: int = 0
    """0: indices are uint32; b in 1..32: Elias–Fano with b − 1 low bits (``pack_indices``)."""

    def __init__(self, dim: int, indices: Buffer, values: Buffer, dense: bool, float32: bool = False,
                 index_bits: int = 0) -> None:
        # The generated __init__ of a frozen dataclass sets each field through object.__setattr__ (~0.8 µs for these
        # six); the master builds one for every vector it receives, so the fields go straight into the instance's dict
        # (tests/test_fastwire.py checks that this signature lists the fields above).
        fields = self.__dict__
        fields["dim"], fields["indices"], fields["values"] = dim, indices, values
        fields["dense"], fields["float32"], fields["index_bits"] = dense, float32, index_bits

    @property
    def size(self) -> int:
        return len(self.indices) + len(self.values)


def _view(a: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(a)).cast("B")


def encode(v: SparseVector, *, float32: bool = False, packed: bool = False) -> EncodedVector:
    """``float32``: values as float32 (the compact encoding rounds them first); float32 values (a ``--dtype
    float32`` run's) always travel as float32."""
    float32 = float32 or v.values.dtype == F32
    vals = _view(v.values.astype(F32 if float32 else VALUE_DTYPE, copy=False))
    if v.indices is None:
        return EncodedVector(v.dim, b"", vals, True, float32)
    if packed:
        bits, buf = pack_indices(v.indices, v.dim)
        return EncodedVector(v.dim, buf, vals, False, float32, bits)
    return EncodedVector(v.dim, _view(v.indices.astype(INDEX_DTYPE, copy=False)), vals, False, float32)


def fits_float32(values: np.ndarray) -> bool:
    """Whether float32 carries these values exactly (the compact encoding never rounds on its own: the
    compressor does, so that the sender's state holds the same bits as the receiver's)."""
    with np.errstate(over="ignore"):
        return bool(np.array_equal(values.astype(F32).astype(np.float64), values))


def pack_indices(idx: np.ndarray, dim: int) -> tuple[int, bytes]:
    """Strictly increasing indices in [0, dim) → (index_bits, Elias–Fano bytes), index_bits = low bits + 1.

    Each index is split into its ``low`` lowest bits, stored bit-sliced (bit 0 of every index, then bit 1, …,
    each slice padded to whole bytes), and the rest, stored as a bit vector with a one at (index >> low) + i for
    the i-th index. With low = ⌊log2(dim / k)⌋ that is about k·(low + 2) bits,
    within two bits an index of the least any code can do for k positions out of dim.
    """
    k = idx.shape[0]
    low = min(31, max(0, int(math.floor(math.log2(dim / k))))) if k else 0
    wide = idx.astype(np.int64)
    parts = []
    if low:
        # Bit-sliced: bit j of every index, then bit j + 1, ...; each plane padded to whole bytes.
        planes = ((wide[None, :] >> np.arange(low, dtype=np.int64)[:, None]) & 1).astype(np.uint8)
        parts.append(np.packbits(planes, axis=1, bitorder="little").tobytes())
    if k:
        ones = (wide >> low) + np.arange(k)
        bitvec = np.zeros(int(ones[-1]) + 1, dtype=np.uint8)
        bitvec[ones] = 1
        parts.append(np.packbits(bitvec, bitorder="little").tobytes())
    return low + 1, b"".join(parts)


def unpack_indices(buf: Buffer, index_bits: int, count: int, dim: int, *, checked: bool = True) -> np.ndarray:
    """Inverse of ``pack_indices`` for ``count`` indices, checked (unless ``checked`` is False: ``decode`` checks them
    with the values): strictly increasing and below dim."""
    low = index_bits - 1
    if not 0 <= low <= 31:
        raise CodecError(f"index_bits {index_bits} outside 1..32")
    low_bytes = low * ((count + 7) // 8)
    # The bit vector needs count + (dim >> low) bits at most; more bytes than that is not an honest encoding.
    most = low_bytes + (count + (dim >> low) + 8) // 8
    if not low_bytes <= len(buf) <= most:
        raise CodecError(f"packed indices have {len(buf)} bytes, not within {low_bytes}..{most} for {count} "
                         f"entries of {low} low bits")
    raw = np.frombuffer(buf, dtype=np.uint8)
    ones = np.flatnonzero(np.unpackbits(raw[low_bytes:], bitorder="little").view(np.bool_))  # bool: fast path
    if ones.shape[0] != count:
        raise CodecError(f"packed indices hold {ones.shape[0]} entries, the values {count}")
    idx = (ones - np.arange(count)) << low
    if low and count:
        planes = np.unpackbits(raw[:low_bytes].reshape(low, -1), axis=1, count=count, bitorder="little")
        if count <= 4096:  # one small product beats `low` passes over a short array
            idx |= (np.int64(1) << np.arange(low, dtype=np.int64)) @ planes.astype(np.int64)
        else:
            for j in range(low):
                idx |= planes[j].astype(np.int64) << j
    if checked:
        _check_increasing_below(idx, dim)
    return idx


def _check_increasing_below(idx: np.ndarray, dim: int) -> None:
    """Strictly increasing (so no duplicates) and below dim, in one pass over the indices: one comparison of each
    index with the next into k bytes, and ``argmin`` over those (it stops at the first False: a short scan of bytes,
    ~10x cheaper than ``all``); the range then needs only the last index."""
    k = idx.shape[0]
    if k > 1:
        step = np.greater(idx[1:], idx[:-1])
        if not step[step.argmin()]:
            raise CodecError("indices are not strictly increasing (unsorted or duplicate)")
    if k and int(idx[-1]) >= dim:  # increasing, so the last is the largest
        raise CodecError(f"index {int(idx[-1])} out of range for dimension {dim}")


def _aligned(a: np.ndarray) -> np.ndarray:
    """A view into a message lands wherever its field starts: aligned when the sender wrote it so (the hand-written
    path, protocol 8), perhaps not from another writer (the generated code adds no pads). numpy's fast loops and BLAS
    need aligned data, and one copy costs less than a slow pass (10-20x slower for the finite check's dot product)."""
    return a if a.flags.aligned else a.copy()


def _check_finite(vals: np.ndarray) -> None:
    """One pass: v·v is non-finite iff some entry is NaN/Inf, or it overflows, which only finite huge values do: those
    are then checked one by one. (A BLAS dot product is ~1.5x faster than an isfinite pass and allocates nothing.)"""
    if not vals.shape[0]:
        return
    with np.errstate(over="ignore", invalid="ignore"):
        square = float(np.dot(vals, vals))  # np.dot: BLAS at once; the @ operator costs ~4 µs more a call
    if not math.isfinite(square) and not np.isfinite(vals).all():
        raise CodecError("non-finite value (NaN or Inf)")


def _check(idx: np.ndarray | None, vals: np.ndarray, dim: int) -> None:
    """The values finite and the indices (None: a dense vector's) strictly increasing and below dim, or CodecError:
    one compiled pass over both (``kernels.vector_checks``) or, without numba and for small vectors, numpy's passes.
    Both refuse the same vectors, for the first fault in the same order (values, order, range): numpy's passes then
    word the refusal the compiled pass found (a refused message is rare; the accepted ones take one pass)."""
    found = kernels.vector_checks(idx, vals, dim)
    if found != kernels.CHECK_OK:
        _check_numpy(idx, vals, dim, found)


def _check_numpy(idx: np.ndarray | None, vals: np.ndarray, dim: int, found: int | None) -> None:
    """``_check``'s numpy passes, after the compiled pass found a fault (``found``) or could not run (None)."""
    _check_finite(vals)
    if idx is not None:
        _check_increasing_below(idx, dim)
    if found is not None:  # the compiled pass refused what numpy accepts: a bug, never an accepted vector
        raise RuntimeError(f"the compiled check found fault {found} that numpy's did not")


def decode(e: EncodedVector, *, expected_dim: int, max_nnz: int | None = None,
           dtype: np.dtype | type = np.float64) -> SparseVector:
    """Buffers back to a SparseVector with values of ``dtype`` (float64: float32 values are widened, exactly;
    float32, a ``--dtype float32`` run's vectors: float64 values are refused, since narrowing would round them
    where the sender did not), or CodecError saying what is wrong.

    ``max_nnz`` bounds the entries of any vector (a dense one carries ``expected_dim``): what the sender's
    compressor can produce.

    This runs on every message the master receives: the sizes are checked first, then the values and indices in
    one pass (``_check``; numpy's two below ``kernels.MIN_ENTRIES`` entries or without numba). Plain
    float64 values and uint32 indices are read-only views of the buffer (no copy) when they arrive aligned, as the
    hand-written writer sends them (ef21_wire/fastwire.py); the vector keeps the buffer alive.
    """
    if e.dim != expected_dim:
        raise CodecError(f"dimension {e.dim} != {expected_dim}")
    width, size = 4 if e.float32 else 8, len(e.values)
    if size % width:
        raise CodecError(f"values field has {size} bytes, not a multiple of {width}")
    if max_nnz is not None and size // width > max_nnz:  # before any pass over the values
        raise CodecError(f"{size // width} entries, at most {max_nnz} allowed")
    if dtype is not np.float64 and np.dtype(dtype) == F32:  # `is`: the common case without np.dtype's call
        if not e.float32:
            raise CodecError("float64 values in a float32 run (--dtype float32 sends float32)")
        vals = _aligned(np.frombuffer(e.values, F32))
    elif e.float32:
        vals = np.frombuffer(e.values, F32).astype(np.float64)
    else:
        vals = np.frombuffer(e.values, VALUE_DTYPE)
        if not vals.flags.aligned:  # _aligned, written out (the common path)
            vals = vals.copy()
    n = vals.shape[0]
    if e.dense:
        if len(e.indices) or e.index_bits:
            raise CodecError("a dense vector carries no indices")
        if n != expected_dim:
            raise CodecError(f"dense vector has {n} values, expected {expected_dim}")
        _check(None, vals, expected_dim)
        return SparseVector(expected_dim, None, vals)
    if e.index_bits:
        wide = unpack_indices(e.indices, e.index_bits, n, expected_dim, checked=False)
        _check(wide, vals, expected_dim)  # int64: checked before the cast, which could wrap an index past 2**32
        return SparseVector(expected_dim, wide.astype(INDEX_DTYPE), vals)
    if len(e.indices) % 4:
        raise CodecError(f"indices field has {len(e.indices)} bytes, not a multiple of 4")
    idx = np.frombuffer(e.indices, INDEX_DTYPE)
    if not idx.flags.aligned:  # _aligned, written out: this path runs for every Top-k message the master receives
        idx = idx.copy()
    if idx.shape[0] != n:
        raise CodecError(f"{idx.shape[0]} indices but {n} values")
    found = kernels.vector_checks(idx, vals, expected_dim)  # _check, written out, for the same reason
    if found != kernels.CHECK_OK:
        _check_numpy(idx, vals, expected_dim, found)
    return SparseVector(expected_dim, idx, vals)
