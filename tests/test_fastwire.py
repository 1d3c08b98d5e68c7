"""The hand-written wire path for the round's messages against the generated protobuf code, and the compact
vector layout."""

from __future__ import annotations

import dataclasses
import inspect
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ef21.compression.codec import CodecError, EncodedVector, decode, encode, fits_float32, pack_indices, unpack_indices
from ef21.compression.compressors import TopK
from ef21.compression.sparse import SparseVector
from ef21_wire import compiled
from ef21_wire.fastwire import (
    UpdateIn,
    eval_bytes,
    gram_reply_bytes,
    power_reply_bytes,
    read_round_result,
    read_update,
    round_result_bytes,
    update_bytes,
)
from ef21_wire.serde import (
    HAND_PATH_MIN_BYTES,
    read_update_fast,
    round_result_from_proto,
    round_result_to_bytes,
    update_from_proto,
    update_to_bytes,
    vector_to_proto,
)
from ef21_wire.v1 import ef21_pb2 as pb


def vectors(rng):
    d = 5000
    yield SparseVector.zeros(d), False, False
    yield SparseVector.dense(rng.standard_normal(7)), False, False
    yield SparseVector.dense(rng.standard_normal(7).astype(np.float32).astype(float)), True, False
    for k in (1, 3, 100):
        v = TopK(k)(rng.standard_normal(d))
        yield v, False, False
        yield v, False, True
        yield SparseVector(d, v.indices, v.values.astype(np.float32).astype(float)), True, True


def same_vector(e: EncodedVector, m: pb.SparseVector) -> None:
    assert (e.dim, bytes(e.indices), bytes(e.values), e.dense, e.float32, e.index_bits) == \
        (m.dim, m.indices, m.values, m.dense, m.value_type == pb.FLOAT32, m.index_bits)


def without_pads(msg):  # type: ignore[no-untyped-def]
    """``msg`` with every SparseVector's pads cleared, after checking that they are at most 7 zero bytes."""
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        for item in ([value] if hasattr(value, "ListFields") else value):
            if isinstance(item, pb.SparseVector):
                for name in ("align_values", "align_indices"):
                    pad = getattr(item, name)
                    assert len(pad) <= 7 and not any(pad)
                    item.ClearField(name)
            elif hasattr(item, "ListFields"):
                without_pads(item)
    return msg


def same_message(ours: bytes, ref) -> None:  # type: ignore[no-untyped-def]
    """The hand-written bytes parse, with the generated code, as the generated message (pads aside: the hand path
    writes the vector's fields in another order, with pads, so the bytes differ)."""
    assert without_pads(type(ref).FromString(ours)) == ref


def offset_in(raw: bytes, buf) -> int:  # type: ignore[no-untyped-def]
    """Where a view of ``raw`` starts in it."""
    return np.frombuffer(buf, np.uint8).ctypes.data - np.frombuffer(raw, np.uint8).ctypes.data


