"""PyTorch for real: models in train mode (BatchNorm, dropout, augmentation) fed by Datasets, the master's
optimizers, layer-wise Top-k, replicated buffers and ``ef21 export`` — through the examples themselves at tiny
sizes: ``ef21 run`` equals ``ef21 simulate`` bit for bit, a resumed master and a replacement worker continue
exactly, the exported state dict loads into the user's module, the buffers follow an independent oracle, and bad
input is one line."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ef21.__main__ import main
from ef21.engine.config import RunConfig
from ef21.engine.simulate import simulate

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch==2.13.0)")
pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install -e '.[torch]')")

from ef21.methods.estimators import batch_rng, draw_batch  # noqa: E402
from ef21.problems.torch import TorchObjective, seeded  # noqa: E402
from ef21_server.coordinator import MasterOptions  # noqa: E402

from .helpers import ef21_cli as cli  # noqa: E402
from .helpers import finish, one_error_line, running_master, spawn_worker  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RESNET = f"{EXAMPLES / 'digits_resnet.py'}:make"
LM = f"{EXAMPLES / 'stdlib_lm.py'}:make"


def args_of(cfg: RunConfig) -> list[str]:
    """The command line of a configuration (the flags these tests use)."""
    out = ["--workers", str(cfg.workers), "--objective", str(cfg.objective)]
    for k, v in cfg.objective_args:
        out += ["--objective-arg", f"{k}={v}"]
    for name in ("estimator", "batch_size", "optimizer", "momentum", "weight_decay", "clip_norm", "lr_schedule",
                 "warmup", "decay_rounds", "stepsize", "k_per_tensor", "k_floor", "rounds", "beta2", "min_lr"):
        v = getattr(cfg, name)
        if v is not None and v != getattr(RunConfig, name, None):
            out += [f"--{name.replace('_', '-')}", str(v)]
    return out + (["--nesterov"] if cfg.nesterov else [])


# The ResNet example at its smallest: BatchNorm, dropout and augmented Dataset items, SGD with Nesterov momentum,
# weight decay and a warm-up + cosine whose horizon is its own (so a run extended on resume keeps the schedule).
RESNET_CFG = RunConfig(objective=RESNET, objective_args=(("channels", "2"), ("rows", "40")), workers=2, estimator="sgd",
                       batch_size=8, optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4,
                       lr_schedule="cosine", warmup=2, decay_rounds=12, stepsize=0.1, k_per_tensor="0.1", k_floor=2,
                       rounds=6)


# Slow (a minute and more on the shared machine): three runs of the service, a resume among them. CI runs it.
@pytest.mark.slow
def test_train_mode_resnet_run_equals_simulate_resumes_exactly_and_exports(tmp_path):
    """One ``ef21 run`` of the train-mode CNN with the master's optimizer and layer-wise Top-k equals the simulator
    bit for bit (x every round, the buffers at the end); its final checkpoint, resumed by a new master with more
    rounds, continues exactly (optimizer state and buffers restored, sent to new workers); and the exported
    state dict loads into the example's own module with the same weights, buffers and held-out loss."""
    long = simulate(RunConfig(**{**RESNET_CFG.__dict__, "rounds": 12}), keep_iterates=True, eval_every=3)
    short = simulate(RESNET_CFG, keep_iterates=True, eval_every=3)
    ck, xs = tmp_path / "run.ckpt", tmp_path / "xs.npy"
    common = [*args_of(RESNET_CFG), "--eval-every", "3", "-q", "--status-port", "-1", "--checkpoint", str(ck),
              "--checksum-every", "1"]
    r = cli("run", *common, "--save-iterates", str(xs))
    assert r.returncode == 0, r.stderr
    assert "out of sync" not in r.stderr  # every replica's checksum (buffers and optimizer state included) agreed
    np.testing.assert_array_equal(np.load(xs), np.array(short.xs))
    np.testing.assert_array_equal(np.array(short.xs), np.array(long.xs[:7]))  # the schedule ignores --rounds
    assert not np.array_equal(short.xs[0], short.xs[-1])
    # The model the checkpoint holds, exported and loaded the way a user loads it.
    from safetensors.torch import load_file

    from ef21_server import checkpoint

    saved = checkpoint.load_one(ck)
    assert set(short.state) == {k.removeprefix("state.") for k in saved.extra}
    for k, a in short.state.items():
        np.testing.assert_array_equal(saved.extra[f"state.{k}"], a)
    r = cli("export", str(ck))
    assert r.returncode == 0 and "wrote" in r.stdout, r.stderr
    sys.path.insert(0, str(EXAMPLES))
    try:
        import digits_resnet
    finally:
        sys.path.remove(str(EXAMPLES))
    model = digits_resnet.build({"channels": "2"})
    assert model.load_state_dict(load_file(str(tmp_path / "run.safetensors"))) is not None
    x = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().numpy()
    np.testing.assert_array_equal(x, short.x.astype(np.float32))
    bn = model.block2.skip[1]
    assert int(bn.num_batches_tracked) == 6  # one training forward per round that stepped (a shard of one chunk)
    X_test, y_test = digits_resnet.digits16(0)[2:]
    obj = TorchObjective(digits_resnet.build({"channels": "2"}), torch.nn.CrossEntropyLoss(), X_test[:4],
                         y_test[:4], test=(X_test, y_test))
    obj.begin_round((0, 0, 0), short.state["buffers"])
    model.eval()
    with torch.no_grad():
        direct = float(torch.nn.functional.cross_entropy(model(X_test), torch.from_numpy(y_test)))
    assert direct == pytest.approx(obj.metrics(short.x)["test_loss"], rel=1e-6)  # eval mode with b: the same model
    # A new master resumes the finished run with more rounds: its workers get x, g, g_i, the buffers and the
    # optimizer's state in their Start, and the run continues on the uninterrupted one's iterates.
    r = cli("run", *common, "--rounds", "12", "--resume", str(ck), "--save-iterates", str(xs))
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(xs), np.array(long.xs[6:]))


