"""Every refusal of the codec, triggered; and the entry bound a receiver derives from the compressor."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import ef21.compression.codec
from ef21.compression import kernels
from ef21.compression.codec import CodecError, EncodedVector, decode, encode, pack_indices
from ef21.compression.compressors import (
    ContractiveUnbiased,
    Float32Values,
    Identity,
    Natural,
    RandK,
    ScaledRandK,
    ScaledSign,
    TopK,
    make_compressor,
    max_entries,
)
from ef21.compression.sparse import SparseVector


def u32(*idx: int) -> bytes:
    return np.array(idx, dtype="<u4").tobytes()


def f64(*vals: float) -> bytes:
    return np.array(vals, dtype="<f8").tobytes()


PACKED_BITS, PACKED = pack_indices(np.array([2, 5, 9], dtype=np.uint32), 10)
F32x3 = np.ones(3, dtype="<f4").tobytes()

# (what is wrong, the encoded vector, max_nnz, the refusal it must get). One value at three indices would land on
# all three coordinates if the count check were missing: SparseVector.add_to broadcasts.
REFUSALS = [
    ("dimension", EncodedVector(9, u32(1), f64(1.0), False), None, "dimension 9 != 10"),
    ("value width", EncodedVector(10, u32(1), f64(1.0)[:7], False), None,
     "values field has 7 bytes, not a multiple of 8"),
    ("float32 width", EncodedVector(10, u32(1), b"\0" * 6, False, True), None,
     "values field has 6 bytes, not a multiple of 4"),
    ("too many entries", EncodedVector(10, u32(1, 2, 3), f64(1, 2, 3), False), 2, "3 entries, at most 2 allowed"),
    ("dense beyond the bound", EncodedVector(10, b"", f64(*range(10)), True), 3, "10 entries, at most 3 allowed"),
    ("NaN", EncodedVector(10, u32(1), f64(np.nan), False), None, r"non-finite value \(NaN or Inf\)"),
    ("dense with indices", EncodedVector(10, u32(1), f64(*range(10)), True), None,
     "a dense vector carries no indices"),
    ("dense short", EncodedVector(10, b"", f64(1, 2, 3), True), None, "dense vector has 3 values, expected 10"),
    ("index width", EncodedVector(10, u32(1)[:3], f64(1.0), False), None,
     "indices field has 3 bytes, not a multiple of 4"),
    ("count mismatch", EncodedVector(10, u32(1, 4, 7), f64(5.0), False), None, "3 indices but 1 values"),
    ("unsorted", EncodedVector(10, u32(4, 1), f64(1, 2), False), None,
     r"indices are not strictly increasing \(unsorted or duplicate\)"),
    ("duplicate", EncodedVector(10, u32(4, 4), f64(1, 2), False), None, "not strictly increasing"),
    ("out of range", EncodedVector(10, u32(3, 10), f64(1, 2), False), None, "index 10 out of range for dimension 10"),
    ("packed index bits", EncodedVector(10, PACKED, F32x3, False, True, 33), None, "index_bits 33 outside 1..32"),
    ("packed length", EncodedVector(10, PACKED + b"\0" * 8, F32x3, False, True, PACKED_BITS), None,
     r"packed indices have \d+ bytes, not within \d+\.\.\d+ for 3 entries of \d+ low bits"),
    ("packed count", EncodedVector(10, PACKED, F32x3[:8], False, True, PACKED_BITS), None,
     "packed indices hold 3 entries, the values 2"),
    # 0 low bits: the bit vector alone; ones at bits 0, 2, 7 → indices 0, 1, 5, and 5 ≥ dim 4.
    ("packed out of range", EncodedVector(4, b"\x85", F32x3, False, True, 1), None, "index 5 out of range"),
    ("float64 in a float32 run", EncodedVector(10, u32(1), f64(1.0), False), None,
     r"float64 values in a float32 run \(--dtype float32 sends float32\)"),
]
DTYPE_OF = {"float64 in a float32 run": np.float32}  # the receiver's --dtype (float64 for the rest)


@pytest.mark.parametrize("what,enc,max_nnz,match", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_each_malformed_vector_is_refused_with_its_message(what, enc, max_nnz, match):
    with pytest.raises(CodecError, match=match):
        decode(enc, expected_dim=10 if what != "packed out of range" else 4, max_nnz=max_nnz,
               dtype=DTYPE_OF.get(what, np.float64))


def refusal_patterns() -> list[str]:
    """Every ``raise CodecError(...)`` message in the codec's source, as a regex (placeholders match anything)."""
    src = inspect.getsource(ef21.compression.codec)
    patterns = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and \
                getattr(node.exc.func, "id", None) == "CodecError":
            arg = node.exc.args[0]
            parts = arg.values if isinstance(arg, ast.JoinedStr) else [arg]
            patterns.append("".join(re.escape(p.value) if isinstance(p, ast.Constant) else ".*" for p in parts))
    assert len(patterns) == src.count("raise CodecError(")
    return patterns


