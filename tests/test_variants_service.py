"""EF21's extensions and the stochastic estimators through the real service (``ef21 run``): equal to the
simulator bit for bit, variant by variant; and their bad flags, one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ef21.engine.config import RunConfig
from ef21.engine.simulate import simulate

PY = sys.executable


# -- the service equals the simulator, variant by variant ------------------------------------------------------

VARIANTS = {
    "bc": ["--downlink-k", "6"],
    "pp": ["--participation", "2"],
    "hb": ["--momentum", "0.6"],
    "prox": ["--prox", "l1:0.01"],
    "w": ["--weights", "smoothness"],
    "sgd": ["--estimator", "sgd", "--batch-size", "40"],
    "page": ["--estimator", "page", "--batch-fraction", "0.05"],
    "sgdm": ["--estimator", "sgdm", "--batch-size", "25", "--sgdm-eta", "0.3"],
    "bc-pp-sgd": ["--downlink-k", "6", "--participation", "0.5", "--estimator", "sgd", "--batch-size", "40"],
    "hb-pp": ["--momentum", "0.5", "--participation", "3"],
}


def config_of(args: list[str]) -> RunConfig:
    from ef21.__main__ import build_parser
    from ef21.cli.args import config_from_args

    return config_from_args(build_parser().parse_args(["simulate", *args]))


FAST_VARIANTS = ("bc", "pp", "page", "bc-pp-sgd")


@pytest.mark.parametrize("variant", [v if v in FAST_VARIANTS else pytest.param(v, marks=pytest.mark.slow)
                                     for v in VARIANTS])
def test_service_equals_simulator(tmp_path, variant):
    args = ["--workers", "3", "--k", "2", "--stepsize-mult", "16", "--rounds", "120", "--x0", "normal:0",
            *VARIANTS[variant]]
    log, its = tmp_path / "l.jsonl", tmp_path / "xs.npy"
    r = subprocess.run([PY, "-m", "ef21", "run", *args, "--log", str(log), "--save-iterates", str(its), "-q",
                        "--status-port", "-1", "--checksum-every", "7"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    sim = simulate(config_of(args), keep_iterates=True)
    np.testing.assert_array_equal(np.load(its), np.array(sim.xs))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    for row, rec in zip(rows, sim.records, strict=True):
        assert (row["f"], row["grad_norm_sq"], row["G"], row["grad_map_norm_sq"]) == \
            (rec.f, rec.grad_norm_sq, rec.G, rec.grad_map_norm_sq)
        assert (row["bits_per_worker"], row["bits_down_per_worker"], row["missing"]) == \
            (rec.bits_per_worker, rec.bits_down_per_worker, rec.missing)


# -- bad flags -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,match", [
    (["--downlink-k", "0"], "--downlink-k must be positive"),
    (["--downlink-k", "113"], "--downlink-k must satisfy 0 < K <= d = 112"),
    (["--participation", "0"], "--participation"),
    (["--participation", "1.5"], "fraction must lie in (0, 1]"),
    (["--participation", "21"], "count must lie in 1..20"),
    (["--participation", "half"], "a fraction in (0, 1] or a count"),
    (["--momentum", "1"], "--momentum must lie in [0, 1)"),
    (["--momentum", "-0.1"], "--momentum must lie in [0, 1)"),
    (["--prox", "l2:1"], "unknown --prox 'l2'"),
    (["--prox", "box:1:0"], "malformed"),
    (["--prox", "l1:x"], "must be numbers"),
    (["--prox", "l1:0.1", "--method", "ef"], "--prox is an option of the gd and ef21 methods, not ef"),
    (["--downlink-k", "4", "--method", "gd"], "--downlink-k is an option of the ef21 method, not gd"),
    (["--downlink-k", "4", "--momentum", "0.5"], "EF21 with BC + HB is not covered by the theory"),
    (["--prox", "l1:0.1", "--participation", "0.5"], "not covered by the theory"),
    (["--estimator", "sgd"], "--estimator sgd needs --batch-size B or --batch-fraction F"),
    (["--estimator", "sgd", "--batch-size", "0"], "--batch-size must be positive"),
    (["--estimator", "sgd", "--batch-size", "407"], "--batch-size 407 is larger than rank 0's shard (406 rows)"),
    (["--estimator", "page", "--batch-size", "5", "--method", "ef21plus"], "--estimator page works with"),
    (["--estimator", "sgd", "--batch-size", "5", "--momentum", "0.5"], "is not covered by the theory"),
    (["--mu", "0.1", "--downlink-k", "3"], "--mu (the PL stepsize of Theorem 3) is derived for plain EF21"),
    (["--weights", "smoothness", "--downlink-k", "3"], "not covered by the theory"),
])
def test_bad_extension_flags_are_one_line_exit_2(args, match):
    # `run` and `master` validate the same RunConfig before anything starts (see test_run_refuses_... below).
    r = subprocess.run([PY, "-m", "ef21", "simulate", "--workers", "20", "--rounds", "3", *args],
                       capture_output=True, text=True, timeout=60)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and match in lines[0], r.stderr


@pytest.mark.parametrize("command", ["run", "master"])
def test_run_and_master_refuse_bad_extension_flags_before_starting(command):
    for args, match in [(["--participation", "21"], "count must lie in 1..20"),
                        (["--estimator", "sgd", "--batch-size", "407"], "larger than rank 0's shard"),
                        (["--downlink-k", "4", "--momentum", "0.5"], "not covered by the theory")]:
        r = subprocess.run([PY, "-m", "ef21", command, "--workers", "20", "--rounds", "3", "--port", "0",
                            "--status-port", "-1", *args], capture_output=True, text=True, timeout=60)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and match in lines[0], r.stderr


async def test_a_replaced_sgd_worker_continues_the_same_minibatch_stream(tmp_path):
    """Minibatches are keyed by (seed, rank, round): a worker killed mid-run and replaced (the run waits for its
    rank) draws the batches the dead one would have drawn, so the run is the simulator's bit for bit."""
    import asyncio
    import signal

    from ef21_server.coordinator import MasterOptions

    from .helpers import eventually, finish, running_master, spawn_worker

    cfg = RunConfig(workers=3, k=2, stepsize_mult=16, rounds=150, x0="normal:0", estimator="sgd", batch_size=30)
    opts = MasterOptions(cfg, save_iterates=tmp_path / "xs.npy")
    async with running_master(opts) as master:
        procs = [await spawn_worker(master.address, "--rank", str(r), "--delay", "0.002") for r in range(3)]
        await eventually(lambda: master.coord.round >= 40, what="round 40")
        procs[1].send_signal(signal.SIGKILL)
        await eventually(lambda: master.coord.sessions[1].state == "lost", what="rank 1 lost")
        procs[1] = await spawn_worker(master.address, "--rank", "1")
        results = await finish(procs, timeout=120)
        assert [c for c, _ in results[:1] + results[2:]] == [0, 0] and results[1][0] == 0, results
        await asyncio.wait_for(master.wait(), 10)
    np.testing.assert_array_equal(np.load(tmp_path / "xs.npy"), np.array(simulate(cfg, keep_iterates=True).xs))
