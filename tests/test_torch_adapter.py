"""The PyTorch adapter on a tiny model: flattening, gradients against autograd and finite differences, minibatch
rows, metrics, ``ef21 run`` == ``ef21 simulate`` bit for bit through real worker processes, and bad input."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ef21.__main__ import main
from ef21.engine.config import RunConfig
from ef21.engine.simulate import simulate

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch==2.13.0)")

from ef21.problems.torch import TorchObjective, seeded  # noqa: E402

from .helpers import ef21_cli as cli
from .helpers import one_error_line as one_line_error

PY = sys.executable

# A two-layer classifier on a few rows each worker draws from (seed, rank); HOOK is replaced to break it.
PLUGIN = '''
import numpy as np
import torch
from ef21.problems.torch import TorchObjective, seeded

def make(ctx):
    rng = np.random.default_rng([ctx.seed, ctx.rank])
    X = rng.standard_normal((24, 3))
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64)
    X_test = rng.standard_normal((10, 3))
    model = seeded(ctx.seed, lambda: torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)))
    loss = torch.nn.CrossEntropyLoss()
    HOOK
    return TorchObjective(model, loss, X, y, test=(X_test, (X_test[:, 0] > 0).astype(np.int64)),
                          dtype=ctx.options.get("dtype", "float32"))
'''


NAN_ON_RANK_1 = ("if ctx.rank == 1:\n"
                 "    loss = lambda out, y: torch.nn.functional.cross_entropy(out, y) * float('nan')")


def write_plugin(tmp_path, hook: str = "pass") -> str:
    path = tmp_path / "tiny.py"
    path.write_text(PLUGIN.replace("HOOK", textwrap.indent(hook, "    ").strip()))
    return f"{path}:make"




def tiny(seed: int = 0) -> torch.nn.Module:
    return seeded(seed, lambda: torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)))


@pytest.fixture
def data(rng):
    X = rng.standard_normal((30, 3))
    y = (X[:, 0] > 0).astype(np.int64)
    return X, y


def reference_grad(x: np.ndarray, X: np.ndarray, y: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The gradient as a PyTorch user computes it: a fresh model, vector_to_parameters, loss.backward()."""
    model = tiny(seed=99).to(dtype)  # other initial weights: everything comes from x
    torch.nn.utils.vector_to_parameters(torch.from_numpy(x).to(dtype), model.parameters())
    torch.nn.functional.cross_entropy(model(torch.from_numpy(X).to(dtype)), torch.from_numpy(y)).backward()
    return torch.nn.utils.parameters_to_vector([p.grad for p in model.parameters()]).double().numpy()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_flatten_round_trip_and_x0(data, rng, dtype):
    model = tiny()
    expected_x0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach().double().numpy()
    obj = TorchObjective(model, torch.nn.CrossEntropyLoss(), *data, dtype=dtype)
    assert obj.d == 3 * 5 + 5 + 5 * 2 + 2 and obj.n_samples == 30
    np.testing.assert_array_equal(obj.x0(), expected_x0)  # parameters() order, as PyTorch flattens them
    np.testing.assert_array_equal(obj.x0()[:15], model[0].weight.detach().double().numpy().reshape(-1))
    x = rng.standard_normal(obj.d)
    obj.value_and_grad(x)
    loaded = torch.nn.utils.parameters_to_vector(obj.model.parameters()).detach().double().numpy()
    # x travels into the model: exactly in float64, rounded to the nearest float32 otherwise.
    np.testing.assert_array_equal(loaded, x if dtype == "float64" else x.astype(np.float32).astype(np.float64))
    assert obj.model[0].weight.shape == (5, 3) and obj.model[2].bias.shape == (2,)


def test_seeded_builds_the_same_weights_and_leaves_the_global_generator_alone():
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    a = torch.nn.utils.parameters_to_vector(tiny(7).parameters())
    b = torch.nn.utils.parameters_to_vector(tiny(7).parameters())
    c = torch.nn.utils.parameters_to_vector(tiny(8).parameters())
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradient_equals_an_independent_autograd_computation(data, rng, dtype):
    X, y = data
    obj = TorchObjective(tiny(), torch.nn.CrossEntropyLoss(), X, y, dtype=dtype)
    x = rng.standard_normal(obj.d)
    f, g = obj.value_and_grad(x)
    assert g.dtype == np.float64 and g.shape == (obj.d,)
    tdt = torch.float32 if dtype == "float32" else torch.float64
    np.testing.assert_array_equal(g, reference_grad(x, X, y, tdt))
    if dtype == "float32":
        np.testing.assert_array_equal(g.astype(np.float32).astype(np.float64), g)  # widened exactly
    assert torch.get_num_threads() == 1  # pinned: the same bits in every process


def test_gradient_matches_central_differences(data, rng):
    obj = TorchObjective(tiny(), torch.nn.CrossEntropyLoss(), *data, dtype="float64")
    x = rng.standard_normal(obj.d)
    _, g = obj.value_and_grad(x)
    h = 1e-6
    fd = np.array([(obj.value_and_grad(x + h * e)[0] - obj.value_and_grad(x - h * e)[0]) / (2 * h)
                   for e in np.eye(obj.d)])
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)


