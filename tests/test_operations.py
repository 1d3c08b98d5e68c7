"""What an operator meets: workers that never come (--join-timeout), the status during healthy rounds, bans by
certificate under mutual TLS and a plainly named banned host without it, /healthz for probes under
--status-token, and a master that a scheduler restarts (--resume-if-exists, --linger)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest

from ef21.engine.config import RunConfig
from ef21.engine.simulate import simulate
from ef21_server import checkpoint
from ef21_server.coordinator import MasterOptions
from ef21_server.master import ListenOptions, Master
from ef21_server.security import ServerSecurity
from ef21_wire.protocol import TRAIN_METHOD

from .helpers import finish, http_get, spawn_worker
from .pki import make_pki, needs_openssl

PY = sys.executable
CFG = RunConfig(workers=2, method="ef21", k=2, stepsize_mult=64, x0="normal:0", rounds=40)


def cli(*args: str) -> list[str]:
    return [PY, "-m", "ef21", *args]


# -- workers that never come ------------------------------------------------------------------------------------


def test_join_timeout_fails_the_run_with_its_own_exit_status(tmp_path):
    from .test_reliability import free_port

    # The worker starts first and waits for its master (it retries until --connect-timeout), so that its own
    # start-up, seconds on a busy machine, does not race the master's 6 s: it joins within about a second of the
    # master's start, and the master then waits in vain for rank 1. (Started after the master, a worker that came
    # just as the master gave up found no master any more and retried for its whole --connect-timeout.)
    port = free_port()
    worker = subprocess.Popen([PY, "-m", "ef21_worker", "--master", f"127.0.0.1:{port}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    master = None
    try:
        assert worker.stdout.readline().startswith("ef21 worker: configuration")  # imported and trying
        master = subprocess.Popen(cli("master", "--port", str(port), "--status-port", "-1", "--workers", "2",
                                      "--rounds", "5", "--join-timeout", "6"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        out, err = master.communicate(timeout=60)
        worker.communicate(timeout=30)  # told the run is over: it leaves instead of waiting
    finally:
        for p in (master, worker):
            if p is not None and p.poll() is None:
                p.kill()
    assert worker.returncode == 0
    assert master.returncode == 4, err
    assert time.monotonic() - t0 < 30
    assert err.splitlines()[-1].startswith("ef21 master: error: 1 of 2 workers came within --join-timeout 6 s "
                                           "(no worker for rank(s) 1)")
    assert "Traceback" not in err


def test_join_timeout_of_a_resumed_run(tmp_path):
    """A resumed master whose workers never come back fails the same way."""
    ck = tmp_path / "ck.npz"
    r = subprocess.run(cli("run", "-q", "--workers", "2", "--k", "2", "--rounds", "20", "--checkpoint", str(ck)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(cli("master", "--port", "0", "--status-port", "-1", "--workers", "2", "--k", "2",
                           "--rounds", "60", "--resume", str(ck), "--join-timeout", "1"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 4, r.stderr
    assert r.stderr.strip().splitlines() == [
        "ef21 master: error: 0 of 2 workers came within --join-timeout 1 s (no worker for rank(s) 0, 1); are the "
        "workers started, and can they reach this master?"]


# -- the status during healthy rounds -----------------------------------------------------------------------------


async def test_status_detail_is_empty_during_healthy_rounds(tmp_path):
    """With --round-timeout, the detail used to claim a timeout and --min-workers while a round's Evals were
    still arriving (every round of a healthy run)."""
    details: list[str] = []
    opts = MasterOptions(RunConfig(**(CFG.to_dict() | {"rounds": 150})), round_timeout=30.0)
    master = Master(opts, ListenOptions(port=0, status_port=None, drain_s=1.0),
                    on_round=lambda rec: details.append(master.status()["detail"]))
    await master.start()
    try:
        results = await finish([await spawn_worker(master.address) for _ in range(2)])
        assert [c for c, _ in results] == [0, 0], results
    finally:
        await master.shutdown()
    assert len(details) == 151
    assert set(details) == {""}, sorted(set(details))


# -- bans -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA; a server certificate for 127.0.0.1; two client certificates, "honest" and "rogue"."""
    return make_pki(tmp_path_factory.mktemp("pki"), "ef21 ops CA", {"server": "server", "honest": "honest", "rogue": "rogue"})


