"""Bad input through the real command lines: for every case, exit status 2, exactly one line on stderr that
names the cause (no traceback, no gRPC core log), and nothing left running afterwards.

Each command runs as a real process with a marker in its environment; after it exits, no process on the machine
may still carry that marker (workers of ``ef21 run`` inherit the environment, so they would show up).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

MARK = "EF21_BAD_INPUT_TEST"
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Bad files of every kind, in one folder the commands run in."""
    d = tmp_path_factory.mktemp("bad")
    (d / "garbage.txt").write_text("this is not\nLIBSVM data\n")
    np.save(d / "x3.npy", np.zeros(3))  # mushrooms has d = 112
    np.save(d / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (d / "notpem.pem").write_text("not a certificate\n")
    (d / "tokdir").mkdir()  # a token "file" that cannot be read (root reads any mode, so not chmod 000)
    (d / "empty-token").write_text("\n")
    if shutil.which("openssl") is not None:  # a real CA, so that a bad client certificate is the only fault
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
                        "ca.pem", "-days", "2", "-subj", "/CN=ef21 bad-input CA"], cwd=d, check=True,
                       capture_output=True)
    return d


@pytest.fixture(scope="module")
def busy_port():
    """A port with a listener on it (what --port and --status-port must refuse)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


def leftovers(mark: str) -> list[str]:
    """Processes still running whose environment carries ``mark``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
            status = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except OSError:
            continue
        if f"{MARK}={mark}".encode() in env.split(b"\0") and status != "Z":
            found.append(pid)
    return found