def test_minibatch_rows_are_respected(data, rng):
    X, y = data
    obj = TorchObjective(tiny(), torch.nn.CrossEntropyLoss(), X, y, dtype="float64")
    x = rng.standard_normal(obj.d)
    rows = np.array([1, 4, 5, 17, 29])
    g = obj.grad_batch(x, rows)
    np.testing.assert_array_equal(g, reference_grad(x, X[rows], y[rows], torch.float64))
    assert not np.allclose(g, obj.grad_batch(x, np.array([0, 2, 3, 6, 7])))
    np.testing.assert_array_equal(obj.grad_batch(x, np.arange(30)), obj.value_and_grad(x)[1])


def test_metrics_are_held_out_loss_and_accuracy(data, rng):
    X, y = data
    X_test = rng.standard_normal((40, 3))
    y_test = (X_test[:, 1] > 0).astype(np.int64)
    obj = TorchObjective(tiny(), torch.nn.CrossEntropyLoss(), X, y, test=(X_test, y_test), dtype="float64")
    x = rng.standard_normal(obj.d)
    m = obj.metrics(x)
    model = tiny().double()
    torch.nn.utils.vector_to_parameters(torch.from_numpy(x), model.parameters())
    out = model(torch.from_numpy(X_test)).detach()
    assert m["test_acc"] == np.mean(out.argmax(1).numpy() == y_test)
    assert m["test_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(out, torch.from_numpy(y_test))),
                                           rel=1e-12)
    assert not any(p.grad is not None for p in obj.model.parameters())  # evaluated under no_grad


def test_a_loss_that_is_not_a_mean_is_refused(data):
    obj = TorchObjective(tiny(), torch.nn.CrossEntropyLoss(reduction="none"), *data)
    with pytest.raises(ValueError, match="must be a scalar"):
        obj.value_and_grad(obj.x0())


@pytest.mark.parametrize("dtype,estimator", [("float32", "sgd"), ("float64", "page")])
def test_run_equals_simulate_bit_for_bit(tmp_path, dtype, estimator):
    spec = write_plugin(tmp_path)
    args = (("dtype", dtype),)
    cfg = RunConfig(objective=spec, objective_args=args, workers=3, k=4, stepsize=0.5, rounds=30,
                    estimator=estimator, batch_size=6)
    sim = simulate(cfg, keep_iterates=True, eval_every=10)
    xs = tmp_path / "xs.npy"
    log = tmp_path / "log.jsonl"
    r = cli("run", "--objective", spec, "--objective-arg", f"dtype={dtype}", "--workers", "3", "--k", "4",
            "--stepsize", "0.5", "--rounds", "30", "--estimator", estimator, "--batch-size", "6",
            "--eval-every", "10", "--save-iterates", str(xs), "--log", str(log), "-q", "--status-port", "-1")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(xs), np.array(sim.xs))
    assert not np.array_equal(sim.xs[0], sim.xs[-1])  # it trained
    logged = [json.loads(line)["metrics"] for line in log.read_text().splitlines()]
    assert [m for m in logged if m] == [rec.metrics for rec in sim.records if rec.metrics]
    assert set(sim.records[-1].metrics) == {"test_acc", "test_loss"}


def test_a_loss_that_turns_nan_ends_ef21_run_with_one_line_naming_the_rank(tmp_path):
    r = cli("run", "--objective", write_plugin(tmp_path, NAN_ON_RANK_1), "--workers", "2", "--stepsize", "0.1",
            "--rounds", "5", "-q", "--status-port", "-1")
    line = one_line_error(r)
    assert line.startswith("ef21 run: error:") and "tiny.py:make (rank 1)" in line, line
    assert "the loss is nan" in line, line


@pytest.mark.parametrize("hook,flags,match", [
    (NAN_ON_RANK_1, ["--stepsize", "0.1"], "tiny.py:make (rank 1) value_and_grad raised FloatingPointError: "
                                           "the loss is nan on 24 rows"),
    ("pass", [], "gives no smoothness constant (L_i), so there is no theory stepsize: give --stepsize"),
], ids=["nan-loss", "no-stepsize"])
def test_bad_input_in_simulate_is_one_line_exit_2(tmp_path, capsys, hook, flags, match):
    # In this process (the CLI's own entry point): a subprocess would spend its time importing torch again.
    code = main(["simulate", "--objective", write_plugin(tmp_path, hook), "--workers", "2", "--rounds", "5", "-q",
                 *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and match in err, err


@pytest.mark.parametrize("example,option", [("digits_mlp.py", "hidden=8"), ("digits_cnn.py", "channels=2")])
def test_the_digits_examples_shard_the_training_rows_and_train(example, option, capsys):
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install -e '.[torch]')")
    from ef21.problems.plugins import build_objective

    spec = f"{Path(__file__).resolve().parents[1] / 'examples' / example}:make"
    opts = (tuple(option.split("=")),)
    objs = [build_objective(spec, opts, r, 3, 0).inner for r in range(3)]
    assert sum(o.n_samples for o in objs) == 1437  # 80 % of 1797, split by rank without overlap
    assert len({o.X[:1].numpy().tobytes() for o in objs}) == 3
    for o in objs[1:]:  # the same held-out set and initial weights everywhere
        assert torch.equal(o.test[0], objs[0].test[0]) and np.array_equal(o.x0(), objs[0].x0())
    code = main(["simulate", "--objective", spec, "--objective-arg", option, "--workers", "3", "--k", "2",
                 "--stepsize", "0.5", "--rounds", "3", "-q"])
    assert code == 0, capsys.readouterr().err