def test_every_refusal_of_the_codec_has_a_test_above():
    """A refusal added to the codec without a case in REFUSALS fails here."""
    tested = []
    for what, enc, max_nnz, _ in REFUSALS:
        try:
            decode(enc, expected_dim=10 if what != "packed out of range" else 4, max_nnz=max_nnz,
               dtype=DTYPE_OF.get(what, np.float64))
        except CodecError as exc:
            tested.append(str(exc))
    patterns = refusal_patterns()
    assert len(patterns) >= 12
    for p in patterns:
        assert any(re.fullmatch(p, msg) for msg in tested), f"no test triggers the refusal {p!r}"


def test_honest_vectors_at_the_bound_are_accepted(rng):
    v = TopK(3)(rng.standard_normal(10))
    for packed in (False, True):
        got = decode(encode(v, packed=packed), expected_dim=10, max_nnz=3)
        np.testing.assert_array_equal(got.to_dense(), v.to_dense())
    dense = SparseVector.dense(rng.standard_normal(10))
    np.testing.assert_array_equal(decode(encode(dense), expected_dim=10, max_nnz=10).values, dense.values)
    assert decode(encode(SparseVector.zeros(10)), expected_dim=10, max_nnz=0).nnz == 0


def test_max_entries_is_what_each_compressor_can_produce(rng):
    """The bound equals the largest output each compressor actually gives, so it refuses only dishonest
    messages: checked by running every compressor on random vectors."""
    d = 40
    cases = {
        "topk": TopK(3), "randk": RandK(5), "urandk": ScaledRandK(7), "crandk": ContractiveUnbiased(ScaledRandK(4)),
        "compact topk": Float32Values(TopK(6)), "identity": Identity(), "natural": Natural(), "sign": ScaledSign(),
        "cnatural": ContractiveUnbiased(Natural()),
    }
    expected = {"topk": 3, "randk": 5, "urandk": 7, "crandk": 4, "compact topk": 6}
    for name, comp in cases.items():
        produced = max(comp(rng.standard_normal(d), np.random.default_rng(s)).nnz for s in range(20))
        assert max_entries(comp, d) == produced == expected.get(name, d), name
    assert max_entries(make_compressor("topk", 40, 40), 40) == 40


# -- the one compiled pass of decode's checks (kernels.vector_checks) against numpy's passes --------------------------

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                 reason="numba is not installed (pip install -e '.[fast]')")
N = kernels.MIN_ENTRIES + 5  # odd, and past the threshold, so the compiled pass runs
DIM = 4 * N
FAULTS = {  # what a fault writes at a position: into the values, or into the indices
    "nan": ("v", np.nan), "inf": ("v", np.inf), "-inf": ("v", -np.inf), "huge": ("v", 1e300),
    "max": ("v", np.finfo(np.float64).max), "tiny": ("v", 5e-324), "-0": ("v", -0.0),
    "dup": ("i", "dup"), "swap": ("i", "swap"), "dim": ("i", DIM), "big": ("i", 2**32 - 1), "zero": ("i", 0),
}


def outcome(enc: EncodedVector, dim: int, dtype: type) -> str:
    try:
        v = decode(enc, expected_dim=dim, dtype=dtype)
    except CodecError as exc:
        return f"refused: {exc}"
    return f"accepted {v.nnz}"


def oracle(idx: np.ndarray | None, vals: np.ndarray, dim: int) -> str:
    """The rule stated plainly: the first fault among non-finite values, indices not increasing, one ≥ dim."""
    if not np.isfinite(vals).all():
        return "non-finite"
    if idx is not None and (np.diff(idx.astype(np.int64)) <= 0).any():
        return "not strictly increasing"
    if idx is not None and idx.size and int(idx.max()) >= dim:
        return "out of range"
    return "accepted"


@needs_numba
@settings(max_examples=50, deadline=None)
@given(faults=st.lists(st.tuples(st.sampled_from(sorted(FAULTS)), st.integers(0, N - 1)), max_size=3),
       float32=st.booleans(), layout=st.sampled_from(["plain", "packed", "dense"]), seed=st.integers(0, 2**16))
