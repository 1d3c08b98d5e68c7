"""Config files (``--config run.toml``) for every command, and explicit flags against a checkpoint on --resume."""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ef21.__main__ import build_parser
from ef21.cli.configfile import INFO_ATTR, REDACTED, CliInfo, info, option_key, parse_command_line
from ef21_server import checkpoint

from .helpers import http_get, one_error_line

PY = sys.executable
COMMANDS = ("simulate", "plot", "master", "status", "run", "worker", "experiment")


def ef21(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "ef21", *args], capture_output=True, text=True, timeout=timeout, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(*argv: str) -> argparse.Namespace:
    return parse_command_line(build_parser, list(argv))


def plain(ns: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(ns).items() if k != INFO_ATTR}




# -- every flag of every command, from the parser itself ------------------------------------------------------------

def _sample(action: argparse.Action) -> tuple[object, list[str]]:
    """A non-default value for an option as TOML would hold it, and the same on the command line."""
    if action.nargs == 0:
        return True, []
    if action.choices is not None:
        v = [c for c in action.choices if c != action.default][0]
        return v, [str(v)]
    if action.type is int:
        v = (action.default or 0) + 3
        return v, [str(v)]
    if action.type is float:
        return 0.375, ["0.375"]
    many = action.nargs in ("+", "*")
    return (["a.jsonl", "b.jsonl"], ["a.jsonl", "b.jsonl"]) if many else ("some/value", ["some/value"])


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_of_every_command_is_settable_in_a_file(tmp_path, command):
    sub = argparse._SubParsersAction
    parser = build_parser()
    cmd = next(a for a in parser._actions if isinstance(a, sub)).choices[command]
    lines, argv = [], []
    for a in cmd._actions:
        if isinstance(a, argparse._HelpAction) or a.dest == "config":
            continue
        if isinstance(a, argparse._AppendAction):  # a repeatable flag: an array in the file, repeated on the line
            lines.append(f"{json.dumps(option_key(a))} = {json.dumps(['k=v', 'a=b'])}")
            argv += [a.option_strings[-1], "k=v", a.option_strings[-1], "a=b"]
            continue
        toml_value, cli = _sample(a)
        key = option_key(a)
        # Underscores and hyphens are both accepted; use the other spelling every second key.
        key = key.replace("-", "_") if len(lines) % 2 else key
        lines.append(f"{json.dumps(key) if '-' in key else key} = {json.dumps(toml_value)}")
        argv += ([a.option_strings[-1]] if a.option_strings else []) + cli
    path = tmp_path / "all.toml"
    path.write_text("\n".join(lines) + "\n")
    from_file = parse(command, "--config", str(path))
    from_cli = parse(command, *argv)
    assert plain(from_file) == {**plain(from_cli), "config": path}
    got = info(from_file)
    assert isinstance(got, CliInfo)
    assert got.explicit == got.from_file == frozenset(got.keys.values())
    assert info(parse(command, *argv)).from_file == frozenset()


def test_precedence_tables_and_spellings(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'k = 3\nrounds = 5\n"stepsize-mult" = 8\n'
        '[method]\ncompressor = "randk"\n'
        '[simulate]\nrounds = 7\n'
        '[worker]\nmaster = "10.0.0.1:50051"\n')
    ns = parse("simulate", "--config", str(path), "--k", "2")
    assert (ns.k, ns.rounds, ns.stepsize_mult, ns.compressor) == (2, 7, 8.0, "randk")
    assert ns.method == "ef21" and ns.data is None  # the default (mushrooms, resolved by RunConfig)
    i = info(ns)
    assert {"k", "rounds", "stepsize_mult", "compressor"} <= i.explicit and "method" not in i.explicit
    assert "k" not in i.from_file and "rounds" in i.from_file
    w = parse("worker", "--config", str(path))
    assert w.master == "10.0.0.1:50051"
    assert set(info(w).skipped) == {"k", "rounds", "stepsize-mult", "compressor"}
    # A required flag may come from the file; without either it is still required.
    path.write_text('[worker]\nconnect_timeout = 1\n')
    r = ef21("worker", "--config", str(path))
    assert r.returncode == 2 and "--master" in r.stderr