def run_cli(args: list[str], cwd: Path) -> tuple[int, str, list[str]]:
    """Exit status, stderr, and the processes of this command still running after it exited (killed)."""
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK: mark}
    env.pop("EF21_TOKEN", None)
    try:
        p = subprocess.run([sys.executable, "-m", "ef21", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=TIMEOUT_S)
        code, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired as exc:
        code, err = -1, f"still running after {TIMEOUT_S:g} s; stderr: {exc.stderr!r}"
    deadline = time.monotonic() + 5.0  # a child may need a moment to notice that its parent is gone
    while (left := leftovers(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        os.kill(int(pid), 9)
    return code, err, left


def check_one_line(result: tuple[int, str, list[str]], command: str, *needles: str) -> None:
    code, err, left = result
    assert not left, f"processes left running: {left}"
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1, f"exit {code}, stderr:\n{err}"
    assert lines[0].startswith(f"ef21 {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


QUICK = ["--rounds", "3", "--workers", "2"]
LISTEN = ["--port", "0", "--status-port", "0", "--join-timeout", "20"]

# (case, arguments after the command, phrases the line must contain); {busy} is the busy port.
CONFIG_CASES = [
    ("data-missing", ["--data", "missing.txt"], ["missing.txt", "no such file"]),
    ("data-garbage", ["--data", "garbage.txt"], ["garbage.txt", "LIBSVM"]),
    ("x0-wrong-d", ["--x0", "x3.npy"], ["--x0", "3 entries", "d = 112"]),
    ("x0-pickled", ["--x0", "pickled.npy"], ["--x0", "pickled.npy"]),
    ("x0-spec", ["--x0", "normal:abc"], ["--x0"]),
    ("k-zero", ["--k", "0"], ["--k", "d = 112"]),
    ("k-huge", ["--k", "1000000000000000"], ["--k", "d = 112"]),
    ("method", ["--method", "nope"], ["unknown method 'nope'"]),
    ("compressor", ["--compressor", "nope"], ["unknown compressor 'nope'"]),
    ("not-contractive", ["--compressor", "urandk", "--k", "2"], ["contractive"]),
    ("workers-vs-rows", ["--workers", "100000"], ["100000 workers"]),
    ("stepsize", ["--stepsize-mult", "-1"], ["--stepsize-mult"]),
    ("log-folder", ["--log", "/proc/nope/run.jsonl"], ["--log", "/proc/nope/run.jsonl"]),
    ("out-folder", ["--out", "/proc/nope/x.npy"], ["--out", "/proc/nope/x.npy"]),
]

SERVICE_CASES = [
    ("port-busy", ["--port", "{busy}", "--status-port", "0"], ["--port {busy}", "in use"]),
    ("status-port-busy", ["--port", "0", "--status-port", "{busy}"], ["--status-port {busy}", "in use"]),
    ("host-unknown", ["--host", "no-such-host.invalid", "--port", "0", "--status-port", "-1"],
     ["no-such-host.invalid"]),
    ("token-unreadable", ["--token-file", "tokdir"], ["--token-file", "tokdir", "cannot read"]),
    ("token-empty", ["--token-file", "empty-token"], ["--token-file", "empty"]),
    ("join-timeout", ["--join-timeout", "0"], ["--join-timeout"]),
    ("checkpoint-folder", ["--checkpoint", "/proc/nope/c.npz"], ["--checkpoint", "/proc/nope/c.npz"]),
]

MASTER_ONLY_CASES = [
    ("tls-garbage", ["--tls-cert", "notpem.pem", "--tls-key", "notpem.pem"], ["--tls-cert", "notpem.pem"]),
    ("tls-missing", ["--tls-cert", "missing.pem", "--tls-key", "notpem.pem"], ["missing.pem", "cannot read"]),
    ("tls-ca-garbage", ["--tls-cert", "ca.pem", "--tls-key", "ca.key", "--tls-ca", "notpem.pem"],
     ["--tls-ca", "notpem.pem"]),
    ("resume-missing", ["--resume", "missing.npz"], ["missing.npz"]),
]


def _args(args: list[str], busy: int) -> list[str]:
    return [a.replace("{busy}", str(busy)) for a in args]


# The master needs no copy of the data (its workers have it): a missing file is no error there.
MASTER_CASES = [c for c in CONFIG_CASES if c[0] != "data-missing"] + SERVICE_CASES + MASTER_ONLY_CASES
RUN_CASES = CONFIG_CASES + SERVICE_CASES

WORKER_CASES = [
    ("token-unreadable", ["--master", "127.0.0.1:1", "--token-file", "tokdir"], ["--token-file", "cannot read"]),
    ("tls-ca-garbage", ["--master", "127.0.0.1:1", "--tls-ca", "notpem.pem"], ["--tls-ca", "notpem.pem"]),
    ("tls-ca-missing", ["--master", "127.0.0.1:1", "--tls-ca", "missing.pem"], ["missing.pem", "cannot read"]),
    ("tls-cert-garbage", ["--master", "127.0.0.1:1", "--tls-ca", "ca.pem", "--tls-cert", "notpem.pem",
                          "--tls-key", "notpem.pem"], ["--tls-cert", "notpem.pem"]),
    ("tls-cert-alone", ["--master", "127.0.0.1:1", "--tls-ca", "ca.pem", "--tls-cert", "ca.pem"],
     ["--tls-cert and --tls-key"]),
    ("master-address", ["--master", "no-port-here"], ["--master", "HOST:PORT"]),
    ("rank", ["--master", "127.0.0.1:1", "--rank", "-2"], ["--rank"]),
    ("connect-timeout", ["--master", "127.0.0.1:1", "--connect-timeout", "-1"], ["--connect-timeout"]),
    # These three need a master to answer: {master} is a live one (2 workers, mushrooms).
    ("rank-out-of-range", ["--master", "{master}", "--rank", "7"], ["--rank 7", "2 workers"]),
    ("data-missing", ["--master", "{master}", "--data", "missing.txt"], ["missing.txt", "no such file"]),
    ("data-garbage", ["--master", "{master}", "--data", "garbage.txt"], ["garbage.txt", "LIBSVM"]),
]


def command_line(command: str, case: str, args: list[str]) -> list[str]:
    if command == "simulate":
        return ["simulate", "-q", *QUICK, *args]
    if command == "master":
        listen = [] if case in ("port-busy", "status-port-busy", "host-unknown") else LISTEN
        if case == "join-timeout":
            listen = ["--port", "0", "--status-port", "0"]
        return ["master", *QUICK, *listen, *args]
    if command == "run":
        return ["run", "-q", *QUICK, *([] if case == "join-timeout" else ["--join-timeout", "20"]), *args]
    return ["worker", "--connect-timeout", "10", *args]


@pytest.fixture(scope="module")
def live_master(files):
    """A real master (2 workers, mushrooms) for the worker cases that only a master can reveal."""
    p = subprocess.Popen([sys.executable, "-m", "ef21", "master", "--port", "0", "--status-port", "-1",
                          "--workers", "2", "--rounds", "3", "--join-timeout", "600"], cwd=files,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert "listening on" in line, line + p.stderr.read()
        yield line.split("listening on ")[1].split(";")[0]
    finally:
        p.terminate()
        p.communicate(timeout=20)


MATRIX = ([("simulate", *c) for c in CONFIG_CASES] + [("master", *c) for c in MASTER_CASES]
          + [("run", *c) for c in RUN_CASES] + [("worker", *c) for c in WORKER_CASES])


@pytest.fixture(scope="module")
def results(files, busy_port, live_master) -> dict[tuple[str, str], tuple[int, str, list[str]]]:
    """Every case of the matrix, run a few at a time (each is a process start: mostly imports)."""
    have_ca = (files / "ca.pem").exists()
    jobs = {}
    for command, case, args, _ in MATRIX:
        if not have_ca and any(a in ("ca.pem", "ca.key") for a in args):
            continue
        args = [a.replace("{busy}", str(busy_port)).replace("{master}", live_master) for a in args]
        jobs[(command, case)] = command_line(command, case, args)
    # The cases that need the live master first, while it surely still waits for its workers.
    order = sorted(jobs, key=lambda key: "{master}" not in " ".join(dict(
        ((c, k), a) for c, k, a, _ in MATRIX)[key]))
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {key: pool.submit(run_cli, jobs[key], files) for key in order}
        return {key: f.result() for key, f in futures.items()}


@pytest.mark.parametrize("command,case,args,needles", MATRIX, ids=[f"{c[0]}-{c[1]}" for c in MATRIX])
def test_bad_input_is_one_line_and_exit_2(results, busy_port, command, case, args, needles):
    if (command, case) not in results:
        pytest.skip("openssl is needed to make a certificate")
    check_one_line(results[(command, case)], command, *_args(needles, busy_port))


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_token_file_of_another_user_says_whose_it_is():
    """What a container meets when the secret's owner is not its uid (docker compose bind-mounts it as it is)."""
    folder = Path(tempfile.mkdtemp(prefix="ef21-token-"))  # pytest's own folders are root's alone (0700)
    folder.chmod(0o755)
    token = folder / "token"
    token.write_text("t0ken\n")
    token.chmod(0o600)
    os.chown(token, 4242, 4242)
    as_other = ["setpriv", "--reuid", "1234", "--regid", "1234", "--clear-groups", sys.executable]
    try:
        if subprocess.run([*as_other, "-c", "import ef21"], capture_output=True, cwd="/").returncode != 0:
            pytest.skip("uid 1234 cannot run this Python (its folders are root's alone)")
        p = subprocess.run([*as_other, "-m", "ef21", "worker", "--master", "127.0.0.1:1", "--token-file",
                            str(token)], capture_output=True, text=True, timeout=TIMEOUT_S, cwd="/")
    finally:
        shutil.rmtree(folder)
    assert p.returncode == 2 and p.stderr.splitlines() == [
        f"ef21 worker: error: --token-file {token}: cannot read (Permission denied: this process runs as uid 1234, "
        f"the file belongs to uid 4242 with mode 600)"]