async def send_garbage(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """One malformed message on a Train stream (what a broken or hostile client sends); the refusal's code."""
    call = channel.stream_stream(TRAIN_METHOD)()
    await call.write(b"\x0a\xff\xff\xff")
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
        return await call.code()
    except grpc.aio.AioRpcError as exc:
        return exc.code()


@needs_openssl
async def test_mutual_tls_bans_the_certificate_not_the_host(pki, tmp_path):
    sec = ServerSecurity(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    opts = MasterOptions(CFG, out=tmp_path / "x.npy", max_faults=3)
    master = Master(opts, ListenOptions(port=0, status_port=None, drain_s=1.0), security=sec)
    await master.start()
    creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(), (pki / "rogue.key").read_bytes(),
                                         (pki / "rogue.pem").read_bytes())
    try:
        async with grpc.aio.secure_channel(master.address, creds) as ch:
            for _ in range(3):
                assert await send_garbage(ch) == grpc.StatusCode.INVALID_ARGUMENT
            # Banned now: even a well-formed join from this certificate is refused.
            # Banned now: even a well-formed join with this certificate is refused.
            rogue = await spawn_worker(master.address, "--connect-timeout", "5", "--tls-ca", str(pki / "ca.pem"),
                                       "--tls-cert", str(pki / "rogue.pem"), "--tls-key", str(pki / "rogue.key"))
            (rogue_code, rogue_err), = await finish([rogue])
        # Honest workers on the same host (same address as the rogue) train as if nothing had happened.
        honest = ["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "honest.pem"), "--tls-key",
                  str(pki / "honest.key")]
        results = await finish([await spawn_worker(master.address, *honest) for _ in range(2)])
        assert [c for c, _ in results] == [0, 0], results
        assert rogue_code == 1 and "PERMISSION_DENIED" in rogue_err and "CN=rogue" in rogue_err, rogue_err
        bans = master.status()["bans"]
        assert [(b["identity"].split(" (")[0], b["faults"], b["banned"]) for b in bans] == \
            [("certificate CN=rogue", 3, True)]
    finally:
        await master.shutdown()
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), simulate(CFG).x)


async def test_without_client_certificates_a_banned_host_is_named_in_the_status_and_log(tmp_path, caplog):
    opts = MasterOptions(RunConfig(**(CFG.to_dict() | {"workers": 1})), max_faults=2)
    master = Master(opts, ListenOptions(port=0, status_port=0, drain_s=1.0))
    await master.start()
    try:
        async with grpc.aio.insecure_channel(master.address) as ch:
            for _ in range(2):
                assert await send_garbage(ch) == grpc.StatusCode.INVALID_ARGUMENT
        (code, err), = await finish([await spawn_worker(master.address, "--connect-timeout", "5")])
        assert code == 1 and "PERMISSION_DENIED" in err and "host ipv4:127.0.0.1" in err
        _, doc = await asyncio.to_thread(http_get, f"http://127.0.0.1:{master.http.port}/status")
    finally:
        await master.shutdown()
    assert doc["state"] == "waiting"
    assert ("rank(s) 0 wait for a worker while host ipv4:127.0.0.1 is banned (--max-faults 2) and 1 join(s) "
            "from it were refused") in doc["detail"], doc["detail"]
    assert doc["bans"][0]["identity"] == "host ipv4:127.0.0.1" and doc["bans"][0]["refused_joins"] == 1
    assert "refused a worker from banned host ipv4:127.0.0.1" in caplog.text
    assert "the run waits for rank(s) 0" in caplog.text


# -- probes -----------------------------------------------------------------------------------------------------


async def test_healthz_answers_probes_without_the_token_and_status_still_needs_it():
    sec = ServerSecurity(token="probe-test-token", status_token=True)
    master = Master(MasterOptions(CFG), ListenOptions(port=0, status_port=0, drain_s=1.0), security=sec)
    await master.start()
    try:
        base = f"http://127.0.0.1:{master.http.port}"
        code, doc = await asyncio.to_thread(http_get, f"{base}/healthz")
        assert (code, doc) == (200, {"ok": True, "state": "waiting"})
        code, doc = await asyncio.to_thread(http_get, f"{base}/status")
        assert code == 401 and "run_id" not in doc
    finally:
        await master.shutdown()


# -- a master that a scheduler restarts -------------------------------------------------------------------------


