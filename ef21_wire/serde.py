"""Paired conversions between protobuf messages and the core's types."""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

import numpy as np

from ef21.compression.codec import CodecError, EncodedVector, decode, encode
from ef21.compression.sparse import INDEX_DTYPE, SparseVector

from . import compiled
from .fastwire import RoundResultIn, UpdateIn, read_round_result, read_update, round_result_bytes, update_bytes
from .protocol import PROTOCOL_VERSION  # noqa: F401  (re-exported for callers)
from .v1 import ef21_pb2 as pb

# Below this many vector bytes the generated (C) code's fixed cost per message is lower than the hand-written
# path's; above it, the generated code's extra copies cost more (benchmarks/wire.py shows both).
HAND_PATH_MIN_BYTES = 4096


def update_to_bytes(round_: int, vec: EncodedVector, replace: bool, buffers: EncodedVector | None = None) -> bytes:
    """A serialized WorkerMessage(Update), by whichever path is faster for its size (the same message either way;
    only the hand path pads the arrays to 8-byte alignment, which pays where they are large)."""
    if vec.size >= HAND_PATH_MIN_BYTES:
        return update_bytes(round_, vec, replace, buffers)
    msg = pb.WorkerMessage()
    u = msg.update
    u.round, u.replace = round_, replace
    _fill_encoded(u.message, vec)
    if buffers is not None:
        _fill_encoded(u.buffers, buffers)
    return msg.SerializeToString()


def round_result_to_bytes(round_: int, agg: EncodedVector, replace: bool, scale: float, checksum: bytes,
                          missing: list[int], buffers: EncodedVector | None = None) -> bytes:
    """A serialized MasterMessage(RoundResult), by whichever path is faster for its size."""
    if agg.size >= HAND_PATH_MIN_BYTES:
        return round_result_bytes(round_, agg, replace, scale, checksum, missing, buffers)
    msg = pb.MasterMessage()
    r = msg.round_result
    r.round, r.replace, r.scale, r.checksum = round_, replace, scale, checksum
    r.missing.extend(missing)
    _fill_encoded(r.aggregate, agg)
    if buffers is not None:
        _fill_encoded(r.buffers, buffers)
    return msg.SerializeToString()


def read_update_fast(raw: bytes) -> UpdateIn | None:
    """The Update in a large serialized WorkerMessage, read without copies (by one compiled call where numba is
    installed and the message is large, ``compiled.MIN_BYTES``); None: parse it with protobuf."""
    if len(raw) < HAND_PATH_MIN_BYTES:
        return None
    return compiled.read_update(raw) or read_update(raw)


def read_round_result_fast(raw: bytes) -> RoundResultIn | None:
    return read_round_result(raw) if len(raw) >= HAND_PATH_MIN_BYTES else None


def _fill_encoded(dst: pb.SparseVector, e: EncodedVector) -> None:
    dst.dim = e.dim
    dst.indices = bytes(e.indices)
    dst.values = bytes(e.values)
    dst.dense = e.dense
    if e.float32:
        dst.value_type = pb.FLOAT32
    if e.index_bits:
        dst.index_bits = e.index_bits


def fill_vector(dst: pb.SparseVector, v: SparseVector, *, float32: bool = False, packed: bool = False) -> None:
    """Write v into a field of a message under construction (building a submessage and assigning it would copy
    it once more)."""
    _fill_encoded(dst, encode(v, float32=float32, packed=packed))


def vector_to_proto(v: SparseVector, *, float32: bool = False, packed: bool = False) -> pb.SparseVector:
    m = pb.SparseVector()
    fill_vector(m, v, float32=float32, packed=packed)
    return m


def encoded_from_proto(m: pb.SparseVector) -> EncodedVector:
    return EncodedVector(int(m.dim), m.indices, m.values, m.dense, m.value_type == pb.FLOAT32, int(m.index_bits))


def vector_from_proto(m: pb.SparseVector, *, expected_dim: int, max_nnz: int | None = None,
                      dtype: Any = np.float64) -> SparseVector:
    """Decode and validate (raises ef21.compression.codec.CodecError)."""
    return decode(encoded_from_proto(m), expected_dim=expected_dim, max_nnz=max_nnz, dtype=dtype)