LM_CFG = RunConfig(objective=LM, objective_args=(("width", "8"), ("layers", "1"), ("heads", "2"), ("context", "8"),
                                                 ("train_kb", "2"), ("test_kb", "1")),
                   workers=2, estimator="sgd", batch_size=4, optimizer="adamw", weight_decay=0.1, clip_norm=0.5,
                   lr_schedule="cosine", warmup=2, min_lr=1e-4, stepsize=3e-3, k_per_tensor="0.2", rounds=8)


def test_transformer_run_equals_simulate_and_exports_its_tied_weights(tmp_path):
    """The decoder-only transformer (dropout, tied embedding) with AdamW, clipping, warm-up + cosine and
    layer-wise Top-k: ``ef21 run`` == ``ef21 simulate``; the exported .pt loads into the example's GPT."""
    sim = simulate(LM_CFG, keep_iterates=True, eval_every=4)
    ck, xs, log = tmp_path / "lm.ckpt", tmp_path / "xs.npy", tmp_path / "lm.jsonl"
    r = cli("run", *args_of(LM_CFG), "--eval-every", "4", "-q", "--status-port", "-1", "--checkpoint", str(ck),
            "--save-iterates", str(xs), "--log", str(log), "--encoding", "compact")
    assert r.returncode == 0, r.stderr
    compact = simulate(RunConfig(**{**LM_CFG.__dict__, "encoding": "compact"}), keep_iterates=True, eval_every=4)
    np.testing.assert_array_equal(np.load(xs), np.array(compact.xs))
    assert not np.array_equal(sim.xs[-1], compact.xs[-1])  # float32 values on the wire: another run, as documented
    assert set(sim.records[-1].metrics) == {"test_loss", "test_ppl", "test_bpc"}
    r = cli("export", str(ck), "--format", "pt", "-o", str(tmp_path / "lm.pt"))
    assert r.returncode == 0, r.stderr
    sys.path.insert(0, str(EXAMPLES))
    try:
        import stdlib_lm
    finally:
        sys.path.remove(str(EXAMPLES))
    model = stdlib_lm.build(dict(LM_CFG.objective_args))
    state = torch.load(tmp_path / "lm.pt")
    assert list(state) == list(model.state_dict())  # the module's own keys, in order, the tied head included
    model.load_state_dict(state)
    assert model.head.weight is model.tok.weight
    x = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().numpy()
    np.testing.assert_array_equal(x, compact.x.astype(np.float32))
    assert len(stdlib_lm.generate(model, "def ", 10)) == 14


