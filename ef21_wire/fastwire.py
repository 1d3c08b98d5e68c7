"""The two messages of every round — a worker's Update and the master's RoundResult — written and read in the
protobuf wire format by hand; so are the worker's other messages that carry a dense vector of d (Eval and
PowerReply) or a d×d Gram (GramReply), whose copies otherwise set a worker's peak memory at d = 10⁶.

Why: the generated protobuf classes copy a bytes field when it is assigned, again when the message is
serialized, and again when it is read back; a round's vectors are the bulk of the traffic, so those copies cost
more than the network on a fast link. Here a message is joined from the vector's own buffers (one copy) and read
as views into the received bytes (no copy).

Aligned payloads (protocol 8): a vector's values and indices are written 8-byte aligned from the start of the
serialized message, each after a short pad field (``SparseVector.align_values``/``align_indices``, 0–9 bytes),
so that the receiver's ``np.frombuffer`` views are aligned and ``codec.decode`` uses them as they are (numpy's fast
loops and BLAS need aligned data; an unaligned view costs a copy). Offsets are counted from the message's first
byte: CPython keeps a bytes object's data 16-byte aligned (32 bytes into a 16-byte aligned object), so an offset
that is a multiple of 8 is an aligned address in the receiver. The vector's fields go in the order dim, dense,
value_type, index_bits, align_values, values, align_indices, indices (parsers take fields in any order), and each
length prefix is sized for the content it ends up with (``_wrap_at``). The generated code reads these messages
(``tests/test_fastwire.py`` checks every field against its parse); it writes no pads, and a message from it is
read here too, its arrays then copied once by the codec. The readers take each known field at most once, in any
order; anything else — an unknown or repeated field, another wire type — returns None and the caller parses with
the generated classes, which know every encoding.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from ef21.compression.codec import Buffer, EncodedVector

_DOUBLE = struct.Struct("<d")
_LEN, _VARINT, _I64, _I32 = 2, 0, 1, 5
_U64 = (1 << 64) - 1

# Field numbers, as in proto/ef21_wire/v1/ef21.proto.
_WORKER_UPDATE = 3
_WORKER_EVAL = 4
_WORKER_POWER_REPLY = 6
_WORKER_GRAM_REPLY = 8
_MASTER_ROUND_RESULT = 3


@dataclass(frozen=True)
class UpdateIn:
    """An Update as read off the wire (the vector not yet decoded)."""

    round: int
    vector: EncodedVector
    replace: bool
    buffers: EncodedVector | None = None
    """A model's change of buffers (absent for objectives without them)."""
    covers: tuple[tuple[int, int, bool], ...] = ()
    """An aggregator's sum: (rank, entries, dense) of every rank it covers (``Update.covers``); empty: one rank's."""

    def __init__(self, round: int, vector: EncodedVector, replace: bool, buffers: EncodedVector | None = None,
                 covers: tuple[tuple[int, int, bool], ...] = ()) -> None:
        # One per Update the master receives: as EncodedVector's, the fields set at once (a frozen dataclass's own
        # __init__ sets each through object.__setattr__).
        fields = self.__dict__
        fields["round"], fields["vector"], fields["replace"] = round, vector, replace
        fields["buffers"], fields["covers"] = buffers, covers


@dataclass(frozen=True)
class RoundResultIn:
    round: int
    aggregate: EncodedVector
    replace: bool
    scale: float
    checksum: bytes
    missing: tuple[int, ...]
    buffers: EncodedVector | None = None


class _NotCanonical(Exception):
    pass


# -- writing ---------------------------------------------------------------------------------------------------------

def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


ALIGN = 8
"""Where a vector's arrays start in a serialized message written here: a multiple of this from its first byte."""

# A pad field of n zero bytes takes 2 + n bytes (key, one-byte length, the zeros): 2..9 covers every residue mod 8,
# and 0 needs no field at all. _PADS[field][gap]: the pad that moves what follows it by gap (mod 8).
_PADS = {f: [b""] + [_key(f, _LEN) + bytes([n]) + bytes(n) for n in (7, 0, 1, 2, 3, 4, 5)] for f in (7, 8)}


