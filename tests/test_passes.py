"""A worker's steady round allocates nothing of size d beyond its gradient (issue 22, point 3): EF21's residual and
Top-k's magnitudes go into buffers the worker keeps, g_i moves in place at the k sent entries (undone in O(k) when
the round leaves the message out), and the replica's x −= s·g uses a kept buffer too. Counted by tracing the
allocations of a real ``WorkerNode`` round; the bits are checked against the copying path."""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest

from ef21.compression import kernels
from ef21.compression.compressors import TopK
from ef21.engine.config import RunConfig, make_x0
from ef21.engine.nodes import WorkerNode, gradient
from ef21.engine.simulate import plan_for, simulate
from ef21.methods import EF21, WorkerContext
from ef21.methods.base import InPlace
from ef21.problems.problem import build_problem

D = 1 << 17  # on Top-k's sampled path (d >= 16,384, k <= d/16)


def nodes(cfg: RunConfig):
    problem = build_problem(cfg)
    plan = plan_for(cfg, problem)
    x0 = make_x0(cfg.x0, problem.d, problem.x0)
    workers = [WorkerNode(plan.method, plan.compressor, obj, i, gamma=plan.gamma, x0=x0,
                          setting=plan.worker_setting(i)) for i, obj in enumerate(problem.objectives)]
    return workers, plan.master_node(x0)