@pytest.mark.slow  # a worker killed and replaced mid-run: half a minute and more on the shared machine
async def test_a_replacement_worker_gets_the_buffers_and_the_optimizer_state(tmp_path):
    """A worker killed mid-run and replaced: the new process starts from the master's buffers and AdamW state (and
    its g_i), and the run ends on the simulator's iterates as if nothing had happened."""
    cfg = RunConfig(**{**RESNET_CFG.__dict__, "optimizer": "adamw", "momentum": 0.0, "nesterov": False,
                       "weight_decay": 0.01, "stepsize": 0.01, "rounds": 30, "decay_rounds": None})
    sim = simulate(cfg, keep_iterates=True, eval_every=10)
    opts = MasterOptions(cfg, eval_every=10, save_iterates=tmp_path / "xs.npy", checksum_every=1)
    async with running_master(opts) as master:
        procs = [await spawn_worker(master.address, "--rank", str(r), "--delay", "0.03") for r in range(2)]
        await asyncio.wait_for(_until(lambda: master.coord.round >= 8), 60)
        procs[1].send_signal(signal.SIGKILL)
        await procs[1].wait()
        await asyncio.wait_for(_until(lambda: master.coord.sessions[1].state == "lost"), 30)
        replaced_at = master.coord.round
        procs[1] = await spawn_worker(master.address, "--rank", "1")
        results = await finish(procs, timeout=120)
        assert [c for c, _ in results] == [0, 0], results
        await asyncio.wait_for(master.wait(), 10)
    assert replaced_at < 30 and master.coord.stop_reason == "rounds"
    np.testing.assert_array_equal(np.load(tmp_path / "xs.npy"), np.array(sim.xs))


async def _until(pred) -> None:  # type: ignore[no-untyped-def]
    while not pred():
        await asyncio.sleep(0.02)


# -- the buffers against an oracle, train mode, Datasets ----------------------------------------------------------

BN_PLUGIN = '''
import numpy as np
import torch
from ef21.problems.torch import TorchObjective, seeded

def rows(seed, rank):
    rng = np.random.default_rng([seed, rank])
    return rng.standard_normal((12, 3)) * (1 + rank) + rank, rng.integers(0, 2, 12)

def make(ctx):
    X, y = rows(ctx.seed, ctx.rank)
    HOOK
    model = seeded(ctx.seed, lambda: torch.nn.Sequential(torch.nn.BatchNorm1d(3, momentum=0.25),
                                                         torch.nn.Linear(3, H), torch.nn.ReLU(),
                                                         torch.nn.Dropout(0.5), torch.nn.Linear(H, 2)))
    return TorchObjective(adjust(ctx, model), torch.nn.CrossEntropyLoss(), X, y, dtype="float64")


def adjust(ctx, model):
    return model
'''


def bn_plugin(tmp_path, hook: str = "H = 4") -> str:
    path = tmp_path / "bn.py"
    path.write_text(BN_PLUGIN.replace("HOOK", textwrap.indent(hook, "    ").strip()))
    return f"{path}:make"