@pytest.mark.parametrize("round_", [0, 7, 2**33])
def test_round_messages_put_their_arrays_8_byte_aligned_and_decode_reads_them_in_place(rng, round_):
    """Protocol 8: every vector of both round messages, and of Eval and PowerReply, has its values and indices at a
    multiple of 8 bytes from the message's start, at every size (the length prefixes grow a byte at 128, 16384, ...
    bytes), and decode hands out views of the received bytes, not copies. The generated code's messages (no pads)
    still decode, through one copy."""
    d = 40_000
    for k in [*range(1, 40), 500, 1364, 1365, 1366, 2000, 10_000]:
        v = TopK(k)(rng.standard_normal(d))
        b = TopK(max(1, k // 3))(rng.standard_normal(300))
        e = encode(v)
        up = update_bytes(round_, e, k % 2 == 0, encode(b))
        rr = round_result_bytes(round_, e, False, 0.25, b"12345678", [1, 300], encode(b))
        u, r = read_update(up), read_round_result(rr)
        assert u is not None and r is not None
        for raw, ev, size in ((up, u.vector, d), (up, u.buffers, 300), (rr, r.aggregate, d), (rr, r.buffers, 300)):
            assert offset_in(raw, ev.values) % 8 == 0 and offset_in(raw, ev.indices) % 8 == 0, (k, round_)
            out = decode(ev, expected_dim=size)
            assert np.shares_memory(out.values, np.frombuffer(raw, np.uint8))
            assert np.shares_memory(out.indices, np.frombuffer(raw, np.uint8))
    grad = encode(SparseVector.dense(rng.standard_normal(1000)))
    for raw in (eval_bytes(round_, grad, pb.Eval(f=1.5).SerializeToString()), power_reply_bytes(3, grad, round_)):
        m = pb.WorkerMessage.FromString(raw)
        vec = m.eval.grad if m.HasField("eval") else m.power_reply.w
        assert raw.index(vec.values) % 8 == 0
    ref = pb.WorkerMessage(update=pb.Update(round=1, message=vector_to_proto(TopK(1001)(rng.standard_normal(d)))))
    plain = ref.SerializeToString()  # no pads: the indices land 4 bytes off
    got = read_update(plain)
    assert got is not None and offset_in(plain, got.vector.indices) % 8 != 0
    out = decode(got.vector, expected_dim=d)
    assert not np.shares_memory(out.indices, np.frombuffer(plain, np.uint8))
    np.testing.assert_array_equal(out.to_dense(), decode(encode(out), expected_dim=d).to_dense())


@pytest.mark.parametrize("round_", [0, 1, 300, 2**40])
def test_update_bytes_parse_as_the_generated_message(rng, round_):
    for v, f32, packed in vectors(rng):
        for replace in (False, True):
            e = encode(v, float32=f32, packed=packed)
            ours = update_bytes(round_, e, replace)
            vec = vector_to_proto(v, float32=f32, packed=packed)
            ref = pb.WorkerMessage(update=pb.Update(round=round_, message=vec, replace=replace))
            same_message(ours, ref)
            got = read_update(ours)
            assert got is not None and got == update_from_proto(pb.WorkerMessage.FromString(ours).update)
            same_vector(got.vector, ref.update.message)
            np.testing.assert_array_equal(decode(got.vector, expected_dim=v.dim).to_dense(), v.to_dense())


@pytest.mark.parametrize("missing", [[], [0], [3, 200, 70000]])
@pytest.mark.parametrize("checksum", [b"", bytes(range(8))])
def test_round_result_bytes_parse_as_the_generated_message(rng, missing, checksum):
    for v, _, packed in vectors(rng):
        for replace, scale in ((False, 0.25), (True, 1.0), (False, 0.0)):
            e = encode(v, packed=packed)
            ours = round_result_bytes(17, e, replace, scale, checksum, missing)
            ref = pb.MasterMessage(round_result=pb.RoundResult(
                round=17, aggregate=vector_to_proto(v, packed=packed), replace=replace, scale=scale,
                checksum=checksum, missing=missing))
            same_message(ours, ref)
            got = read_round_result(ours)
            assert got is not None and got == round_result_from_proto(pb.MasterMessage.FromString(ours).round_result)


def test_round_messages_with_a_models_buffers_parse_as_the_generated_messages(rng):
    """A model's change of buffers rides on both round messages (Update field 6, RoundResult field 7): the hand path
    writes and reads it as the generated code does, sparse or dense, and without it the bytes are as before."""
    agg = encode(TopK(300)(rng.standard_normal(5000)))  # above HAND_PATH_MIN_BYTES: the hand path is used
    for b in (SparseVector.dense(rng.standard_normal(40)), SparseVector(40, np.array([2, 9], "<u4"), np.ones(2)),
              SparseVector.zeros(40)):
        eb = encode(b)
        ours = update_to_bytes(4, agg, False, eb)
        ref = pb.WorkerMessage(update=pb.Update(round=4, message=vector_to_proto(decode(agg, expected_dim=5000)),
                                                buffers=vector_to_proto(b)))
        same_message(ours, ref)
        same_message(update_bytes(4, agg, False, eb), ref)
        got = read_update(ours)
        assert got is not None and got == update_from_proto(ref.update) and got.buffers is not None
        np.testing.assert_array_equal(decode(got.buffers, expected_dim=40).to_dense(), b.to_dense())
        ours = round_result_to_bytes(4, agg, False, 0.5, b"", [1], eb)
        ref_rr = pb.MasterMessage(round_result=pb.RoundResult(
            round=4, aggregate=vector_to_proto(decode(agg, expected_dim=5000)), scale=0.5, missing=[1],
            buffers=vector_to_proto(b)))
        same_message(ours, ref_rr)
        got_rr = read_round_result(ours)
        assert got_rr is not None and got_rr == round_result_from_proto(ref_rr.round_result)
    assert read_update(update_bytes(4, agg, False)).buffers is None


@pytest.mark.parametrize("round_", [0, 5, 2**33])
@pytest.mark.parametrize("extra", [dict(f=0.7), dict(f=0.0, distortion=0.0), dict(f=-2.5, distortion=1e-9,
                                                                                   metrics={"acc": 0.9})])
def test_eval_and_power_reply_bytes_parse_as_the_generated_messages(rng, round_, extra):
    """The worker's messages with a dense vector of d, joined by hand (one copy of the vector), are what the generated
    code writes but for the pads, and the master's generated parser reads them back."""
    grad = SparseVector.dense(rng.standard_normal(3000))
    rest = pb.Eval(**extra).SerializeToString()
    ours = eval_bytes(round_, encode(grad), rest)
    ref = pb.WorkerMessage(eval=pb.Eval(round=round_, grad=vector_to_proto(grad), **extra))
    same_message(ours, ref)
    back = pb.WorkerMessage.FromString(ours).eval
    assert back.HasField("distortion") == ("distortion" in extra) and dict(back.metrics) == extra.get("metrics", {})
    gram = rng.standard_normal((40, 40))
    for attempt in (0, 1, round_):
        ours = power_reply_bytes(round_ % 300, encode(grad), attempt)
        ref = pb.WorkerMessage(power_reply=pb.PowerReply(iteration=round_ % 300, w=vector_to_proto(grad),
                                                         attempt=attempt))
        same_message(ours, ref)
        ref = pb.WorkerMessage(gram_reply=pb.GramReply(gram=gram.astype("<f8").tobytes(), attempt=attempt))
        assert gram_reply_bytes(memoryview(gram).cast("B"), attempt) == ref.SerializeToString()


def test_other_encodings_fall_back_to_the_generated_parser():
    """Valid protobuf the fast reader does not handle (field order, unpacked repeated, unknown fields, other
    messages) is left to the generated parser: None, never a wrong answer."""
    vec = pb.SparseVector(dim=10, indices=np.array([1, 4], "<u4").tobytes(), values=np.ones(2).tobytes())
    upd = pb.Update(round=3, message=vec, replace=True).SerializeToString()
    reordered = upd[-2:] + upd[:-2]  # replace first: any field order is legal protobuf, and read the same way
    raw = b"\x1a" + bytes([len(reordered)]) + reordered
    assert read_update(raw) == update_from_proto(pb.WorkerMessage.FromString(raw).update)
    twice = upd + upd[-2:]  # a field repeated: protobuf keeps the last; we leave it to protobuf
    assert read_update(b"\x1a" + bytes([len(twice)]) + twice) is None
    unknown = upd + b"\xb8\x06\x01"  # field 103 varint
    assert read_update(b"\x1a" + bytes([len(unknown)]) + unknown) is None
    assert read_update(pb.WorkerMessage(hello=pb.Hello(run_id="x")).SerializeToString()) is None
    unpacked = pb.RoundResult(round=1, scale=0.5).SerializeToString() + b"\x30\x02\x30\x05"  # missing 2, 5 unpacked
    raw = b"\x1a" + bytes([len(unpacked)]) + unpacked
    assert list(pb.MasterMessage.FromString(raw).round_result.missing) == [2, 5]
    assert read_round_result(raw) is None


def compiled_read(raw: bytes) -> UpdateIn | None:
    """``compiled.read_update`` at any size (its threshold only keeps numba out of small runs)."""
    with mock.patch.object(compiled, "MIN_BYTES", 0):
        return compiled.read_update(raw)


def test_mangled_bytes_never_raise_and_never_disagree_with_protobuf(rng):
    v = TopK(20)(rng.standard_normal(3000))
    good = update_bytes(9, encode(v), False)
    for _ in range(3000):
        raw = bytearray(good)
        for _ in range(int(rng.integers(1, 4))):
            op = rng.integers(3)
            pos = int(rng.integers(len(raw) + 1))
            if op == 0 and pos < len(raw):
                raw[pos] = int(rng.integers(256))
            elif op == 1:
                del raw[pos:]
            else:
                raw.insert(pos, int(rng.integers(256)))
        raw = bytes(raw)
        got = read_update(raw)  # must not raise
        if compiled._compile() is not None:  # the compiled reader answers as read_update or leaves it to it
            assert compiled_read(raw) in (None, got)
        if got is None:
            continue
        ref = pb.WorkerMessage.FromString(raw)  # what we read, protobuf reads the same way
        assert ref.WhichOneof("kind") == "update" and got == update_from_proto(ref.update)


# -- compact layout --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,k", [(10_000, 100), (1_000_000, 100), (1_000_000, 10_000), (100, 100), (50, 1),
                                 (2**32 - 1, 3)])