def _aligned_field(parts: list[Buffer], at: int, field: int, pad_field: int, data: Buffer) -> None:
    """Append ``field`` holding ``data`` to ``parts`` (which start at offset ``at``), with the pad before it that puts
    the data's first byte at a multiple of ALIGN."""
    head = _key(field, _LEN) + _varint(len(data))
    pad = _PADS[pad_field][-(at + _size(parts) + len(head)) % ALIGN]
    if pad:
        parts.append(pad)
    parts += [head, data]


def _vector_parts(e: EncodedVector, at: int = 0) -> list[Buffer]:
    """The fields of a SparseVector whose content starts at offset ``at`` of the message. The plain layout's arrays
    (uint32 indices, float64 or float32 values) come aligned; the compact one's are unpacked on arrival anyway."""
    parts: list[Buffer] = []
    if e.dim:
        parts += [_key(1, _VARINT), _varint(e.dim)]
    if e.dense:
        parts += [_key(4, _VARINT), b"\x01"]
    if e.float32:
        parts += [_key(5, _VARINT), b"\x01"]
    if e.index_bits:
        parts += [_key(6, _VARINT), _varint(e.index_bits)]
        if len(e.indices):
            parts += [_key(2, _LEN), _varint(len(e.indices)), e.indices]
        if len(e.values):
            parts += [_key(3, _LEN), _varint(len(e.values)), e.values]
        return parts
    if len(e.values):
        _aligned_field(parts, at, 3, 7, e.values)
    if len(e.indices):
        _aligned_field(parts, at, 2, 8, e.indices)
    return parts


def _size(parts: list[Buffer]) -> int:
    return sum(len(p) for p in parts)


def _double(field: int, v: float) -> list[Buffer]:
    b = _DOUBLE.pack(v)
    return [] if b == b"\0" * 8 else [_key(field, _I64), b]  # proto3 omits +0.0 only


def _wrap(field: int, body: list[Buffer]) -> list[Buffer]:
    return [_key(field, _LEN), _varint(_size(body)), *body]


def _varint_in(v: int, width: int) -> bytes:
    """v as a varint of exactly ``width`` bytes (≥ its shortest): continuation bits on leading groups of zeros, which
    every protobuf parser reads as the same number."""
    out = bytearray()
    for _ in range(width - 1):
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _wrap_at(field: int, at: int, build: Callable[[int], list[Buffer]]) -> list[Buffer]:
    """Field ``field`` (a message) at offset ``at``: its key, its length and ``build(start)``, the content's parts
    for where the content starts. The length's width depends on the content's size and the content's pads on where
    it starts: the width only grows until the content fits it (twice at most), and a length that then needs fewer
    bytes is written in that width all the same (a size right at 128, 16384, ... bytes would otherwise flip the
    width and the pads back and forth)."""
    key = _key(field, _LEN)
    width = 1
    while True:
        body = build(at + len(key) + width)
        size = _size(body)
        need = len(_varint(size))
        if need <= width:
            return [key, _varint_in(size, width), *body]
        width = need


def _vector_at(field: int, e: EncodedVector) -> Callable[[list[Buffer], int], list[Buffer]]:
    """The parts of ``field`` holding vector ``e``, appended after ``parts`` (which start at offset ``at``)."""
    def add(parts: list[Buffer], at: int) -> list[Buffer]:
        return _wrap_at(field, at + _size(parts), lambda start: _vector_parts(e, start))
    return add


def _message(field: int, build: Callable[[int], list[Buffer]]) -> bytes:
    """A oneof envelope (WorkerMessage or MasterMessage) holding ``field``, its content's parts from ``build``."""
    return b"".join(_wrap_at(field, 0, build))


def _round_head(at: int, round_: int, vector: EncodedVector, replace: bool) -> list[Buffer]:
    """Fields 1-3 of both round messages (the round, the vector, the replace flag), the content starting at ``at``."""
    parts: list[Buffer] = [_key(1, _VARINT), _varint(round_)] if round_ else []
    parts += _vector_at(2, vector)(parts, at)
    return parts + ([_key(3, _VARINT), b"\x01"] if replace else [])