def test_the_buffers_are_the_running_average_of_the_workers_batch_statistics(tmp_path):
    """The oracle: BatchNorm on the raw inputs, so its batch statistics are the rows' own mean and unbiased variance
    (numpy, from the rows ef21 draws for each worker and round); the buffers every replica holds must be the
    momentum average of the workers' mean statistics, round after round, and count the training forwards."""
    from ef21.problems.plugins import load_plugin

    spec = bn_plugin(tmp_path)
    cfg = RunConfig(objective=spec, workers=3, estimator="sgd", batch_size=5, stepsize=0.05, k=3, rounds=7)
    res = simulate(cfg)
    rows = load_plugin(spec).factory.__globals__["rows"]
    shards = [rows(0, r)[0] for r in range(3)]
    mean, var, m = np.zeros(3), np.ones(3), 0.25
    for t in range(7):
        batches = [X if t == 0 else X[draw_batch(batch_rng(0, r, t), 12, 5)] for r, X in enumerate(shards)]
        mean = mean + np.mean([m * (b.mean(0) - mean) for b in batches], axis=0)
        var = var + np.mean([m * (b.var(0, ddof=1) - var) for b in batches], axis=0)
    b = res.state["buffers"]
    np.testing.assert_allclose(b[:3], mean, rtol=1e-12)
    np.testing.assert_allclose(b[3:6], var, rtol=1e-12)
    assert b[6] == 7.0  # num_batches_tracked: rounds 0..6 trained, round 7 only evaluated


def test_train_mode_draws_are_seeded_by_seed_rank_and_round_and_leave_the_global_generators_alone(rng):
    X = rng.standard_normal((10, 3))
    y = (X[:, 0] > 0).astype(np.int64)
    model = seeded(0, lambda: torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Dropout(0.5),
                                                  torch.nn.Linear(16, 2)))
    obj = TorchObjective(model, torch.nn.CrossEntropyLoss(), X, y, dtype="float64")
    x = obj.x0()
    torch.manual_seed(7)
    np.random.seed(7)
    before = (torch.random.get_rng_state(), np.random.get_state()[1].copy())

    def grad(key, rows=None):  # type: ignore[no-untyped-def]
        obj.begin_round(key, None)
        return obj.value_and_grad(x)[1] if rows is None else obj.grad_batch(x, rows)

    a = grad((0, 1, 5))
    np.testing.assert_array_equal(a, grad((0, 1, 5)))  # a function of (seed, rank, round)
    assert not np.array_equal(a, grad((0, 1, 6))) and not np.array_equal(a, grad((0, 2, 5)))
    assert not np.array_equal(grad((0, 1, 5), np.arange(10)), a)  # the minibatch's draws are its own
    assert torch.equal(torch.random.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1])
    obj.train = False  # eval mode: no dropout, every key the same gradient
    np.testing.assert_array_equal(grad((0, 1, 5)), grad((3, 0, 9)))


class Counting(torch.utils.data.Dataset):
    """A lazy dataset: each item made when asked for, and every fetch counted."""

    def __init__(self, X: np.ndarray, y: np.ndarray) -> None:
        self.X, self.y, self.fetched = X, y, []

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        self.fetched.append(i)
        return torch.from_numpy(self.X[i]), int(self.y[i])


def test_a_dataset_gives_the_tensors_gradients_and_is_read_only_where_needed(rng):
    X = rng.standard_normal((23, 3))
    y = rng.integers(0, 2, 23)

    def build():  # type: ignore[no-untyped-def]
        return seeded(0, lambda: torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)))

    tensors = TorchObjective(build(), torch.nn.CrossEntropyLoss(), X, y, dtype="float64")
    ds = Counting(X, y)
    lazy = TorchObjective(build(), torch.nn.CrossEntropyLoss(), ds, dtype="float64", chunk_size=5)
    x = rng.standard_normal(tensors.d)
    rows = np.array([2, 3, 11, 17])
    np.testing.assert_array_equal(lazy.grad_batch(x, rows), tensors.grad_batch(x, rows))
    assert ds.fetched == [2, 3, 11, 17]  # only the minibatch's rows
    ds.fetched.clear()
    f_lazy, g_lazy = lazy.value_and_grad(x)
    f, g = tensors.value_and_grad(x)
    np.testing.assert_allclose(g_lazy, g, rtol=1e-13, atol=1e-15)  # chunks of 5 rows, accumulated
    assert f_lazy == pytest.approx(f, rel=1e-13)
    assert sorted(ds.fetched) == list(range(23)) and len(ds.fetched) == 23  # every row once, never all at once