def test_packed_indices_round_trip(rng, d, k):
    idx = np.sort(rng.choice(min(d, 10**7), size=k, replace=False)).astype(np.uint32)
    if d == 2**32 - 1:
        idx = np.array([0, 5, 2**32 - 2], dtype=np.uint32)
    bits, buf = pack_indices(idx, d)
    np.testing.assert_array_equal(unpack_indices(buf, bits, idx.shape[0], d), idx)


@pytest.mark.parametrize("d", [10_000, 1_000_000])
@pytest.mark.parametrize("k", [100, 1000, 10_000])
def test_compact_topk_entry_costs_at_most_six_bytes(rng, d, k):
    v = TopK(k)(rng.standard_normal(d))
    e = encode(SparseVector(d, v.indices, v.values.astype(np.float32).astype(float)), float32=True, packed=True)
    wire = len(update_bytes(123456, e, False))
    # The entries themselves; the message's fixed fields (round, dim, tags: < 48 B) come on top.
    assert e.size / k <= 6.0 and wire <= 6.0 * k + 48


def test_compact_decode_refuses_malformed_input():
    vals = np.ones(3, dtype="<f4").tobytes()
    bits, buf = pack_indices(np.array([2, 5, 9], dtype=np.uint32), 10)
    ok = EncodedVector(10, buf, vals, False, True, bits)
    assert decode(ok, expected_dim=10).indices.tolist() == [2, 5, 9]
    cases = [
        (EncodedVector(10, buf + b"\0" * 8, vals, False, True, bits), "packed indices have"),
        (EncodedVector(10, buf, vals, False, True, 33), "outside 1..32"),
        (EncodedVector(10, buf, vals[:8], False, True, bits), "hold 3 entries, the values 2"),
        (EncodedVector(3, b"", vals, True, True, 4), "dense vector carries no indices"),
    ]
    # 0 low bits: the bit vector alone. Ones at 0 and 1 → indices 0 and 0: a duplicate.
    cases.append((EncodedVector(4, b"\x03", vals[:8], False, True, 1), "strictly increasing"))
    # Ones at 0, 1, 7 → indices 0, 0+... → 0, 0, 5: duplicate; ones at 0, 2, 7 → 0, 1, 5 ≥ dim 4.
    cases.append((EncodedVector(4, b"\x85", vals, False, True, 1), "out of range"))
    for enc, match in cases:
        with pytest.raises(CodecError, match=match):
            decode(enc, expected_dim=enc.dim)