@pytest.mark.parametrize("text,match", [
    ("roundz = 3", "unknown key 'roundz' (not an option of any ef21 command)"),
    ("rounds = \"ten\"", "key 'rounds' must be an integer, got a string ('ten')"),
    ("rounds = 2.5", "key 'rounds' must be an integer, got a float (2.5)"),
    ("tol = true", "key 'tol' must be a number, got a boolean (True)"),
    ("quiet = 1", "key 'quiet' must be true or false, got an integer (1)"),
    ("data = 3", "key 'data' must be a string, got an integer (3)"),
    ("problem = \"svm\"", "key 'problem' must be one of logreg, lsq, quadratic, got 'svm'"),
    ("log = [\"a\"]", "key 'log' must be a string (a path), got an array"),
    ("[worker]\nrank = \"one\"", "[worker]: key 'rank' must be an integer, got a string ('one')"),
    ("[worker]\nmethod = \"ef21\"", "[worker]: unknown key 'method' (not an option of ef21 worker)"),
    ("[method]\n[method.inner]\nk = 1", "'inner' is a nested table"),
    ("k = 1\n[method]\nk = 2", "key 'k' is given twice"),
    ("stepsize_mult = 1\n\"stepsize-mult\" = 2", "given twice"),
    ("config = \"other.toml\"", "key 'config' cannot be set in a config file"),
    ("simulate = 3", "unknown key 'simulate'"),
    ("k = ", "not valid TOML"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    line = one_error_line(ef21("simulate", "--config", str(path), "--rounds", "1"))
    assert match in line and str(path) in line


def test_missing_config_file(tmp_path):
    line = one_error_line(ef21("plot", "x.jsonl", "-o", "x.png", "--config", str(tmp_path / "nope.toml")))
    assert "nope.toml: no such file" in line


def test_simulate_from_a_config_file_is_the_same_run(tmp_path):
    (tmp_path / "run.toml").write_text(
        '# EF21, Top-2, mushrooms\n[method]\nmethod = "ef21"\nk = 2\nstepsize-mult = 256\n'
        '[stopping]\nrounds = 40\nx0 = "normal:0"\n[simulate]\nlog = "file.jsonl"\nquiet = true\n')
    a = ef21("simulate", "--config", "run.toml", cwd=tmp_path)
    b = ef21("simulate", "--k", "2", "--stepsize-mult", "256", "--rounds", "40", "--x0", "normal:0",
             "--log", "flags.jsonl", "-q", cwd=tmp_path)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert (tmp_path / "file.jsonl").read_text() != ""
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "elapsed_s"}  # noqa: E731
                       for l in (tmp_path / p).read_text().splitlines()]
    assert strip("file.jsonl") == strip("flags.jsonl")
    first = a.stdout.splitlines()[0]
    assert first.startswith("ef21 simulate: configuration (defaults < run.toml < command line): {")
    assert 'k = 2,' in first and 'stepsize-mult = 256.0' in first and 'log = "file.jsonl"' in first


def test_effective_config_in_status_with_the_token_redacted(tmp_path):
    port, status_port = free_port(), free_port()
    (tmp_path / "m.toml").write_text(
        f'workers = 2\nk = 2\nlam = 0.1\n[master]\nport = {port}\nstatus-port = {status_port}\n'
        'token = "s3cret-token-value"\nround-timeout = 30\n')
    proc = subprocess.Popen([PY, "-m", "ef21", "master", "--config", "m.toml", "--rounds", "77"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        doc = None
        while doc is None:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            try:
                _, doc = http_get(f"http://127.0.0.1:{status_port}/status")
            except OSError:
                time.sleep(0.1)
        eff = doc["effective_config"]
        assert (eff["workers"], eff["k"], eff["rounds"], eff["port"], eff["round-timeout"]) == (2, 2, 77, port, 30.0)
        assert eff["data"] == "mushrooms" and eff["token"] == REDACTED
        assert "s3cret" not in json.dumps(doc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "s3cret" not in out + err
    assert f"port = {port}" in out and f'token = "{REDACTED}"' in out


def test_worker_and_status_take_their_table(tmp_path):
    port = free_port()  # nothing listens there
    (tmp_path / "c.toml").write_text(f'method = "gd"\n[worker]\nmaster = "127.0.0.1:{port}"\nconnect-timeout = 0.5\n'
                                     f'[status]\nmaster = "127.0.0.1:{port}"\ntimeout = 1\n')
    w = ef21("worker", "--config", "c.toml", cwd=tmp_path, timeout=60)
    assert w.returncode == 4 and f"127.0.0.1:{port}" in w.stderr  # the master never answered
    assert f'master = "127.0.0.1:{port}"' in w.stdout and "connect-timeout = 0.5" in w.stdout
    assert "skipped: method" in w.stdout
    s = ef21("status", "--config", "c.toml", cwd=tmp_path, timeout=60)
    assert s.returncode == 2 and f"cannot get the status of 127.0.0.1:{port}" in s.stderr
    assert "configuration (defaults < c.toml < command line)" in s.stderr and s.stdout == ""


# -- explicit flags against the checkpoint (issue 11, item 4) ---------------------------------------------------------

@pytest.fixture(scope="module")
def other_run(tmp_path_factory) -> Path:
    """A finished run on other data (a small LIBSVM file), with its checkpoint."""
    root = tmp_path_factory.mktemp("other")
    rng = np.random.default_rng(5)
    lines = []
    for i in range(60):
        feats = " ".join(f"{j + 1}:{rng.normal():.6f}" for j in range(6))
        lines.append(f"{1 if i % 3 else -1} {feats}")
    (root / "other.svm").write_text("\n".join(lines) + "\n")
    r = ef21("run", "--workers", "2", "--data", str(root / "other.svm"), "--k", "2", "--lam", "0.2",
             "--stepsize-mult", "8", "--rounds", "10", "--x0", "normal:0", "--checkpoint", str(root / "ck.npz"),
             "--log", str(root / "l.jsonl"), "--status-port", "-1", "-q", cwd=root)
    assert r.returncode == 0, r.stderr
    return root


def resume_master(root: Path, *args: str) -> subprocess.CompletedProcess:
    """``ef21 master --resume``: on today's rules it must refuse at once; a master that starts instead waits for
    its workers until the timeout, which fails the test."""
    try:
        return ef21("master", "--resume", str(root / "ck.npz"), "--port", "0", "--status-port", "-1", *args,
                    cwd=root, timeout=45)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ef21 master {' '.join(args)} --resume: resumed the checkpoint instead of refusing")


def test_checkpoint_holds_the_effective_config(other_run):
    meta = checkpoint.load_one(other_run / "ck.npz").meta
    eff = meta["effective_config"]
    assert eff["data"] == str(other_run / "other.svm") and eff["lam"] == 0.2 and eff["k"] == 2
    assert eff["checkpoint"] == str(other_run / "ck.npz") and meta["round"] == 10


def test_resume_refuses_explicit_data_that_contradicts_the_checkpoint(other_run):
    line = one_error_line(resume_master(other_run, "--data", "mushrooms", "--workers", "2"))
    assert "--data mushrooms" in line and "other.svm" in line and "only --rounds and --tol may change" in line


def test_resume_refuses_an_explicit_default_value(other_run):
    line = one_error_line(resume_master(other_run, "--lam", "0.1"))  # 0.1 is the default; the checkpoint has 0.2
    assert "--lam 0.1 (checkpoint: 0.2)" in line


def test_resume_refuses_a_contradiction_from_the_config_file(other_run):
    (other_run / "res.toml").write_text('data = "mushrooms"\nk = 1\n')
    line = one_error_line(resume_master(other_run, "--config", "res.toml"))
    assert "--data mushrooms" in line and "--k 1 (checkpoint: 2)" in line


def test_resume_takes_unstated_flags_from_the_checkpoint_and_may_change_the_stopping_rule(other_run, tmp_path):
    import shutil

    for name in ("ck.npz", "l.jsonl", "other.svm"):
        shutil.copy(other_run / name, tmp_path / name)
    # --workers and --k repeat the checkpoint; --data and --lam are left to it; --rounds changes.
    r = ef21("run", "--resume", str(tmp_path / "ck.npz"), "--checkpoint", str(tmp_path / "ck.npz"), "--workers",
             "2", "--k", "2", "--rounds", "25", "--log", str(tmp_path / "l.jsonl"), "--status-port", "-1", "-q",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f'data = "{other_run / "other.svm"}"' in r.stdout and "lam = 0.2" in r.stdout
    rows = [json.loads(l) for l in (tmp_path / "l.jsonl").read_text().splitlines()]
    # (Resuming a run that had ended logs its last round, 10, a second time: the final checkpoint is taken after
    # that round was counted. A matter of the checkpoint, not of the configuration checked here.)
    assert rows[0]["round"] == 0 and rows[-1]["round"] == 25
    assert checkpoint.load_one(tmp_path / "ck.npz").meta["effective_config"]["rounds"] == 25


def test_the_readme_example_serves_master_and_worker(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Config files"):]
    block = section[section.index("```toml") + len("```toml"):section.index("```", section.index("```toml") + 7)]
    (tmp_path / "run.toml").write_text(block)
    master = parse("master", "--config", str(tmp_path / "run.toml"))
    assert (master.workers, master.k, master.stepsize_mult, master.host) == (8, 2, 1024.0, "0.0.0.0")
    assert master.checkpoint == Path("runs/ck.npz") and master.tol == 1e-7
    worker = parse("worker", "--config", str(tmp_path / "run.toml"))
    assert worker.master == "10.0.0.1:50051" and "method" in info(worker).skipped