# -- bad input: one line, exit 2 -----------------------------------------------------------------------------------

# Rank 1's model holds as many parameters, in another shape: only the layout tells.
TRANSPOSED = ("H = 4\ndef adjust(ctx, model):\n    if ctx.rank == 1:\n"
              "        model[1].weight = torch.nn.Parameter(model[1].weight.detach().reshape(3, 4).clone())\n"
              "    return model")


@pytest.mark.parametrize("hook,flags,match", [
    ("H = 4 + ctx.rank", [], "the objective's dimension differs between workers: rank 0: d=32, rank 1: d=38"),
    (TRANSPOSED, [], "the model differs between workers: rank 1's has parameter '1.weight' of shape (3, 4) "
                     "(float64) where the run's model has '1.weight' of shape (4, 3)"),
    ("H = 4\nclass Boom(torch.utils.data.Dataset):\n    def __len__(self): return 12\n"
     "    def __getitem__(self, i):\n        if i == 3:\n            raise KeyError(i)\n"
     "        return torch.zeros(3), 0\nX, y = Boom(), None",
     ["--estimator", "sgd", "--batch-size", "12"], "the dataset raised KeyError on item 3"),
    ("H = 4\nclass Words(torch.utils.data.Dataset):\n    def __len__(self): return 12\n"
     "    def __getitem__(self, i): return 'word'\nX, y = Words(), None", [],
     "dataset item 0 is a str, expected an (input, target) pair"),
    ("H = 4", ["--k-per-tensor", "5"], "--k-per-tensor 5 is larger than tensor '4.bias' (2 entries)"),
    ("H = 4", ["--optimizer", "adamw", "--method", "ef"], "--optimizer does not combine with --method ef"),
    ("H = 4", ["--optimizer", "adam", "--momentum", "0.9"], "--momentum is SGD's; --optimizer adam has --beta1"),
], ids=["dimension", "layout", "dataset-raises", "dataset-type", "k-per-tensor", "optimizer-ef", "adam-momentum"])
def test_bad_input_in_simulate_is_one_line_exit_2(tmp_path, capsys, hook, flags, match):
    code = main(["simulate", "--objective", bn_plugin(tmp_path, hook), "--workers", "2", "--rounds", "2",
                 "--stepsize", "0.1", "-q", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and match in err, err


def test_a_model_that_differs_between_workers_ends_ef21_run_with_one_line(tmp_path):
    """The master (which imports no user code) compares the layouts the workers report at set-up and refuses the
    one that differs; the worker takes that as bad input (exit 2), and ``ef21 run`` says it once."""
    r = cli("run", "--objective", bn_plugin(tmp_path, TRANSPOSED), "--workers", "2", "--rounds", "3",
            "--stepsize", "0.1", "-q", "--status-port", "-1")
    line = one_error_line(r)
    # Whichever worker sets up first defines the run's model; the other is refused.
    assert line.startswith("ef21 run: error:") and re.search(
        r"model mismatch: rank [01]'s model has parameter '1.weight' of shape \((3, 4|4, 3)\)", line), line


def test_export_of_a_run_without_a_model_is_one_line(tmp_path):
    ck = tmp_path / "q.ckpt"
    r = cli("run", "--problem", "quadratic", "--dim", "6", "--workers", "2", "--rounds", "2", "-q",
            "--status-port", "-1", "--checkpoint", str(ck))
    assert r.returncode == 0, r.stderr
    line = one_error_line(cli("export", str(ck)))
    assert f"checkpoint {ck} holds no model" in line and "quadratic" in line, line
    assert "no such file" in one_error_line(cli("export", str(tmp_path / "missing.ckpt")))
    assert not (tmp_path / "q.safetensors").exists()