def test_fits_float32():
    assert fits_float32(np.array([0.5, -3.0, 2.0**-30]))
    assert not fits_float32(np.array([0.1]))
    assert not fits_float32(np.array([1e300]))
    assert not fits_float32(np.array([np.nan]))


def test_both_paths_of_the_serde_helpers_give_the_same_message(rng):
    """Small messages go through the generated code (no pads: a copy of a few bytes costs less than the hand path's
    fixed cost), large ones by hand: the receiver reads the same message."""
    for k in (2, 1000):  # 24 B and 12 kB of vector: either side of HAND_PATH_MIN_BYTES
        e = encode(TopK(k)(rng.standard_normal(20_000)))
        assert (e.size >= HAND_PATH_MIN_BYTES) == (k == 1000)
        assert (update_to_bytes(5, e, True) == update_bytes(5, e, True)) == (k == 1000)
        same_message(update_to_bytes(5, e, True), without_pads(pb.WorkerMessage.FromString(update_bytes(5, e, True))))
        rr = round_result_to_bytes(5, e, False, 0.1, b"abc", [1])
        assert (rr == round_result_bytes(5, e, False, 0.1, b"abc", [1])) == (k == 1000)
        same_message(rr, without_pads(pb.MasterMessage.FromString(round_result_bytes(5, e, False, 0.1, b"abc", [1]))))


