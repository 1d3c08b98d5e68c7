"""Paired conversions between protobuf messages and the core's types."""

from __future__ import annotations

import zlib

import numpy as np

from ef21.codec import EncodedVector, decode, encode
from ef21.sparse import SparseVector

from .fastwire import RoundResultIn, UpdateIn
from .protocol import PROTOCOL_VERSION  # noqa: F401  (re-exported for callers)
from .v1 import ef21_pb2 as pb


def fill_vector(dst: pb.SparseVector, v: SparseVector, *, float32: bool = False, packed: bool = False) -> None:
    """Write v into a field of a message under construction (building a submessage and assigning it would copy
    it once more). The round's own messages bypass this: see ``fastwire``."""
    e = encode(v, float32=float32, packed=packed)
    dst.dim = e.dim
    dst.indices = bytes(e.indices)
    dst.values = bytes(e.values)
    dst.dense = e.dense
    if float32:
        dst.value_type = pb.FLOAT32
    if e.index_bits:
        dst.index_bits = e.index_bits


def vector_to_proto(v: SparseVector, *, float32: bool = False, packed: bool = False) -> pb.SparseVector:
    m = pb.SparseVector()
    fill_vector(m, v, float32=float32, packed=packed)
    return m


def encoded_from_proto(m: pb.SparseVector) -> EncodedVector:
    return EncodedVector(int(m.dim), m.indices, m.values, m.dense, m.value_type == pb.FLOAT32, int(m.index_bits))


def vector_from_proto(m: pb.SparseVector, *, expected_dim: int, max_nnz: int | None = None) -> SparseVector:
    """Decode and validate (raises ef21.codec.CodecError)."""
    return decode(encoded_from_proto(m), expected_dim=expected_dim, max_nnz=max_nnz)


def update_from_proto(m: pb.Update) -> UpdateIn:
    return UpdateIn(int(m.round), encoded_from_proto(m.message), m.replace, m.f, m.distortion)


def round_result_from_proto(m: pb.RoundResult) -> RoundResultIn:
    return RoundResultIn(int(m.round), encoded_from_proto(m.aggregate), m.replace, m.scale, m.checksum,
                         tuple(m.missing))


def dense_to_proto(x: np.ndarray) -> pb.SparseVector:
    return vector_to_proto(SparseVector.dense(x))


def state_checksum(x: np.ndarray, g: np.ndarray) -> bytes:
    """Digest of the exact bits of a replica, to detect a worker that fell out of sync (8 bytes: CRC-32 of x and
    of g). Not a security measure — a worker checks its own copy against the master's — so a CRC, ~5x faster than
    a cryptographic hash over the 16·d bytes, is enough to catch drift."""
    cx = zlib.crc32(memoryview(np.ascontiguousarray(x)).cast("B"))
    cg = zlib.crc32(memoryview(np.ascontiguousarray(g)).cast("B"))
    return cx.to_bytes(4, "little") + cg.to_bytes(4, "little")
