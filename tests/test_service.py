"""The networked service with real worker processes over real sockets, checked against the simulator."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys

import numpy as np
import pytest

from ef21.engine.config import RunConfig
from ef21.engine.simulate import simulate
from ef21_server.coordinator import MasterOptions

from .helpers import eventually, finish, http_get, running_master, spawn_worker

PY = sys.executable


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "ef21", *args], capture_output=True, text=True, timeout=timeout)


def assert_same_as_simulation(cfg: RunConfig, iterates: np.ndarray, log_rows: list[dict]) -> None:
    sim = simulate(cfg, keep_iterates=True)
    xs = np.array(sim.xs)
    assert iterates.shape == xs.shape
    # Bit-identical is the aim: same code, same summation order, same γ.
    np.testing.assert_array_equal(iterates, xs)
    assert len(log_rows) == len(sim.records)
    for row, rec in zip(log_rows, sim.records):
        assert row["round"] == rec.round
        assert row["f"] == rec.f and row["grad_norm_sq"] == rec.grad_norm_sq and row["G"] == rec.G
        assert row["bits_per_worker"] == rec.bits_per_worker
        assert row["g_norm_sq"] == rec.g_norm_sq


CASES = {
    "mushrooms": dict(data="mushrooms", problem="logreg", x0="normal:0"),
    "lsq": dict(data="synthetic:400:30:3", problem="lsq", x0="normal:1"),
}
METHOD_ARGS = {
    "gd": dict(stepsize_mult=1.0),
    "dcgd": dict(compressor="topk", k=20, stepsize_mult=0.5),
    "ef": dict(compressor="topk", k=2, stepsize_mult=16),
    "ef21": dict(compressor="topk", k=2, stepsize_mult=64),
    "ef21plus": dict(compressor="topk", k=2, stepsize_mult=64),
}


def cli_args(cfg: RunConfig) -> list[str]:
    out = ["--data", cfg.data, "--problem", cfg.problem, "--workers", str(cfg.workers), "--method", cfg.method,
           "--compressor", cfg.compressor, "--k", str(cfg.k), "--stepsize-mult", str(cfg.stepsize_mult),
           "--rounds", str(cfg.rounds), "--x0", cfg.x0, "--encoding", cfg.encoding]
    return out


def check_run_matches_simulate(tmp_path, case: str, method: str, rounds: int, encoding: str = "plain",
                               extra: tuple[str, ...] = ()) -> None:
    cfg = RunConfig(workers=4, method=method, rounds=rounds, encoding=encoding, **CASES[case], **METHOD_ARGS[method])
    log, xs = tmp_path / f"{case}-{method}.jsonl", tmp_path / f"{case}-{method}.npy"
    r = run_cli("run", *cli_args(cfg), "--log", str(log), "--save-iterates", str(xs), "--quiet", *extra)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert_same_as_simulation(cfg, np.load(xs), rows)


@pytest.mark.parametrize("case", ["mushrooms", "lsq"])
def test_ef21_run_equals_simulate(tmp_path, case):
    check_run_matches_simulate(tmp_path, case, "ef21", 500)


def test_compact_encoding_run_equals_simulate(tmp_path):
    """float32 values and Elias–Fano indices through the real service give the simulator's iterates exactly."""
    check_run_matches_simulate(tmp_path, "mushrooms", "ef21", 300, encoding="compact")


def test_uvloop_run_equals_simulate(tmp_path):
    """--event-loop uvloop (master and the workers `ef21 run` starts) changes nothing in the numbers."""
    pytest.importorskip("uvloop", reason="uvloop is the optional [fast] extra")
    check_run_matches_simulate(tmp_path, "lsq", "ef21", 200, extra=("--event-loop", "uvloop"))


