"""Faults with real processes: killed workers and masters, stragglers, checkpoints, graceful stops."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from ef21.engine.config import RunConfig
from ef21.engine.simulate import simulate
from ef21.errors import UserError
from ef21_server import checkpoint
from ef21_server.coordinator import Coordinator, MasterOptions

from .helpers import eventually, finish, running_master, spawn_worker

PY = sys.executable


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_killed_worker_is_replaced_and_the_run_still_converges(tmp_path):
    # How long rank 2 stays stale depends on how fast the machine starts the replacement. At 128x the run recovers
    # from 100 to 1500 stale rounds in 1,200-2,100 rounds (simulated with the same pattern); at 256x a long stretch
    # can cost 10,000. tol is what ends the run.
    cfg = RunConfig(workers=4, method="ef21", compressor="topk", k=2, stepsize_mult=128, x0="normal:0",
                    rounds=10000, tol=1e-7)
    opts = MasterOptions(cfg, log=tmp_path / "l.jsonl", round_timeout=5.0)
    async with running_master(opts) as master:
        procs = [await spawn_worker(master.address, "--rank", str(r), "--delay", "0.002") for r in range(4)]
        await eventually(lambda: master.coord.round >= 50, what="round 50")
        procs[2].send_signal(signal.SIGKILL)
        await eventually(lambda: master.coord.sessions[2].state == "lost", what="rank 2 marked lost")
        lost_at = master.coord.round
        # With a round timeout the run goes on without rank 2 (its g_i stays, EF21-PP) ...
        await eventually(lambda: master.coord.round >= lost_at + 20, what="rounds without rank 2")
        doc = master.status()
        assert doc["workers"][2]["state"] == "lost" and "2" in doc["stale_ranks"]
        assert "not stationary" in doc["detail"]
        # ... and a new process takes the free rank over, from the master's copy of its g_i.
        procs[2] = await spawn_worker(master.address, "--rank", "2")
        results = await finish(procs, timeout=120)
        assert [code for code, _ in results[:2] + results[3:]] == [0, 0, 0]
        assert results[2][0] == 0, results[2][1]
        await asyncio.wait_for(master.wait(), 10)
    log = rows(tmp_path / "l.jsonl")
    assert master.coord.stop_reason == "tol"
    assert log[-1]["grad_norm_sq"] < 1e-7 and log[-1]["missing"] is None
    skipped = [r["round"] for r in log if r["missing"]]
    assert skipped and all(r["missing"] == [2] for r in log if r["missing"])
    assert master.coord.sessions[2].state == "finished"


async def test_min_workers_makes_the_master_wait(tmp_path):
    cfg = RunConfig(workers=3, method="ef21", k=2, stepsize_mult=64, rounds=200)
    opts = MasterOptions(cfg, round_timeout=0.2, min_workers=3)
    async with running_master(opts) as master:
        procs = [await spawn_worker(master.address, "--rank", str(r), "--delay", "0.002") for r in range(3)]
        await eventually(lambda: master.coord.round >= 10, what="round 10")
        procs[1].send_signal(signal.SIGKILL)
        await eventually(lambda: master.coord.sessions[1].state == "lost", what="rank 1 lost")
        await asyncio.sleep(1.0)
        stuck = master.coord.round
        await asyncio.sleep(0.5)
        assert master.coord.round == stuck  # below --min-workers nothing advances ...
        assert "--min-workers" in master.status()["detail"]  # ... and the status says why
        procs[1] = await spawn_worker(master.address, "--rank", "1")
        results = await finish(procs, timeout=60)
        assert all(code == 0 for code, _ in results[:1] + results[2:])
        await asyncio.wait_for(master.wait(), 10)
    assert master.coord.state == "done"


async def test_straggler_with_round_timeout_equals_ef21_pp_simulation(tmp_path):
    cfg = RunConfig(workers=3, method="ef21", compressor="topk", k=3, stepsize_mult=64, x0="normal:0", rounds=80)
    opts = MasterOptions(cfg, log=tmp_path / "l.jsonl", save_iterates=tmp_path / "xs.npy", round_timeout=0.05)
    async with running_master(opts) as master:
        procs = [await spawn_worker(master.address, "--rank", "0"),
                 await spawn_worker(master.address, "--rank", "1", "--delay", "0.12"),
                 await spawn_worker(master.address, "--rank", "2")]
        results = await finish(procs, timeout=120)
        assert all(code == 0 for code, _ in results), results
        await asyncio.wait_for(master.wait(), 10)
        status = master.status()
    log = rows(tmp_path / "l.jsonl")
    pattern = {r["round"]: r["missing"] for r in log if r["missing"]}
    assert pattern and all(m == [1] for m in pattern.values())  # the slow worker, and only it, was left out
    assert status["workers"][1]["late_messages"] > 0
    sim = simulate(cfg, keep_iterates=True, missing=pattern)
    np.testing.assert_array_equal(np.load(tmp_path / "xs.npy"), np.array(sim.xs))


def master_cmd(port: int, tmp_path, *extra: str) -> list[str]:
    return [PY, "-m", "ef21", "master", "--port", str(port), "--status-port", "-1", "--workers", "3",
            "--method", "ef21", "--k", "2", "--stepsize-mult", "64", "--x0", "normal:0", "--rounds", "300",
            "--checkpoint", str(tmp_path / "ck.npz"), "--checkpoint-every", "25", "--out", str(tmp_path / "x.npy"),
            "--log", str(tmp_path / "l.jsonl"), *extra]


def test_master_killed_and_resumed_ends_with_the_same_x(tmp_path):
    port = free_port()
    master = subprocess.Popen(master_cmd(port, tmp_path), stderr=subprocess.PIPE, text=True)
    workers = [subprocess.Popen([PY, "-m", "ef21_worker", "--master", f"127.0.0.1:{port}", "--delay", "0.003",
                                 "--connect-timeout", "60"], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        ck = tmp_path / "ck.npz"
        import time
        deadline = time.monotonic() + 120  # ~5 s idle; a busy CI machine can take many times that to start 4 processes
        while time.monotonic() < deadline and master.poll() is None:
            if ck.exists() and checkpoint.load_one(ck).meta["round"] >= 75:
                break
            time.sleep(0.05)
        assert master.poll() is None, master.communicate()[1]  # a master that died says why
        master.send_signal(signal.SIGKILL)
        master.wait(timeout=10)
        saved = checkpoint.load_one(ck).meta
        killed_at = saved["round"]
        assert 75 <= killed_at < 300
        # The log as the checkpoint left it: rounds 0..killed_at − 1, which the resumed run must not rewrite.
        logged = (tmp_path / "l.jsonl").read_bytes()[: saved["log_offset"]]
        assert logged.count(b"\n") == killed_at
        resumed = subprocess.Popen(master_cmd(port, tmp_path, "--resume", str(ck), "-v"), stderr=subprocess.PIPE,
                                   text=True)
        _, err = resumed.communicate(timeout=120)
        assert resumed.returncode == 0, err
        # It started from the checkpoint's round (a resume from round 0 would end with the same x, too).
        assert re.search(rf"resumed run \w+ at round {killed_at} from ", err), err
        for w in workers:
            _, werr = w.communicate(timeout=30)
            assert w.returncode == 0, werr
    finally:
        for p in [master, *workers]:
            if p.poll() is None:
                p.kill()
    cfg = RunConfig(workers=3, method="ef21", k=2, stepsize_mult=64, x0="normal:0", rounds=300)
    sim = simulate(cfg)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), sim.x)
    log = rows(tmp_path / "l.jsonl")
    assert [r["round"] for r in log] == list(range(301))  # the log continues where the checkpoint left it
    assert (tmp_path / "l.jsonl").read_bytes().startswith(logged)  # elapsed_s differ in a rerun: byte for byte
    assert log[-1]["f"] == sim.records[-1].f


def test_sigterm_on_the_master_checkpoints_and_stops_the_workers(tmp_path):
    port = free_port()
    master = subprocess.Popen(master_cmd(port, tmp_path), stderr=subprocess.PIPE, text=True)
    workers = [subprocess.Popen([PY, "-m", "ef21_worker", "--master", f"127.0.0.1:{port}", "--delay", "0.01"],
                                stderr=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        import time
        deadline = time.monotonic() + 60
        while not (tmp_path / "l.jsonl").exists() or len(rows(tmp_path / "l.jsonl")) < 30:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        master.send_signal(signal.SIGTERM)
        _, err = master.communicate(timeout=30)
        assert master.returncode == 0, err
        for w in workers:
            w.communicate(timeout=30)
            assert w.returncode == 0
    finally:
        for p in [master, *workers]:
            if p.poll() is None:
                p.kill()
    ck = checkpoint.load_one(tmp_path / "ck.npz")
    assert 30 <= ck.meta["round"] < 300


def test_corrupt_checkpoint_is_refused_and_the_previous_one_used(tmp_path):
    cfg = RunConfig(workers=2, rounds=10)
    path = tmp_path / "ck.npz"
    meta = {"config": cfg.to_dict(), "run_id": "abc", "round": 4, "reference": ["fp", 112, 8124],
            "constants": simulate(RunConfig(workers=2, rounds=0)).constants.__dict__,
            "ledger": {"paper_total": 0, "payload_total": 0}, "wire": [0, 0, 0], "log_offset": None}
    checkpoint.save(path, checkpoint.Checkpoint(meta, np.zeros(112), np.zeros(112), np.zeros((2, 112))))
    checkpoint.save(path, checkpoint.Checkpoint(meta | {"round": 8}, np.ones(112), np.zeros(112),
                                                np.zeros((2, 112))))
    assert checkpoint.load_one(path).meta["round"] == 8
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="ck.npz"):
        checkpoint.load_one(path)
    ckpt, used, warning = checkpoint.load_latest(path)
    assert used.name == "ck.npz.prev" and ckpt.meta["round"] == 4 and "previous checkpoint" in warning
    checkpoint.previous_path(path).write_bytes(b"garbage")
    with pytest.raises(UserError, match="the previous one is bad too"):
        checkpoint.load_latest(path)
    (tmp_path / "lonely.npz").write_bytes(b"PK\x03\x04 broken")
    r = subprocess.run([PY, "-m", "ef21", "master", "--workers", "2", "--rounds", "10", "--status-port", "-1",
                        "--port", "0", "--resume", str(tmp_path / "lonely.npz")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "no previous checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_a_checkpoint_is_at_its_path_at_every_moment(tmp_path):
    """While the master writes checkpoint after checkpoint, another process that looks at PATH always finds one
    (the old one is hard-linked to PATH.prev, then the new one renamed over PATH): a backup job, or a test waiting
    for round 75, never sees it missing between the two renames."""
    path = tmp_path / "ck.npz"
    meta = {"config": RunConfig(workers=2, rounds=10).to_dict(), "run_id": "abc", "round": 0}
    checkpoint.save(path, checkpoint.Checkpoint(meta, np.zeros(112), np.zeros(112), None))
    watcher = subprocess.Popen([PY, "-c", "import os, sys\nmissing = looks = 0\nwhile not os.path.exists(sys.argv[2]):\n"
                                "    looks += 1\n    missing += not os.path.exists(sys.argv[1])\nprint(looks, missing)",
                                str(path), str(tmp_path / "done")], stdout=subprocess.PIPE, text=True)
    for r in range(1, 400):
        checkpoint.save(path, checkpoint.Checkpoint(meta | {"round": r}, np.full(112, r), np.zeros(112), None))
    (tmp_path / "done").touch()
    looks, missing = (int(v) for v in watcher.communicate(timeout=30)[0].split())
    assert looks > 1000 and missing == 0, (looks, missing)
    assert checkpoint.load_one(path).meta["round"] == 399
    assert checkpoint.load_one(checkpoint.previous_path(path)).meta["round"] == 398
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_checkpoint_of_another_run_is_refused(tmp_path):
    path = tmp_path / "ck.npz"
    cfg = RunConfig(workers=2, rounds=10, k=3)
    meta = {"config": cfg.to_dict(), "run_id": "abc", "round": 4, "reference": ["fp", 112, 8124],
            "constants": simulate(RunConfig(workers=2, rounds=0)).constants.__dict__,
            "ledger": {"paper_total": 0, "payload_total": 0}, "wire": [0, 0, 0], "log_offset": None}
    checkpoint.save(path, checkpoint.Checkpoint(meta, np.zeros(112), np.zeros(112), np.zeros((2, 112))))
    with pytest.raises(UserError, match="different run: k differ"):
        Coordinator(MasterOptions(RunConfig(workers=2, rounds=10, k=2), resume=path))
    # The stopping rule may change.
    c = Coordinator(MasterOptions(RunConfig(workers=2, rounds=50, k=3), resume=path))
    assert c.round == 4 and c.state == "running"


def test_ef21_run_restarts_a_worker_that_dies(tmp_path):
    proc = subprocess.Popen([PY, "-m", "ef21", "run", "--workers", "3", "--k", "2", "--stepsize-mult", "64",
                             "--rounds", "400", "--x0", "normal:0", "--out", str(tmp_path / "x.npy"), "-q",
                             "--status-port", "-1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import re
        import time
        line = proc.stdout.readline()
        addr = re.search(r"master (\S+),", line).group(1)
        deadline = time.monotonic() + 30
        pid = None
        while pid is None and time.monotonic() < deadline:
            out = subprocess.run(["pgrep", "-f", f"ef21_worker --master {addr} --rank 1"], capture_output=True,
                                 text=True).stdout.split()
            pid = int(out[0]) if out else None
            time.sleep(0.2)
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "worker-1 exited with status -9; restarting it (1/3)" in err
    cfg = RunConfig(workers=3, k=2, stepsize_mult=64, rounds=400, x0="normal:0")
    # The replacement continued from the master's copy of g_1: the run is the same as without the fault.
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), simulate(cfg).x)


def test_summary_line_of_a_run_whose_last_round_left_workers_out(capsys):
    from types import SimpleNamespace

    from ef21.engine.accounting import CommLedger
    from ef21.engine.records import make_record
    from ef21_server.cli import print_summary

    rec = make_record(7, None, None, None, CommLedger(3), 1.0, wire_bytes_up=10, wire_bytes_down=20, missing=[1])
    coord = SimpleNamespace(latest=rec, last_grad_norm_sq=None, stop_message="7 rounds done", state="done")
    print_summary(SimpleNamespace(coord=coord))
    out = capsys.readouterr().out
    assert "round 7: f=- |grad f|^2=- G=-" in out and "7 rounds done" in out


def test_extending_a_finished_run_logs_and_counts_each_round_once(tmp_path):
    """A run that ended at its --rounds, resumed with more: the final round (whose downlink was never sent) is
    redone once — one log line per round, bits 32·k a round — and the result is the longer run's, bit for bit."""
    ck, log, out = tmp_path / "ck.npz", tmp_path / "l.jsonl", tmp_path / "x.npy"
    common = ["--workers", "3", "--k", "2", "--stepsize-mult", "64", "--x0", "normal:0", "-q", "--status-port", "-1",
              "--checkpoint", str(ck), "--log", str(log), "--out", str(out)]
    first = subprocess.run([PY, "-m", "ef21", "run", *common, "--rounds", "40"], capture_output=True, text=True,
                           timeout=120)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([PY, "-m", "ef21", "run", *common, "--rounds", "70", "--resume", str(ck)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    lines = rows(log)
    assert [r["round"] for r in lines] == list(range(71))
    assert [r["bits_per_worker"] for r in lines] == [32 * 2 * t for t in range(71)]
    sim = simulate(RunConfig(workers=3, k=2, stepsize_mult=64, x0="normal:0", rounds=70))
    np.testing.assert_array_equal(np.load(out), sim.x)