@example(faults=[("dup", N - 1)], float32=False, layout="plain", seed=0)  # each fault at an end, for certain
@example(faults=[("nan", N - 1)], float32=True, layout="dense", seed=1)
@example(faults=[("-inf", 0), ("swap", 3)], float32=True, layout="plain", seed=1)
@example(faults=[("dim", N - 1)], float32=False, layout="plain", seed=0)
@example(faults=[("big", 0)], float32=False, layout="packed", seed=0)
def test_the_compiled_check_refuses_what_numpy_refuses_with_the_same_message(faults, float32, layout, seed):
    """Vectors past ``MIN_ENTRIES`` with up to three faults anywhere (the first and last entries included): decode
    with the compiled pass and with numpy's passes give the same outcome, word for word, and both agree with the
    plain statement of the rule."""
    rng = np.random.default_rng(seed)
    dim = N if layout == "dense" else DIM
    idx = None if layout == "dense" else np.sort(rng.choice(DIM, N, replace=False)).astype(np.int64)
    honest = idx
    vals = rng.standard_normal(N)
    for name, at in faults:
        where, what = FAULTS[name]
        if where == "v":
            vals[at] = what
        elif idx is not None:
            idx = idx.copy()
            j = min(max(at, 1), N - 2 if what == "swap" else N - 1)
            idx[j] = idx[j - 1] if what == "dup" else idx[j + 1] if what == "swap" else what
    with np.errstate(over="ignore"):  # 1e300 is Inf in float32
        vals = vals.astype(np.float32 if float32 or layout == "packed" else np.float64)
    if layout == "packed":  # Elias–Fano codes increasing indices only: its faults come from flipped bits instead
        bits, buf = pack_indices(honest, DIM)
        raw = bytearray(buf)
        for _, at in faults:
            raw[at % len(raw)] ^= 1 << (at % 8)
        enc = EncodedVector(dim, bytes(raw), vals.tobytes(), False, True, bits)
        try:
            idx = ef21.compression.codec.unpack_indices(bytes(raw), bits, N, DIM, checked=False)
        except CodecError:
            idx = None  # a flipped bit changed the count: the sizes refuse first, the same on both paths
    else:
        enc = EncodedVector(dim, b"" if idx is None else idx.astype(np.uint32).tobytes(), vals.tobytes(),
                            idx is None, float32)
    # the receiver's --dtype: float32 values checked as they are, or widened first (a float64 run's compact vectors)
    dtype = np.float32 if float32 and layout != "packed" and seed % 2 else np.float64
    compiled = outcome(enc, dim, dtype)
    with mock.patch.object(kernels, "_compile_checks", lambda: None):
        plain = outcome(enc, dim, dtype)
    assert compiled == plain
    if idx is not None or layout == "dense":
        want = oracle(idx, vals, dim)
        assert compiled.startswith("accepted") if want == "accepted" else want in compiled, (want, compiled)


@needs_numba
def test_the_compiled_check_reports_each_fault_and_small_vectors_stay_with_numpy():
    rng = np.random.default_rng(5)
    idx = np.sort(rng.choice(DIM, N, replace=False)).astype(np.uint32)
    for dtype in (np.float64, np.float32):
        vals = rng.standard_normal(N).astype(dtype)
        assert kernels.vector_checks(idx, vals, DIM) == kernels.CHECK_OK
        assert kernels.vector_checks(None, vals, DIM) == kernels.CHECK_OK
        for bad in (np.nan, np.inf, -np.inf):
            for at in (0, N // 2, N - 1):
                v = vals.copy()
                v[at] = bad
                assert kernels.vector_checks(idx, v, DIM) == kernels.CHECK_NON_FINITE
                assert kernels.vector_checks(None, v, DIM) == kernels.CHECK_NON_FINITE
        for at in (1, N // 2, N - 1):
            i = idx.copy()
            i[at] = i[at - 1]
            assert kernels.vector_checks(i, vals, DIM) == kernels.CHECK_NOT_INCREASING
        assert kernels.vector_checks(idx, vals, int(idx[-1])) == kernels.CHECK_OUT_OF_RANGE
        assert kernels.vector_checks(idx, vals, int(idx[-1]) + 1) == kernels.CHECK_OK
    assert kernels.vector_checks(idx[:100], vals[:100], DIM) is None  # below MIN_ENTRIES: numpy's passes
    with mock.patch.object(kernels, "MIN_ENTRIES", 0):  # at any size when asked (the protocol tests lower it)
        for n in (0, 1, 2):
            assert kernels.vector_checks(idx[:n], vals[:n], DIM) == kernels.CHECK_OK
            assert kernels.vector_checks(None, vals[:n], DIM) == kernels.CHECK_OK
        assert kernels.vector_checks(idx[:1], np.array([np.inf]), DIM) == kernels.CHECK_NON_FINITE
        assert kernels.vector_checks(idx[:1], vals[:1], int(idx[0])) == kernels.CHECK_OUT_OF_RANGE
