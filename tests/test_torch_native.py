"""Torch-native method vectors (``ef21.problems.torch.ops``): a PyTorch objective's worker keeps g_i, the residual,
Top-k's buffers and its replica's (x, g) as float64 tensors on the model's device and gives numpy's bits — Top-k's
ties picked the numpy way (numpy's ``top_k_indices`` is the oracle), the simulator's iterates and log equal with
the switch on and off, and ``ef21 run``'s real worker processes (native) equal the numpy simulator."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from ef21.compression.compressors import TopK, compress, top_k_indices
from ef21.compression.ops import NUMPY
from ef21.engine.config import RunConfig
from ef21.engine.nodes import WorkerNode, backend_for
from ef21.engine.simulate import plan_for, simulate
from ef21.errors import UserError
from ef21.methods import EF21, WorkerContext
from ef21.methods.base import committed
from ef21.problems.problem import build_problem

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch==2.13.0)")
pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install -e '.[torch]')")

from ef21.problems.torch.objective import NATIVE_ENV  # noqa: E402
from ef21.problems.torch.ops import TorchOps  # noqa: E402

from .helpers import ef21_cli as cli  # noqa: E402

MLP = f"{Path(__file__).resolve().parents[1] / 'examples' / 'digits_mlp.py'}:make"
OPS = TorchOps(torch, "cpu", host_select=False)  # torch.topk's selection, as on a GPU


def _tied(rng: np.random.Generator, d: int, levels: int) -> np.ndarray:
    """Magnitudes from a few levels with random signs: ties everywhere, the k-th among them."""
    return rng.integers(0, levels, d).astype(np.float64) * rng.choice([-1.0, 1.0], d)


@pytest.mark.parametrize("d", [7, 300, 40_000])  # 40 000: numpy takes its sampled path
def test_torch_top_k_picks_numpy_s_entries_ties_included(rng, d):
    cases = [rng.standard_normal(d), _tied(rng, d, 3), _tied(rng, d, 50), np.zeros(d), np.full(d, -2.5)]
    for x in cases:
        for k in sorted({1, 2, d // 3, d // 100 + 1, d - 1, d}):
            want = compress(TopK(k), x, None, np.empty(d))
            got = OPS.compress(TopK(k), torch.from_numpy(x.copy()), None, torch.empty(d, dtype=torch.float64))
            assert got.indices.dtype == want.indices.dtype
            np.testing.assert_array_equal(got.indices, want.indices)
            np.testing.assert_array_equal(got.values, want.values)
            np.testing.assert_array_equal(OPS.top_k_indices(torch.from_numpy(x), k).numpy(), top_k_indices(x, k))


def test_ef21_steps_on_tensors_equal_numpy_s_with_either_selection(rng):
    """The method step itself, several rounds with in-place g_i, an undo and a distortion: tensors (CPU's numpy
    selection on a view, and torch.topk as on a GPU) against numpy arrays."""
    d, k = 20_000, 150
    grads = [rng.standard_normal(d) for _ in range(4)]
    grads[2] = np.round(grads[2], 1)  # ties at the k-th magnitude
    runs = []
    for ops in (NUMPY, TorchOps(torch, "cpu"), OPS):
        state, out = None, []
        like = ops.from_numpy(grads[0])
        scratch, mag = ops.empty_like(like), ops.empty_like(like)
        for t, g in enumerate(grads):
            ctx = WorkerContext(TopK(k), 0.1, "full", None, t, scratch=scratch, mag=mag, ops=ops)
            grad = ops.from_numpy(g)
            msg, new, dist = EF21().worker_step(state, grad, ctx, grad)
            out += [msg.vector.indices, msg.vector.values, np.array([dist])]
            state = new.undo() if t == 1 else committed(new)  # round 1 left out: g_i as it was
            out.append(ops.to_numpy(state).copy())
        runs.append(out)
    for other in runs[1:]:
        assert len(other) == len(runs[0])
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)


BASE = RunConfig(workers=3, objective=MLP, objective_args=(("hidden", "16"),), stepsize=0.5, k=40, rounds=12)


@pytest.mark.parametrize("extra", [
    {},  # EF21 Top-k, full gradients
    {"estimator": "sgdm", "batch_size": 16, "init": "compressed"},
    {"downlink_k": 60, "participation": "2"},  # EF21-BC, and EF21-PP's left-out worker undoing its step
    {"momentum": 0.5},  # EF21-HB: the replica's v
    {"estimator": "page", "batch_size": 16},  # PAGE's x_prev
], ids=["topk", "sgdm", "bc-pp", "hb", "page"])
def test_native_simulate_equals_the_numpy_path_bit_for_bit(monkeypatch, extra):
    cfg = dataclasses.replace(BASE, **extra)
    runs = {}
    for native in ("0", "1"):
        monkeypatch.setenv(NATIVE_ENV, native)
        problem = build_problem(cfg)
        plan = plan_for(cfg, problem)
        rule = plan.worker_setting(0).rule
        assert backend_for(problem.objectives[0], plan.method, rule).name == ("torch" if native == "1" else "numpy")
        runs[native] = simulate(cfg, problem, keep_iterates=True, eval_every=4)
    a, b = runs["0"], runs["1"]
    np.testing.assert_array_equal(np.array(a.xs), np.array(b.xs))
    assert not np.array_equal(a.xs[0], a.xs[-1])
    strip = [{**dataclasses.asdict(r), "elapsed_s": 0} for r in a.records]
    assert strip == [{**dataclasses.asdict(r), "elapsed_s": 0} for r in b.records]  # f, ‖∇f‖², G, accuracy


# Slow (30-60 s on the shared machine: three processes importing torch). CI runs it.
@pytest.mark.slow
def test_ef21_run_with_native_workers_equals_the_numpy_simulator(tmp_path, monkeypatch):
    """Real processes: the master (numpy) and two workers on torch tensors, every replica's checksum checked
    every round, against the simulator with the switch off."""
    cfg = dataclasses.replace(BASE, workers=2, estimator="sgdm", batch_size=16, rounds=8)
    monkeypatch.setenv(NATIVE_ENV, "0")
    want = simulate(cfg, keep_iterates=True, eval_every=4)
    monkeypatch.setenv(NATIVE_ENV, "1")
    xs = tmp_path / "xs.npy"
    r = cli("run", "--workers", "2", "--objective", MLP, "--objective-arg", "hidden=16", "--stepsize", "0.5",
            "--k", "40", "--rounds", "8", "--estimator", "sgdm", "--batch-size", "16", "--eval-every", "4", "-q",
            "--status-port", "-1", "--checksum-every", "1", "--save-iterates", str(xs))
    assert r.returncode == 0, r.stderr
    assert "out of sync" not in r.stderr
    np.testing.assert_array_equal(np.load(xs), np.array(want.xs))


def test_a_bad_switch_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(NATIVE_ENV, "maybe")
    with pytest.raises(UserError, match=NATIVE_ENV):
        build_problem(dataclasses.replace(BASE, workers=1))


def test_a_replacement_worker_and_a_resync_land_on_the_tensors(rng, monkeypatch):
    """What the master hands over as numpy (a Start's g and v, the rank's g_i row; a Resync's x, g, v) becomes the
    replica's and the method's tensors, with the same bits; the checksum covers them as numpy."""
    monkeypatch.setenv(NATIVE_ENV, "1")
    cfg = dataclasses.replace(BASE, momentum=0.5)
    problem = build_problem(cfg)
    plan = plan_for(cfg, problem)
    d = problem.d
    x, g, v, row = (rng.standard_normal(d) for _ in range(4))
    node = WorkerNode(plan.method, plan.compressor, problem.objectives[0], 0, gamma=plan.gamma, x0=x,
                      setting=plan.worker_setting(0), g=g, v=v, state=row, round_=5)
    assert node.ops.name == "torch" and torch.is_tensor(node.state) and torch.is_tensor(node.replica.v)
    for want, got in zip((x, g, v), node.replica.state_arrays()):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(node.state.numpy(), row)
    x2, g2, v2 = (rng.standard_normal(d) for _ in range(3))
    node.replica.set_vectors(x=x2, g=g2, v=v2)  # what worker.client's Resync does
    for want, got in zip((x2, g2, v2), node.replica.state_arrays()):
        np.testing.assert_array_equal(got, want)
    assert node.step(evaluate=True).message is not None  # and it steps from there
