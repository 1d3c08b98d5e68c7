"""Paired conversions between protobuf messages and the core's types."""

from __future__ import annotations

import zlib

import numpy as np

from ef21.codec import EncodedVector, decode, encode
from ef21.sparse import SparseVector

from .protocol import PROTOCOL_VERSION  # noqa: F401  (re-exported for callers)
from .v1 import ef21_pb2 as pb


def vector_to_proto(v: SparseVector, *, float32: bool = False) -> pb.SparseVector:
    e = encode(v, float32=float32)
    return pb.SparseVector(dim=e.dim, indices=e.indices, values=e.values, dense=e.dense,
                           value_type=pb.FLOAT32 if float32 else pb.FLOAT64)


def fill_vector(dst: pb.SparseVector, v: SparseVector, *, float32: bool = False) -> None:
    """Write v into a field of a message under construction: no intermediate message, so each array is copied
    once into the protobuf and once more by serialization (building a submessage and assigning it copies it)."""
    e = encode(v, float32=float32)
    dst.dim = e.dim
    dst.indices = e.indices
    dst.values = e.values
    dst.dense = e.dense
    if float32:
        dst.value_type = pb.FLOAT32


def vector_from_proto(m: pb.SparseVector, *, expected_dim: int, max_nnz: int | None = None) -> SparseVector:
    """Decode and validate (raises ef21.codec.CodecError)."""
    e = EncodedVector(int(m.dim), m.indices, m.values, m.dense, m.value_type == pb.FLOAT32)
    return decode(e, expected_dim=expected_dim, max_nnz=max_nnz)


def dense_to_proto(x: np.ndarray) -> pb.SparseVector:
    return vector_to_proto(SparseVector.dense(x))


def state_checksum(x: np.ndarray, g: np.ndarray) -> bytes:
    """Digest of the exact bits of a replica, to detect a worker that fell out of sync (8 bytes: CRC-32 of x and
    of g). Not a security measure — a worker checks its own copy against the master's — so a CRC, ~5x faster than
    a cryptographic hash over the 16·d bytes, is enough to catch drift."""
    cx = zlib.crc32(memoryview(np.ascontiguousarray(x)).cast("B"))
    cg = zlib.crc32(memoryview(np.ascontiguousarray(g)).cast("B"))
    return cx.to_bytes(4, "little") + cg.to_bytes(4, "little")