def test_finite_check_catches_nan_and_inf_but_accepts_huge_finite_values():
    idx = np.array([1, 2], "<u4").tobytes()
    for bad in ([1.0, np.nan], [np.inf, 1.0], [-np.inf, np.inf]):
        with pytest.raises(CodecError, match="non-finite"):
            decode(EncodedVector(5, idx, np.array(bad).tobytes(), False), expected_dim=5)
    big = decode(EncodedVector(5, idx, np.array([1e200, -1e300]).tobytes(), False), expected_dim=5)  # v·v overflows
    assert big.values.tolist() == [1e200, -1e300]


# -- the compiled reader of a large Update (ef21_wire/compiled.py) ---------------------------------------------------

needs_numba = pytest.mark.skipif(compiled._compile() is None,
                                 reason="numba is not installed (pip install -e '.[fast]')")


def envelope(update: bytes) -> bytes:
    """A WorkerMessage around an Update's serialized fields."""
    n = len(update)
    return b"\x1a" + (bytes([n]) if n < 128 else bytes([n & 0x7F | 0x80, n >> 7])) + update


def update_variants() -> tuple[list[bytes], list[bytes]]:
    """Updates of every shape the reader meets: plain, compact, dense, float32, replace, round 0 and a large one,
    a model's buffers, a vector with no entries, written by the hand path and by the generated code; small ones, so
    that random edits land on keys and lengths; and edits made on purpose: a field twice, replace = 2, a vector's
    length past the Update's end, values running into the next field, index_bits of 2**32 + 5, a round of 2**64 in
    ten bytes."""
    rng = np.random.default_rng(8)
    out = []
    for k in (1, 3, 40):
        v = TopK(k)(rng.standard_normal(3000))
        v32 = SparseVector(3000, v.indices, v.values.astype(np.float32).astype(float))
        out += [update_bytes(9, encode(v), False), update_bytes(0, encode(v), True),
                update_bytes(3, encode(v32, float32=True, packed=True), False),
                update_bytes(5, encode(v32, float32=True), False)]
    dense = SparseVector.dense(rng.standard_normal(5))
    out += [update_bytes(2**40, encode(dense), False), update_bytes(4, encode(v), False, encode(dense)),
            update_bytes(6, encode(SparseVector.zeros(3000)), False),
            pb.WorkerMessage(update=pb.Update(round=7, message=vector_to_proto(v))).SerializeToString()]
    vec = pb.SparseVector(dim=10, indices=np.array([1, 4], "<u4").tobytes(), values=np.ones(2).tobytes())
    upd = pb.Update(round=3, message=vec, replace=True).SerializeToString()
    assert upd.endswith(b"\x18\x01")
    inner = vector_to_proto(SparseVector(10, np.array([2], np.uint32), np.ones(1))).SerializeToString()
    crafted = [envelope(upd + b"\x18\x01"), envelope(upd[:-1] + b"\x02"),
               envelope(b"\x12" + bytes([len(inner) + 1]) + inner),
               envelope(b"\x12" + bytes([len(inner)]) + inner[:-1] + b"\x12\x01"),
               envelope(upd.replace(b"\x1a\x10", b"\x1a\x11")),  # the values run one byte into `replace`
               envelope(upd[:2] + b"\x12" + bytes([len(inner) + 6]) + inner + b"\x30\x85\x80\x80\x80\x10" + upd[-2:]),
               envelope(b"\x08" + b"\x80" * 9 + b"\x02" + upd[2:])]  # round 2**64 = 0: read by read_update alone
    return out, crafted