def update_bytes(round_: int, vector: EncodedVector, replace: bool, buffers: EncodedVector | None = None) -> bytes:
    """A serialized WorkerMessage carrying this Update."""
    def body(at: int) -> list[Buffer]:
        parts = _round_head(at, round_, vector, replace)
        if buffers is not None:
            parts += _vector_at(6, buffers)(parts, at)
        return parts
    return _message(_WORKER_UPDATE, body)


def round_result_bytes(round_: int, aggregate: EncodedVector, replace: bool, scale: float, checksum: bytes,
                       missing: list[int] | tuple[int, ...], buffers: EncodedVector | None = None) -> bytes:
    """A serialized MasterMessage carrying this RoundResult."""
    packed = b"".join(_varint(r) for r in missing)

    def body(at: int) -> list[Buffer]:
        parts = _round_head(at, round_, aggregate, replace) + _double(4, scale)
        if checksum:
            parts += [_key(5, _LEN), _varint(len(checksum)), checksum]
        if missing:
            parts += [_key(6, _LEN), _varint(len(packed)), packed]
        if buffers is not None:
            parts += _vector_at(7, buffers)(parts, at)
        return parts
    return _message(_MASTER_ROUND_RESULT, body)


def eval_bytes(round_: int, grad: EncodedVector, rest: bytes) -> bytes:
    """A serialized WorkerMessage carrying an Eval: ``rest`` is the generated code's serialization of an Eval
    holding only the fields after ``grad`` (f, distortion, metrics), which follow it in field order."""
    def body(at: int) -> list[Buffer]:
        parts: list[Buffer] = [_key(1, _VARINT), _varint(round_)] if round_ else []
        return parts + _vector_at(2, grad)(parts, at) + [rest]
    return _message(_WORKER_EVAL, body)


def power_reply_bytes(iteration: int, w: EncodedVector, attempt: int) -> bytes:
    """A serialized WorkerMessage carrying a PowerReply (``attempt``: the PowerStep's, echoed)."""
    def body(at: int) -> list[Buffer]:
        parts: list[Buffer] = [_key(1, _VARINT), _varint(iteration)] if iteration else []
        parts += _vector_at(2, w)(parts, at)
        return parts + ([_key(3, _VARINT), _varint(attempt)] if attempt else [])
    return _message(_WORKER_POWER_REPLY, body)


def gram_reply_bytes(gram: Buffer, attempt: int) -> bytes:
    """A serialized WorkerMessage carrying a GramReply (the d×d matrix's bytes, joined in with one copy)."""
    body: list[Buffer] = [_key(1, _LEN), _varint(len(gram)), gram] if len(gram) else []
    if attempt:
        body += [_key(2, _VARINT), _varint(attempt)]
    return b"".join(_wrap(_WORKER_GRAM_REPLY, body))


# -- reading ---------------------------------------------------------------------------------------------------------

def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _NotCanonical
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & _U64, pos  # a tenth byte's bits past 64: dropped, as protobuf drops them
        shift += 7


def _fields(buf: bytes, pos: int, end: int, layout: dict[int, int]) -> dict[int, object]:
    """The fields of one message between pos and end: field → int (varint), bytes (I64) or (start, stop) (LEN).
    Only the fields in ``layout`` (field → wire type), each at most once; anything else is not canonical.
    (One-byte keys and lengths, nearly all of them, are read inline: this runs for every round message.)"""
    out: dict[int, object] = {}
    while pos < end:
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _read_varint(buf, pos, end)
        field, wt = key >> 3, key & 7
        if layout.get(field) != wt or field in out:
            raise _NotCanonical
        if wt == _I64:
            if pos + 8 > end:
                raise _NotCanonical
            out[field] = buf[pos:pos + 8]
            pos += 8
            continue
        if pos < end and buf[pos] < 0x80:
            n = buf[pos]
            pos += 1
        else:
            n, pos = _read_varint(buf, pos, end)
        if wt == _VARINT:
            out[field] = n
        else:
            if pos + n > end:
                raise _NotCanonical
            out[field] = (pos, pos + n)
            pos += n
    return out


