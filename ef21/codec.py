"""The sparse codec: a SparseVector to and from raw little-endian bytes, with validation on decode.

Protobuf stays at the edge (``ef21_wire.serde``): this module only turns arrays into bytes and back, so it is
testable here and the same rules apply whatever carries the bytes. Decoding never trusts its input: every
property the math relies on (dimension, index range, strictly increasing indices, finite values, matching
lengths) is checked before a vector reaches any state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sparse import INDEX_DTYPE, VALUE_DTYPE, SparseVector

F32 = np.dtype("<f4")


class CodecError(ValueError):
    """A vector on the wire is malformed; the message says what is wrong."""


@dataclass(frozen=True)
class EncodedVector:
    dim: int
    indices: bytes
    values: bytes
    dense: bool
    float32: bool = False


def encode(v: SparseVector, *, float32: bool = False) -> EncodedVector:
    vals = v.values.astype(F32 if float32 else VALUE_DTYPE, copy=False)
    if v.indices is None:
        return EncodedVector(v.dim, b"", vals.tobytes(), True, float32)
    return EncodedVector(v.dim, v.indices.astype(INDEX_DTYPE, copy=False).tobytes(), vals.tobytes(), False, float32)


def decode(e: EncodedVector, *, expected_dim: int, max_nnz: int | None = None) -> SparseVector:
    """Bytes back to a SparseVector (values as float64), or CodecError saying what is wrong.

    Each check is one vectorised pass over the arrays: this runs on every message the master receives.
    """
    if e.dim != expected_dim:
        raise CodecError(f"dimension {e.dim} != {expected_dim}")
    width = 4 if e.float32 else 8
    if len(e.values) % width:
        raise CodecError(f"values field has {len(e.values)} bytes, not a multiple of {width}")
    if e.float32:
        vals = np.frombuffer(e.values, dtype=F32).astype(np.float64)
    else:
        vals = np.frombuffer(e.values, dtype=VALUE_DTYPE).copy()  # writable, and no longer tied to the message
    # A sum is non-finite iff some entry is NaN/Inf (or it overflows, which only finite huge values do: those are
    # then checked one by one).
    if vals.shape[0] and not np.isfinite(vals.sum()) and not np.isfinite(vals).all():
        raise CodecError("non-finite value (NaN or Inf)")
    if e.dense:
        if e.indices:
            raise CodecError("a dense vector carries no indices")
        if vals.shape[0] != expected_dim:
            raise CodecError(f"dense vector has {vals.shape[0]} values, expected {expected_dim}")
        return SparseVector(expected_dim, None, vals)
    if len(e.indices) % 4:
        raise CodecError(f"indices field has {len(e.indices)} bytes, not a multiple of 4")
    idx = np.frombuffer(e.indices, dtype=INDEX_DTYPE)
    n = idx.shape[0]
    if n != vals.shape[0]:
        raise CodecError(f"{n} indices but {vals.shape[0]} values")
    if max_nnz is not None and n > max_nnz:
        raise CodecError(f"{n} entries, at most {max_nnz} allowed")
    if n > 1 and not (idx[1:] > idx[:-1]).all():
        raise CodecError("indices are not strictly increasing (unsorted or duplicate)")
    if n and int(idx[-1]) >= expected_dim:  # increasing, so the last is the largest
        raise CodecError(f"index {int(idx[-1])} out of range for dimension {expected_dim}")
    return SparseVector(expected_dim, idx, vals)


def encoded_size(e: EncodedVector) -> int:
    return len(e.indices) + len(e.values)