HONEST, CRAFTED = update_variants()
VARIANTS = HONEST + CRAFTED


@needs_numba
@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, len(VARIANTS) - 1),
       edits=st.lists(st.tuples(st.sampled_from(["set", "cut", "insert", "long"]), st.integers(0, 2**16),
                                st.integers(0, 255)), max_size=3),
       near=st.sampled_from(["head", "anywhere", "tail"]))
def test_the_compiled_reader_answers_as_read_update_or_leaves_it_to_it(which, edits, near):
    """Mangled Updates (a byte set, the message cut short, a byte inserted, a varint made longer than it need be),
    mostly among the keys and lengths at the head and tail where the structure is: the compiled reader returns what
    ``read_update`` returns, or None (it then decides; it agrees with protobuf, above)."""
    raw = bytearray(VARIANTS[which])
    for op, at, byte in edits:
        pos = at % 48 if near == "head" else len(raw) - 1 - at % 48 if near == "tail" else at % (len(raw) + 1)
        pos = min(max(pos, 0), len(raw))
        if op == "set" and pos < len(raw):
            raw[pos] = byte
        elif op == "cut":
            del raw[pos:]
        elif op == "insert":
            raw.insert(pos, byte)
        elif op == "long" and pos < len(raw):  # a byte 0x80 | b before ... : the same number if a 0x00 follows
            raw[pos:pos + 1] = bytes([raw[pos] | 0x80, 0])
    raw = bytes(raw)
    got = compiled_read(raw)
    assert got is None or got == read_update(raw)


@needs_numba
def test_the_compiled_reader_takes_the_updates_it_should_and_leaves_the_rest():
    for raw in HONEST:
        ref = read_update(raw)
        got = compiled_read(raw)
        if ref.buffers is None:
            assert got == ref  # every field, the arrays as the same bytes
            assert got.vector.values.obj is raw  # views of the received bytes, not copies
        else:
            assert got is None
    assert [read_update(raw) is None for raw in CRAFTED] == [True] * 6 + [False]
    assert [compiled_read(raw) for raw in CRAFTED] == [None] * 7
    for raw in CRAFTED:  # and read_update as protobuf reads them (index_bits 2**32 + 5 is 5 there, the round 0)
        ours = read_update(raw)
        assert ours is None or ours == update_from_proto(pb.WorkerMessage.FromString(raw).update)
    assert compiled_read(b"") is None and compiled_read(b"\x1a\x00") is None  # an empty Update: no vector
    assert compiled_read(pb.WorkerMessage(hello=pb.Hello(run_id="x")).SerializeToString()) is None
    longest = b"\x1a" + b"\x80" * 9 + b"\x00"  # a length of 10 bytes: read_update's to judge
    assert compiled_read(longest) is None and read_update(longest) is not None


@needs_numba
def test_a_large_update_goes_through_the_compiled_reader(rng):
    v = TopK(compiled.MIN_BYTES // 12 + 1)(rng.standard_normal(10**5))
    raw = update_bytes(12, encode(v), False)
    assert compiled.read_update(raw) == read_update(raw) == read_update_fast(raw)
    assert compiled.read_update(raw[:compiled.MIN_BYTES - 1]) is None  # below the threshold: not run
    decoded = decode(read_update_fast(raw).vector, expected_dim=10**5)
    assert decoded.indices.tobytes() == v.indices.tobytes() and decoded.values.tobytes() == v.values.tobytes()


@pytest.mark.parametrize("cls", [EncodedVector, UpdateIn, SparseVector])
def test_the_quick_init_of_the_received_messages_takes_their_fields(cls):
    """EncodedVector, UpdateIn and SparseVector set their fields in one step (built for every vector received): the
    signature
    lists the dataclass's fields in order with their defaults, and what it builds is what the fields say."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    fields = dataclasses.fields(cls)
    assert [p.name for p in params] == [f.name for f in fields]
    defaults = [inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default for f in fields]
    assert [p.default for p in params] == defaults
    args = [object() for _ in params]
    built = cls(*args)
    assert [getattr(built, f.name) for f in fields] == args
    assert built == cls(*args) or cls is SparseVector  # SparseVector compares by identity (eq=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.replace = True  # type: ignore[misc]