def _status(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as r:
            return json.loads(r.read())
    except OSError:
        return None


def test_resume_if_exists_after_a_killed_master_and_a_finished_run_is_not_run_again(tmp_path):
    """The same command line each time, as a pod's: first a fresh start, then (killed) a resume from the
    checkpoint, then (after the run finished) a master that reports it done and lingers without workers."""
    from .test_reliability import free_port

    port, status_port = free_port(), free_port()
    ck = tmp_path / "ck.npz"
    cmd = cli("master", "--port", str(port), "--status-port", str(status_port), "--workers", "3", "--k", "2",
              "--stepsize-mult", "64", "--x0", "normal:0", "--rounds", "300", "--checkpoint", str(ck),
              "--checkpoint-every", "25", "--resume-if-exists", "--out", str(tmp_path / "x.npy"), "--log",
              str(tmp_path / "l.jsonl"), "--linger")
    master = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = [subprocess.Popen([PY, "-m", "ef21_worker", "--master", f"127.0.0.1:{port}", "--delay", "0.003",
                                 "--connect-timeout", "60"], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    procs = [master, *workers]
    try:
        deadline = time.monotonic() + 60
        while not (ck.exists() and checkpoint.load_one(ck).meta["round"] >= 75):
            assert time.monotonic() < deadline, "no checkpoint at round 75"
            time.sleep(0.05)
        master.send_signal(signal.SIGKILL)
        master.wait(timeout=10)
        assert "resumed from" not in master.stdout.read()
        killed_at = checkpoint.load_one(ck).meta["round"]
        assert killed_at < 300

        resumed = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(resumed)
        assert f"resumed from {ck} (round {killed_at})" in resumed.stdout.readline()
        for w in workers:
            _, werr = w.communicate(timeout=60)
            assert w.returncode == 0, werr
        deadline = time.monotonic() + 30
        while (doc := _status(status_port)) is None or doc["state"] != "done":
            assert time.monotonic() < deadline, doc
            time.sleep(0.1)
        assert resumed.poll() is None  # --linger: still serving after the run ended
        resumed.send_signal(signal.SIGTERM)
        _, err = resumed.communicate(timeout=30)
        assert resumed.returncode == 0, err
        x = np.load(tmp_path / "x.npy")

        # Rescheduled once more after the end: nothing to run again and no worker to wait for.
        again = subprocess.Popen([*cmd, "--join-timeout", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        procs.append(again)
        time.sleep(2.5)  # longer than --join-timeout: it must not be waiting for workers
        deadline = time.monotonic() + 30
        while (doc := _status(status_port)) is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert doc["state"] == "done" and doc["detail"].startswith("the run had finished before this restart")
        again.send_signal(signal.SIGTERM)
        out, err = again.communicate(timeout=30)
        assert again.returncode == 0, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    sim = simulate(RunConfig(workers=3, method="ef21", k=2, stepsize_mult=64, x0="normal:0", rounds=300))
    np.testing.assert_array_equal(x, sim.x)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), sim.x)  # not overwritten by the third master
    log = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert [r["round"] for r in log] == list(range(301))


@pytest.mark.parametrize("linger", [False, True])
async def test_a_finished_run_resumed_writes_its_outputs_again(tmp_path, linger):
    """A user who lost the output resumes the finished run's checkpoint: --out comes back (x^T, bit for bit),
    the plot is drawn from the log, which stays as the run left it, the status says finished; with --linger the
    files are there while the master still serves."""
    from .test_reliability import free_port

    ck, log = tmp_path / "ck.npz", tmp_path / "l.jsonl"
    opts = MasterOptions(CFG, checkpoint=ck, out=tmp_path / "first.npy", log=log)
    master = Master(opts, ListenOptions(port=0, status_port=None, drain_s=1.0))
    await master.start()
    try:
        assert [c for c, _ in await finish([await spawn_worker(master.address) for _ in range(2)])] == [0, 0]
        await asyncio.wait_for(master.wait(), 10)
    finally:
        await master.shutdown()
    logged = log.read_bytes()
    status_port = free_port()
    out = tmp_path / "lost" / "x.npy"  # a folder that is not there yet, as after a clean-up
    cmd = cli("master", "--resume", str(ck), "--port", str(free_port()), "--status-port", str(status_port), "--out",
              str(out), "--log", str(log), "--plot", str(tmp_path / "run.png"), "--join-timeout", "1",
              *(["--linger"] if linger else []))
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if linger:
            deadline = time.monotonic() + 30
            while (doc := await asyncio.to_thread(_status, status_port)) is None or not out.exists():
                assert time.monotonic() < deadline and proc.returncode is None, doc
                await asyncio.sleep(0.1)
            assert doc["state"] == "done" and doc["stop_reason"] == "finished", doc
            proc.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0, stderr.decode()
    assert "run done: the run had finished before this restart (40 rounds done)" in stdout.decode()
    np.testing.assert_array_equal(np.load(out), np.load(tmp_path / "first.npy"))
    np.testing.assert_array_equal(np.load(out), simulate(CFG).x)
    assert log.read_bytes() == logged and (tmp_path / "run.png").stat().st_size > 0
