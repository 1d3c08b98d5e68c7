"""User objectives (``--objective FILE.py:FUNC``): written by the test, run through the simulator and the real
service, and every way a plugin can be wrong."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap

import numpy as np
import pytest

from ef21.engine.config import RunConfig
from ef21.engine.simulate import simulate
from ef21_server.coordinator import MasterOptions

from .helpers import ef21_cli as cli
from .helpers import eventually, finish, running_master, spawn_worker
from .helpers import one_error_line as one_line_error

PY = sys.executable

# A least-squares objective with everything optional switched on; RANK_HOOK is replaced per test to break it.
PLUGIN = '''
import numpy as np

class LS:
    def __init__(self, A, b):
        self.A, self.b = A, b
        self.d = A.shape[1]
        self.n_samples = A.shape[0]
    def value_and_grad(self, x):
        r = self.A @ x - self.b
        return 0.5 * float(r @ r) / self.n_samples, self.A.T @ r / self.n_samples
    def grad_batch(self, x, rows):
        A = self.A[rows]
        return A.T @ (A @ x - self.b[rows]) / rows.shape[0]
    def smoothness(self):
        return float(np.linalg.eigvalsh(self.A.T @ self.A / self.n_samples)[-1])
    def x0(self):
        return np.full(self.d, 0.5)
    def metrics(self, x):
        return {"norm_x": float(np.linalg.norm(x)), "rank_plus_one": float(RANK + 1)}

def make(ctx):
    global RANK
    RANK = ctx.rank
    rows, d = int(ctx.options.get("rows", 60)), int(ctx.options.get("dim", 8))
    rng = np.random.default_rng([ctx.seed, ctx.rank])
    A = rng.standard_normal((rows, d))
    obj = LS(A, A @ np.arange(d) + 0.1 * rng.standard_normal(rows))
    RANK_HOOK
    return obj
'''


def write_plugin(tmp_path, hook: str = "pass", name: str = "myobj.py") -> str:
    path = tmp_path / name
    path.write_text(PLUGIN.replace("RANK_HOOK", textwrap.indent(hook, "    ").strip()))
    return f"{path}:make"


def test_plugin_run_equals_simulate_with_metrics_and_x0(tmp_path):
    spec = write_plugin(tmp_path)
    cfg = RunConfig(objective=spec, objective_args=(("rows", "50"),), workers=3, k=2, stepsize_mult=4, rounds=80)
    sim = simulate(cfg, keep_iterates=True)
    np.testing.assert_array_equal(sim.xs[0], np.full(8, 0.5))  # the plugin's x0
    log, xs = tmp_path / "l.jsonl", tmp_path / "xs.npy"
    r = cli("run", "--objective", spec, "--objective-arg", "rows=50", "--workers", "3", "--k", "2",
            "--stepsize-mult", "4", "--rounds", "80", "--log", str(log), "--save-iterates", str(xs), "-q",
            "--status-port", "-1")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(xs), np.array(sim.xs))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [row["grad_norm_sq"] for row in rows] == [rec.grad_norm_sq for rec in sim.records]
    # Metrics are the mean over the workers: rank+1 averages to 2 over ranks 0, 1, 2.
    assert rows[-1]["metrics"]["rank_plus_one"] == 2.0
    assert rows[-1]["metrics"]["norm_x"] == pytest.approx(float(np.linalg.norm(sim.x)))


def test_plugin_with_minibatches_run_equals_simulate(tmp_path):
    spec = write_plugin(tmp_path)
    cfg = RunConfig(objective=spec, workers=3, k=2, stepsize_mult=2, rounds=60, estimator="sgd", batch_size=7)
    sim = simulate(cfg, keep_iterates=True)
    xs = tmp_path / "xs.npy"
    r = cli("run", "--objective", spec, "--workers", "3", "--k", "2", "--stepsize-mult", "2", "--rounds", "60",
            "--estimator", "sgd", "--batch-size", "7", "--save-iterates", str(xs), "-q", "--status-port", "-1")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(xs), np.array(sim.xs))


async def test_metrics_in_the_status_and_a_different_objective_is_refused_at_join(tmp_path):
    spec = write_plugin(tmp_path)
    other = write_plugin(tmp_path, hook="obj.b = obj.b + 1.0", name="other.py")
    cfg = RunConfig(objective=spec, workers=2, k=2, rounds=400, stepsize_mult=2)
    async with running_master(MasterOptions(cfg, eval_every=5)) as master:
        # The master imports no user code: its reference is the first worker's objective.
        first = await spawn_worker(master.address, "--rank", "0")
        await eventually(lambda: 0 in master.coord.sessions, what="rank 0 joined")
        intruder = await spawn_worker(master.address, "--rank", "1", "--objective", other)
        (code, err), = await finish([intruder], timeout=60)
        assert code != 0 and "objective mismatch" in err
        assert "other.py:make@" in err and "myobj.py:make@" in err  # both sides named
        honest = await spawn_worker(master.address, "--rank", "1")
        await eventually(lambda: (master.status()["latest"] or {}).get("metrics") is not None,
                         what="metrics in the status")
        doc = master.status()
        assert set(doc["latest"]["metrics"]) == {"norm_x", "rank_plus_one"}
        assert doc["objective"].startswith("myobj.py:make@")
        results = await finish([first, honest], timeout=60)
        assert [c for c, _ in results] == [0, 0], results


@pytest.mark.parametrize("hook,match", [
    ("raise RuntimeError('no GPU here')", "objective myobj.py:make (rank 0) raised RuntimeError: no GPU here"),
    ("obj.d = 'eight'", "without a positive integer d"),
    ("obj.value_and_grad = lambda x: (0.0, np.zeros(3))", "gradient of shape (3,), expected (8,)"),
    ("obj.value_and_grad = lambda x: (0.0, np.full(8, np.nan))", "gradient with NaN or Inf"),
    ("obj.value_and_grad = lambda x: (float('inf'), np.zeros(8))", "non-finite value"),
    ("LS.smoothness = None", "give --stepsize"),
])
@pytest.mark.parametrize("command", ["simulate", "run"])
def test_a_broken_plugin_is_one_line_exit_2(tmp_path, hook, match, command):
    spec = write_plugin(tmp_path, hook=hook)
    r = cli(command, "--objective", spec, "--workers", "2", "--rounds", "5", "-q",
            *(["--status-port", "-1"] if command == "run" else []))
    assert match in one_line_error(r)


@pytest.mark.parametrize("content,match", [
    ("def make(ctx):\n    return 1 +\n", "bad.py:make: import failed: SyntaxError"),
    ("import not_a_module_anywhere\n", "ModuleNotFoundError"),
    ("x = 1\n", "has no function 'make'"),
])
def test_a_plugin_that_cannot_load_is_one_line_exit_2(tmp_path, content, match):
    (tmp_path / "bad.py").write_text(content)
    for command in ("simulate", "run"):
        r = cli(command, "--objective", f"{tmp_path / 'bad.py'}:make", "--workers", "2", "--rounds", "3",
                *(["--status-port", "-1"] if command == "run" else []))
        assert match in one_line_error(r)
    r = cli("simulate", "--objective", f"{tmp_path / 'missing.py'}:make", "--rounds", "1")
    assert "no such file" in one_line_error(r)
    r = cli("simulate", "--objective", "nocolon", "--rounds", "1")
    assert "use FILE.py:FUNC" in one_line_error(r)


def test_dimension_that_differs_between_workers(tmp_path):
    spec = write_plugin(tmp_path, hook="if ctx.rank == 1:\n    obj = LS(obj.A[:, :5], obj.b)")
    r = cli("simulate", "--objective", spec, "--workers", "3", "--rounds", "3")
    assert "rank 0: d=8, rank 1: d=5" in one_line_error(r)


async def test_dimension_mismatch_in_the_service_refuses_the_worker_and_keeps_the_run(tmp_path):
    spec = write_plugin(tmp_path, hook="if ctx.rank == 1:\n    obj = LS(obj.A[:, :5], obj.b)")
    cfg = RunConfig(objective=spec, workers=2, k=2, rounds=20, stepsize_mult=2)
    async with running_master(MasterOptions(cfg)) as master:
        ok = await spawn_worker(master.address, "--rank", "0")
        await eventually(lambda: master.coord.d == 8, what="rank 0 set up")
        bad = await spawn_worker(master.address, "--rank", "1", "--connect-timeout", "3")
        (code, err), = await finish([bad], timeout=60)
        assert code != 0 and "rank 1's objective has d = 5, the run's d = 8" in err
        assert master.coord.state == "waiting" and master.coord.d == 8
        ok.kill()
        await ok.wait()


def test_a_plugin_failing_mid_run_ends_ef21_run_with_one_line(tmp_path):
    # Rank 1's gradient turns NaN at some point during the run: the worker says why and leaves; `ef21 run` stops.
    hook = ("inner = obj.value_and_grad\n"
            "calls = [0]\n"
            "def vg(x):\n"
            "    calls[0] += 1\n"
            "    f, g = inner(x)\n"
            "    return (f, g * np.nan) if ctx.rank == 1 and calls[0] > 10 else (f, g)\n"
            "obj.value_and_grad = vg")
    spec = write_plugin(tmp_path, hook=hook)
    r = cli("run", "--objective", spec, "--workers", "2", "--k", "2", "--rounds", "200", "-q", "--status-port", "-1")
    line = one_line_error(r)
    assert line.startswith("ef21 run: error:") and "(rank 1) returned a gradient with NaN or Inf" in line


async def test_a_plugin_failing_mid_run_is_dropped_with_its_reason_in_the_status(tmp_path):
    hook = ("inner = obj.value_and_grad\n"
            "calls = [0]\n"
            "def vg(x):\n"
            "    calls[0] += 1\n"
            "    if ctx.rank == 1 and calls[0] > 10:\n"
            "        raise ValueError('disk full')\n"
            "    return inner(x)\n"
            "obj.value_and_grad = vg")
    spec = write_plugin(tmp_path, hook=hook)
    cfg = RunConfig(objective=spec, workers=2, k=2, rounds=2000, stepsize_mult=2)
    async with running_master(MasterOptions(cfg)) as master:
        procs = [await spawn_worker(master.address, "--rank", str(r)) for r in range(2)]
        (code, err), = await finish(procs[1:], timeout=60)
        assert code == 2 and "raised ValueError: disk full" in err
        await eventually(lambda: master.coord.sessions[1].state == "left", what="rank 1 left")
        doc = master.status()
        assert "disk full" in doc["workers"][1]["last_error"]
        assert doc["state"] == "running"  # the run waits for a replacement; nothing else is lost
        x_before = master.coord.master.x.copy()
        await asyncio.sleep(0.5)
        np.testing.assert_array_equal(master.coord.master.x, x_before)
        procs[0].kill()
        await procs[0].wait()