_VECTOR = {1: _VARINT, 2: _LEN, 3: _LEN, 4: _VARINT, 5: _VARINT, 6: _VARINT, 7: _LEN, 8: _LEN}  # 7, 8: pads
_UPDATE = {1: _VARINT, 2: _LEN, 3: _VARINT, 6: _LEN}
_ROUND_RESULT = {1: _VARINT, 2: _LEN, 3: _VARINT, 4: _I64, 5: _LEN, 6: _LEN, 7: _LEN}


def _span(view: memoryview, fields: dict[int, object], field: int) -> memoryview:
    if field not in fields:
        return view[0:0]
    a, b = fields[field]  # type: ignore[misc]
    return view[a:b]


def _vector(raw: bytes, view: memoryview, span: tuple[int, int] | None) -> EncodedVector:
    if span is None:
        return EncodedVector(0, b"", b"", False)
    v = _fields(raw, span[0], span[1], _VECTOR)
    value_type = v.get(5, 0)
    if value_type not in (0, 1) or v.get(4, 0) not in (0, 1) or v.get(6, 0) >> 32:  # type: ignore[operator]
        raise _NotCanonical  # (index_bits is a uint32, which protobuf reads modulo 2**32)
    return EncodedVector(int(v.get(1, 0)), _span(view, v, 2), _span(view, v, 3),  # type: ignore[arg-type]
                         v.get(4, 0) == 1, value_type == 1, int(v.get(6, 0)))  # type: ignore[arg-type]


def _outer(raw: bytes, field: int) -> tuple[int, int]:
    """The span of the one field of a oneof envelope, if it is ``field``."""
    key, pos = _read_varint(raw, 0, len(raw))
    if key != (field << 3 | _LEN):
        raise _NotCanonical
    n, pos = _read_varint(raw, pos, len(raw))
    if pos + n != len(raw):
        raise _NotCanonical
    return pos, pos + n


def _round_message(raw: bytes, field: int, layout: dict[int, int],
                   buffers_field: int) -> tuple[dict[int, object], EncodedVector, EncodedVector | None]:
    """The fields of the message in a oneof envelope, for both round messages: field 2 is the vector, field 3
    the replace flag, ``buffers_field`` a model's buffers."""
    f = _fields(raw, *_outer(raw, field), layout)
    if f.get(3, 0) not in (0, 1):
        raise _NotCanonical
    view = memoryview(raw)
    buffers = _vector(raw, view, f[buffers_field]) if buffers_field in f else None  # type: ignore[arg-type]
    return f, _vector(raw, view, f.get(2)), buffers  # type: ignore[arg-type]


def _double_of(f: dict[int, object], field: int) -> float:
    return _DOUBLE.unpack(f[field])[0] if field in f else 0.0  # type: ignore[arg-type]


def _packed_uint32(raw: bytes, span: tuple[int, int] | None) -> tuple[int, ...]:
    out: list[int] = []
    pos, end = span or (0, 0)
    while pos < end:
        v, pos = _read_varint(raw, pos, end)
        if v >= 2**32:
            raise _NotCanonical
        out.append(v)
    return tuple(out)


def read_update(raw: bytes) -> UpdateIn | None:
    """The Update in a serialized WorkerMessage, or None when it holds something else or is not canonical."""
    try:
        u, vec, buffers = _round_message(raw, _WORKER_UPDATE, _UPDATE, 6)
    except _NotCanonical:
        return None
    return UpdateIn(int(u.get(1, 0)), vec, u.get(3, 0) == 1, buffers)  # type: ignore


def read_round_result(raw: bytes) -> RoundResultIn | None:
    """The RoundResult in a serialized MasterMessage, or None (see ``read_update``)."""
    try:
        r, vec, buffers = _round_message(raw, _MASTER_ROUND_RESULT, _ROUND_RESULT, 7)
        missing = _packed_uint32(raw, r.get(6))  # type: ignore[arg-type]
    except _NotCanonical:
        return None
    a, b = r.get(5, (0, 0))  # type: ignore[misc]
    return RoundResultIn(int(r.get(1, 0)), vec, r.get(3, 0) == 1, _double_of(r, 4), raw[a:b],  # type: ignore
                         missing, buffers)