def update_from_proto(m: pb.Update) -> UpdateIn:
    return UpdateIn(int(m.round), encoded_from_proto(m.message), m.replace,
                    encoded_from_proto(m.buffers) if m.HasField("buffers") else None,
                    tuple((int(c.rank), int(c.entries), bool(c.dense)) for c in m.covers))


def round_result_from_proto(m: pb.RoundResult) -> RoundResultIn:
    return RoundResultIn(int(m.round), encoded_from_proto(m.aggregate), m.replace, m.scale, m.checksum,
                         tuple(m.missing), encoded_from_proto(m.buffers) if m.HasField("buffers") else None)


def dense_to_proto(x: np.ndarray) -> pb.SparseVector:
    return vector_to_proto(SparseVector.dense(x))


def lean_to_proto(x: np.ndarray) -> pb.SparseVector:
    """A state vector (x, g, g_i, v) for Start and Resync: sparse when its nonzero entries, at 12 bytes each, take
    fewer bytes than d dense values (g = 0 at round 0 is then empty). Nonzero by bits, so −0.0 travels as itself
    and the replica's checksum still agrees. A float32 vector (``--dtype float32``) travels as float32."""
    x = np.ascontiguousarray(x, dtype=np.float32 if x.dtype == np.float32 else np.float64)
    support = np.flatnonzero(x.view(np.uint32 if x.dtype == np.float32 else np.uint64))
    if (4 + x.itemsize) * support.size >= x.itemsize * x.size:
        return dense_to_proto(x)
    return vector_to_proto(SparseVector(x.size, support.astype(INDEX_DTYPE), x[support]))


def lean_from_proto(m: pb.SparseVector, d: int, dtype: Any = np.float64) -> np.ndarray:
    """The dense vector of ``lean_to_proto``'s message, of the run's ``dtype`` (raises
    ef21.compression.codec.CodecError)."""
    v = vector_from_proto(m, expected_dim=d, dtype=dtype)
    return np.array(v.values) if v.is_dense else v.to_dense()


def vector_digest(x: np.ndarray) -> bytes:
    """BLAKE2b-128 of x's float64 little-endian bytes: the x0 a worker computed itself against the master's,
    once per run (a 32-bit CRC, enough for the per-round drift check, is too weak to stand in for a transfer)."""
    return hashlib.blake2b(memoryview(np.ascontiguousarray(x, dtype="<f8")).cast("B"), digest_size=16).digest()


def state_checksum(x: np.ndarray, g: np.ndarray, *more: np.ndarray | None) -> bytes:
    """Digest of the exact bits of a replica, to detect a worker that fell out of sync (8 bytes: CRC-32 of x and
    of g, and the rest of the replicated state — EF21-HB's v, a model's buffers, the optimizer's state, as
    ``Replica.state_arrays`` lists them — folded into the second). Not a security measure — a worker checks its
    own copy against the master's — so a CRC, ~5x faster than a cryptographic hash over the 16·d bytes, is enough
    to catch drift."""
    cx = zlib.crc32(memoryview(np.ascontiguousarray(x)).cast("B"))
    cg = zlib.crc32(memoryview(np.ascontiguousarray(g)).cast("B"))
    for a in more:
        if a is not None:
            cg = zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"), cg)
    return cx.to_bytes(4, "little") + cg.to_bytes(4, "little")


def state_to_proto(dst: Any, state: dict[str, np.ndarray]) -> None:
    """Fill a ``repeated NamedVector`` field (Start.state, Resync.state) with a replica's extra state."""
    for name, a in state.items():
        item = dst.add()
        item.name = name
        item.vector.CopyFrom(lean_to_proto(a))  # an optimizer's moments start at zero: sent empty


def state_from_proto(src: Any, expected: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A replica's extra state from a ``repeated NamedVector``, each checked against the receiver's own names and
    sizes (raises CodecError)."""
    out: dict[str, np.ndarray] = {}
    for item in src:
        if item.name not in expected or item.name in out:
            raise CodecError(f"unexpected replicated state {item.name!r}")
        out[item.name] = decode(encoded_from_proto(item.vector), expected_dim=expected[item.name].shape[0]).to_dense()
    if set(out) != set(expected):
        raise CodecError(f"replicated state {sorted(out)} where {sorted(expected)} is expected")
    return out