def test_uvloop_missing_is_a_clear_error():
    r = subprocess.run([PY, "-c", "import sys; sys.modules['uvloop'] = None; from ef21.__main__ import main; "
                        "sys.exit(main(['worker', '--master', '127.0.0.1:1', '--event-loop', 'uvloop']))"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "pip install 'ef21[fast]'" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mushrooms", "lsq"])
@pytest.mark.parametrize("method", ["gd", "dcgd", "ef", "ef21plus"])
def test_every_method_run_equals_simulate(tmp_path, case, method):
    check_run_matches_simulate(tmp_path, case, method, 500)


async def test_random_join_and_arrival_order_give_the_same_result(tmp_path):
    cfg = RunConfig(workers=4, method="ef21", compressor="topk", k=3, stepsize_mult=64, rounds=60, x0="normal:0")
    opts = MasterOptions(cfg, log=tmp_path / "l.jsonl", save_iterates=tmp_path / "xs.npy")
    async with running_master(opts) as master:
        procs = []
        for _ in range(4):  # no rank asked for: ranks go by join order, which the random sleeps shuffle
            await asyncio.sleep(random.uniform(0, 0.3))
            procs.append(await spawn_worker(master.address, "--delay", "0.01"))
        results = await finish(procs)
        assert [code for code, _ in results] == [0] * 4, results
        await asyncio.wait_for(master.wait(), 10)
    rows = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert_same_as_simulation(cfg, np.load(tmp_path / "xs.npy"), rows)


async def test_uplink_wire_bytes_are_measured_near_payload(tmp_path):
    k = 10
    cfg = RunConfig(workers=2, method="ef21", compressor="topk", k=k, stepsize_mult=16, rounds=20)
    opts = MasterOptions(cfg, log=tmp_path / "l.jsonl", eval_every=5)
    async with running_master(opts) as master:
        results = await finish([await spawn_worker(master.address) for _ in range(2)])
        assert all(code == 0 for code, _ in results), results
        await asyncio.wait_for(master.wait(), 10)
        doc = master.status()
    rows = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    # The status's two byte figures, with one unit: the round traffic and evaluations of the run (the dashboard's
    # header), and each worker's whole stream (its table), which adds the hand-shake, the set-up and the Start.
    lat, workers = doc["latest"], doc["workers"]
    assert (lat["wire_bytes_up"], lat["eval_bytes"]) == (rows[-1]["wire_bytes_up"], rows[-1]["eval_bytes"])
    handshake_up = sum(w["bytes_up"] for w in workers) - lat["wire_bytes_up"] - lat["eval_bytes"]
    handshake_down = sum(w["bytes_down"] for w in workers) - lat["wire_bytes_down"]
    # Hello and Setup (with the shard's 112×112 Gram) up; Welcome, Start and Stop down. The Start carries neither x
    # (each worker computed x⁰ itself and sent its digest) nor g (zero at round 0): less than one vector of d.
    assert 2 * 8 * 112 * 112 < handshake_up < 2 * (8 * 112 * 112 + 4096)
    assert 0 < handshake_down < 2 * 8 * 112
    for row in rows[1:]:  # round 0 sends the dense g_i^0
        # k entries of 4 + 8 bytes, plus the message's own fields (round, f, distortion, tags): < 64 bytes
        assert 12 * k <= row["uplink_msg_bytes"] <= 12 * k + 64
    assert rows[1]["grad_norm_sq"] is None and rows[5]["grad_norm_sq"] is not None  # --eval-every 5
    assert rows[-1]["grad_norm_sq"] is not None  # the last round is always evaluated
    # Evaluations at rounds 0, 5, 10, 15, 20: 5 × 2 workers × 112 float64, counted apart from the compressed traffic
    assert rows[-1]["eval_bytes"] >= 5 * 2 * 8 * 112
    up = [b["wire_bytes_up"] - a["wire_bytes_up"] for a, b in zip(rows[1:], rows[2:])]
    assert all(12 * k * 2 <= u <= (12 * k + 64) * 2 for u in up)
    down = [b["wire_bytes_down"] - a["wire_bytes_down"] for a, b in zip(rows[1:], rows[2:])]
    # The downlink is sparse too: at most 2k distinct indices a round, far below d = 112 values.
    assert all(d <= 2 * (12 * 2 * k + 80) for d in down)


STATUS_KEYS = {
    "state": str, "round": int, "rounds_planned": int, "method": str, "compressor": str, "k": int,
    "workers_expected": int, "workers_connected": int, "workers": list, "elapsed_s": float,
}
WORKER_KEYS = {"rank": int, "address": str, "state": str, "last_seen": float, "rounds_done": int, "bytes_up": int,
               "bytes_down": int}


def check_status_schema(doc: dict) -> None:
    for key, typ in STATUS_KEYS.items():
        assert isinstance(doc[key], typ), (key, doc[key])
    assert doc["state"] in ("waiting", "running", "done", "failed", "stopped")
    for key in ("rounds_per_second", "gamma", "latest"):
        assert key in doc
    for w in doc["workers"]:
        for key, typ in WORKER_KEYS.items():
            assert isinstance(w[key], typ), (key, w)


async def test_status_endpoint_and_ef21_status_during_a_live_run(tmp_path):
    cfg = RunConfig(workers=2, method="ef21", k=2, stepsize_mult=64, rounds=400)
    async with running_master(MasterOptions(cfg)) as master:
        url = f"http://127.0.0.1:{master.http.port}"
        code, doc = await asyncio.to_thread(http_get, url + "/status")
        assert code == 200 and doc["state"] == "waiting" and doc["workers_connected"] == 0
        check_status_schema(doc)
        procs = [await spawn_worker(master.address, "--delay", "0.005") for _ in range(2)]
        await eventually(lambda: master.coord.round >= 5, what="rounds to start")
        code, doc = await asyncio.to_thread(http_get, url + "/status")
        assert code == 200 and doc["state"] == "running"
        check_status_schema(doc)
        assert doc["workers_connected"] == 2 and doc["latest"]["f"] > 0 and doc["gamma"] > 0
        assert {w["rank"] for w in doc["workers"]} == {0, 1}
        assert all(w["bytes_up"] > 0 and w["bytes_down"] > 0 for w in doc["workers"])
        code, health = await asyncio.to_thread(http_get, url + "/healthz")
        assert code == 200 and health["ok"] is True
        assert (await asyncio.to_thread(http_get, url + "/nope"))[0] == 404
        human = await asyncio.to_thread(run_cli, "status", "--master", master.address)
        assert human.returncode == 0 and "running" in human.stdout and "rank   0" in human.stdout
        raw = await asyncio.to_thread(run_cli, "status", "--master", master.address, "--json")
        check_status_schema(json.loads(raw.stdout))
        await finish(procs)
        await asyncio.wait_for(master.wait(), 10)
        assert master.status()["state"] == "done"


def test_status_against_no_master_is_a_clear_error():
    r = run_cli("status", "--master", "127.0.0.1:1", "--timeout", "1")
    assert r.returncode == 2 and "cannot get the status" in r.stderr and "Traceback" not in r.stderr


async def test_worker_with_other_data_is_refused(tmp_path):
    cfg = RunConfig(workers=2, rounds=5)
    other = tmp_path / "other.svm"
    other.write_text("1 1:1 2:1\n-1 2:1\n1 3:2\n")
    async with running_master(MasterOptions(cfg)) as master:
        bad = await spawn_worker(master.address, "--data", str(other))
        (code, err), = await finish([bad])
        assert code == 1 and "data mismatch" in err and "fingerprint" in err
        assert master.coord.sessions == {}  # the rank it held is free again


async def test_workers_started_before_the_master_connect_with_backoff(tmp_path):
    import socket

    with socket.socket() as s:  # find a free port, then start the master on it a little later
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [await spawn_worker(f"127.0.0.1:{port}", "--connect-timeout", "30") for _ in range(2)]
    await asyncio.sleep(1.5)
    from ef21_server.master import ListenOptions, Master

    master = Master(MasterOptions(RunConfig(workers=2, rounds=10)), ListenOptions(port=port, status_port=None))
    await master.start()
    try:
        results = await finish(procs)
        assert [c for c, _ in results] == [0, 0], results
        await asyncio.wait_for(master.wait(), 10)
        assert master.coord.state == "done"
    finally:
        await master.shutdown()


def test_generated_protobuf_code_is_up_to_date():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    r = subprocess.run(["bash", str(root / "scripts" / "gen_proto.sh"), "--check"], capture_output=True, text=True,
                       env={"PYTHON": PY, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr


def test_ef21_run_stops_cleanly_on_ctrl_c(tmp_path):
    import re
    import signal
    import time

    proc = subprocess.Popen([PY, "-m", "ef21", "run", "--workers", "3", "--rounds", "1000000", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"status: (http://\S+)", line).group(1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            code, doc = http_get(url)
            if doc["state"] == "running" and doc["round"] > 3:
                break
            time.sleep(0.1)
        assert doc["state"] == "running"
        master_addr = re.search(r"master (\S+),", line).group(1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
    left = subprocess.run(["pgrep", "-f", f"ef21_worker --master {master_addr}"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "worker processes outlived ef21 run"