def peak_of(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("evaluate", [False, True])
def test_the_steady_round_allocates_nothing_of_size_d_beyond_the_gradient(evaluate, monkeypatch):
    """Also on an evaluation round (every round by default): with numba its G comes out of the fused pass. The
    whole round is bounded by the gradient's own peak, and the method step, traced apart (the gradient's
    temporaries would hide a d-byte mask), by its k-sized work."""
    cfg = RunConfig(problem="quadratic", dim=D, workers=2, k=D // 100, rounds=10)
    workers, master = nodes(cfg)
    for _ in range(3):  # round 0 (dense g_i⁰) and two steady rounds: the kept buffers exist from here on
        reports = [w.step(evaluate=evaluate) for w in workers]
        down = master.aggregate([r.message for r in reports])
        for w in workers:
            w.apply(down)
    w = workers[0]
    x = w.replica.x
    grad_peak = peak_of(lambda: w.objective.value_and_grad(x) if evaluate else gradient(w.objective, x))
    others = workers[1].step(evaluate=evaluate)
    step_peaks: list[int] = []
    own = type(w.method).worker_step

    def traced(self, *args):  # the real step, its own peak measured above what was traced when it began
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = own(self, *args)
        step_peaks.append(tracemalloc.get_traced_memory()[1] - held)
        return out

    monkeypatch.setattr(type(w.method), "worker_step", traced)
    state: dict = {}
    peak = peak_of(lambda: state.update(report=w.step(evaluate=evaluate)))
    assert (state["report"].distortion is not None) == evaluate and len(step_peaks) == 1
    down = master.aggregate([state["report"].message, others.message])
    apply_peak = peak_of(lambda: w.apply(down))
    # The gradient's own temporaries, then Top-k's bool mask (d bytes) and k-sized work; before phase 2 the round
    # added a residual, |residual|, a copy of g_i and s·g: four float vectors of d (32·d bytes). With the compiled
    # loops (numba) not even the mask, on evaluation rounds too: the candidates go into a kept buffer and G comes
    # out of the same pass.
    numpy_d = 0 if kernels.available() else 2 * D
    assert max(peak, apply_peak) <= grad_peak + numpy_d + 64 * cfg.k, (peak, apply_peak, grad_peak)
    assert step_peaks[0] <= numpy_d + 64 * cfg.k, step_peaks


def test_in_place_step_equals_the_copying_step_and_undoes_exactly():
    rng = np.random.default_rng(5)
    d, k = 50_000, 400
    g_i, grad = rng.standard_normal(d), rng.standard_normal(d)
    copy_ctx = WorkerContext(TopK(k), 0.1, "full", None)
    msg_copy, g_copy, dist_copy = EF21().worker_step(g_i.copy(), grad, copy_ctx, grad)
    kept = g_i.copy()
    ctx = WorkerContext(TopK(k), 0.1, "full", None, scratch=np.empty(d), mag=np.empty(d))
    msg, pending, dist = EF21().worker_step(kept, grad, ctx, grad)
    assert isinstance(pending, InPlace) and pending.state is kept
    np.testing.assert_array_equal(msg.vector.indices, msg_copy.vector.indices)
    assert msg.vector.values.tobytes() == msg_copy.vector.values.tobytes()
    assert kept.tobytes() == g_copy.tobytes() and dist == dist_copy
    assert pending.undo().tobytes() == g_i.tobytes()  # a round that left the message out: g_i as it was


@pytest.mark.parametrize("k", [D // 100, D // 8])  # the sampled Top-k path and the full selection
def test_in_place_rounds_with_left_out_workers_equal_the_copying_simulation(k, monkeypatch):
    # EF21-PP: rank 1's message dropped in some rounds (its in-place step undone) — against the same run with every
    # step copying g_i, as the code did before the buffers.
    cfg = RunConfig(problem="quadratic", dim=D // 8, workers=3, k=k // 8, rounds=12)
    missing = {2: [1], 3: [1], 7: [0, 2]}
    fast = simulate(cfg, keep_iterates=True, missing=missing)
    original = WorkerContext.__init__

    def copying(self, *args, **kwargs):  # the context without buffers: the step copies, as before
        original(self, *args, **{k: v for k, v in kwargs.items() if k not in ("scratch", "mag")})

    monkeypatch.setattr(WorkerContext, "__init__", copying)
    slow = simulate(cfg, keep_iterates=True, missing=missing)
    assert np.array(fast.xs).tobytes() == np.array(slow.xs).tobytes()
    assert [r.G for r in fast.records] == [r.G for r in slow.records]


needs_numba = pytest.mark.skipif(not kernels.available(), reason="numba is not installed (pip install -e '.[fast]')")


@needs_numba
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_fused_top_k_equals_the_numpy_path_ties_included(dtype):
    """One compiled pass (``TopK.compress_difference``) picks the same entries, ties by the lower index, and the
    same values as Top-k of the residual numpy forms."""
    rng = np.random.default_rng(11)
    d, k = D, D // 100
    for trial in range(4):
        a = rng.standard_normal(d).astype(dtype)
        b = rng.standard_normal(d).astype(dtype)
        if trial % 2:  # many exact ties: small integers, so |a − b| repeats at the k-th magnitude
            a, b = np.round(4 * a).astype(dtype), np.round(2 * b).astype(dtype)
        cand = np.empty(8 * k + 4096, dtype=np.int64)
        fused = TopK(k).compress_difference(a, b, cand)
        plain = TopK(k)(a - b)
        assert fused is not None and fused.values.dtype == dtype
        assert fused.indices.tobytes() == plain.indices.tobytes()
        assert fused.values.tobytes() == plain.values.tobytes()
    small = np.empty(8, dtype=np.int64)  # more candidates than the buffer holds: the numpy path decides
    assert TopK(k).compress_difference(a, b, small) is None


@needs_numba
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_fused_step_of_x_equals_numpys_two_operations(dtype):
    rng = np.random.default_rng(3)
    d = kernels.MIN_D + 1
    x, g = rng.standard_normal(d).astype(dtype), rng.standard_normal(d).astype(dtype)
    for s in (0.1, 1 / 3, 123.456789, 2.0**-30):
        want = x.copy()
        want -= s * g
        got = x.copy()
        assert kernels.sub_scaled(got, s, g)
        assert got.tobytes() == want.tobytes(), s  # no fused multiply-add: the product is rounded first
    assert not kernels.sub_scaled(x[:100], 0.5, g[:100])  # a small d: numpy's path (numba's overhead would dominate)


@needs_numba
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_quadratic_gradient_in_one_pass_equals_numpys(dtype):
    """``kernels.scaled_difference`` (the separable quadratic's gradient) against numpy's h * (x − c) computed in
    float64 from x widened, rounded once to x's dtype; the objective takes it from MIN_D on."""
    from ef21.problems.objectives import SeparableQuadratic

    rng = np.random.default_rng(8)
    d = kernels.MIN_D + 3
    h, c = rng.uniform(0.5, 1.5, d), rng.standard_normal(d)
    x = (rng.standard_normal(d) * 7).astype(dtype)
    want = (h * (x.astype(np.float64) - c)).astype(dtype)
    out = np.empty(d, dtype)
    assert kernels.scaled_difference(h, x, c, out)
    assert out.tobytes() == want.tobytes()
    assert SeparableQuadratic(h, c).grad(x).tobytes() == want.tobytes()
    assert not kernels.scaled_difference(h[:100], x[:100], c[:100], out[:100])  # a small d: numpy's path


G_RTOL = {"float64": 1e-12, "float32": 1e-6}
"""How close the fused pass's G is to the numpy path's: the same terms, summed in another order (float64 partial
sums there, numpy's dot here — a float32 dot in float32, so its own rounding, about 1e-7, sets that tolerance)."""


@needs_numba
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_fused_evaluation_step_equals_the_numpy_path_and_measures_g(dtype):
    """An evaluation round's step (reference = the gradient): one compiled pass gives the same message and g_i as
    the numpy path, bit for bit, and G = ‖g_i_new − ∇f_i‖² to rounding — against the numpy path's value and against
    a plain float64 computation from the vectors (independent of both). The stochastic case (another reference)
    gives the numpy path's G bit for bit."""
    rng = np.random.default_rng(17)
    d, k = D, D // 100
    step = EF21()
    for trial in range(4):
        g_i = rng.standard_normal(d).astype(dtype)
        grad = (g_i + rng.standard_normal(d) * 10.0 ** -trial).astype(dtype)  # G spans a few orders of magnitude
        if trial == 3:  # many exact ties at the k-th magnitude, and candidates left out of the selection
            grad, g_i = np.round(4 * grad).astype(dtype), np.round(2 * g_i).astype(dtype)
        found = TopK(k).compress_difference_with_error(grad, g_i, np.empty(8 * k + 4096, dtype=np.int64))
        assert found is not None  # the fused pass ran: a fallback to numpy would hide what this test checks
        fused_ctx = WorkerContext(TopK(k), 0.1, "full", None, scratch=np.empty(d, dtype), mag=np.empty(d, dtype),
                                  cand=np.empty(8 * k + 4096, dtype=np.int64))
        numpy_ctx = WorkerContext(TopK(k), 0.1, "full", None, scratch=np.empty(d, dtype), mag=np.empty(d, dtype))
        for reference in ("grad", "other"):
            ref = grad if reference == "grad" else (grad + 0.5).astype(dtype)
            g_fused, g_plain = g_i.copy(), g_i.copy()
            msg, pending, dist = step.worker_step(g_fused, grad, fused_ctx, ref)
            msg_np, pending_np, dist_np = step.worker_step(g_plain, grad, numpy_ctx, ref)
            assert isinstance(pending, InPlace) and pending.state is g_fused
            assert msg.vector.indices.tobytes() == msg_np.vector.indices.tobytes() == found[0].indices.tobytes()
            assert msg.vector.values.tobytes() == msg_np.vector.values.tobytes()
            assert g_fused.tobytes() == g_plain.tobytes()
            if reference == "other":
                assert dist == dist_np  # sq_dist on both paths: the same bits
                continue
            assert dist == found[1]
            assert dist == pytest.approx(dist_np, rel=G_RTOL[dtype], abs=0.0)
            oracle = g_fused.astype(np.float64) - grad.astype(np.float64)
            assert dist == pytest.approx(float(np.sum(oracle * oracle)), rel=G_RTOL[dtype], abs=0.0)


@needs_numba
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("eval_every", [1, 5])
def test_a_run_with_the_compiled_loops_equals_the_numpy_run(dtype, eval_every, monkeypatch):
    """The whole simulation, with left-out workers (undone in-place steps), with numba and with the numpy
    fallback: the same iterates, bit for bit, and the same log but for G's rounding (see ``G_RTOL``). With the
    default ``--eval-every 1`` every round is an evaluation round, and the fused pass serves those too."""
    cfg = RunConfig(problem="quadratic", dim=D // 4, workers=3, k=D // 400, rounds=12, dtype=dtype, x0="normal:1")
    missing = {2: [1], 3: [1], 7: [0, 2]}  # stepped, then dropped: the fused step's in-place g_i undone
    taken: dict[str, list[bool]] = {"compress_difference": [], "compress_difference_with_error": []}

    def counting(name):  # the fused path must be the one taken: count its results
        own = getattr(TopK, name)

        def counted(self, a, b, cand):
            out = own(self, a, b, cand)
            taken[name].append(out is not None)
            return out
        monkeypatch.setattr(TopK, name, counted)

    for name in taken:
        counting(name)
    fast = simulate(cfg, keep_iterates=True, missing=missing, eval_every=eval_every)
    steps = 3 * cfg.rounds  # rounds 1..12, every worker (a left-out worker steps too; its step is undone)
    evaluated = taken["compress_difference_with_error"]
    assert all(taken["compress_difference"]) and all(evaluated)
    assert len(taken["compress_difference"]) + len(evaluated) == steps
    assert len(evaluated) == (steps if eval_every == 1 else 3 * 3)  # rounds 5, 10 and the last
    monkeypatch.setattr(kernels, "_compile", lambda: None)
    plain = simulate(cfg, keep_iterates=True, missing=missing, eval_every=eval_every)
    assert np.array(fast.xs).tobytes() == np.array(plain.xs).tobytes()
    assert len(fast.records) == len(plain.records)
    for a, b in zip(fast.records, plain.records):
        assert dataclasses.replace(a, G=None, elapsed_s=0.0) == dataclasses.replace(b, G=None, elapsed_s=0.0)
        assert (a.G is None) == (b.G is None)
        if a.G is not None:
            assert a.G == pytest.approx(b.G, rel=G_RTOL[dtype], abs=0.0)


@needs_numba
@pytest.mark.parametrize("dtype", [pytest.param("float64", marks=pytest.mark.slow), "float32"])
def test_run_with_the_fused_evaluation_rounds_equals_simulate(tmp_path, dtype):
    """``ef21 run`` (a real master, real worker processes, each compiling or loading the fused loops) equals the
    simulator bit for bit at a d on the compiled path, every round an evaluation round: G included, since both
    sum it the same way in the same environment."""
    from .test_dtype import run_and_compare

    args = ["--problem", "quadratic", "--dim", str(D // 2), "--workers", "2", "--k", str(D // 200), "--rounds", "6",
            "--x0", "normal:1"]
    run_and_compare(tmp_path, args, dtype)
