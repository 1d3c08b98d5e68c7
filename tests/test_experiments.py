"""`ef21 experiment`: shipped definitions, tiny experiments end to end (simulator and local cluster), resumability,
and bad input."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import pty
import shlex
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest

from ef21.cli.args import config_from_args
from ef21.engine.config import RunConfig
from ef21.errors import UserError
from ef21.experiments import shipped
from ef21.experiments.report import least_squares_solution
from ef21.experiments.schema import command_args, load, simulate_namespace
from ef21.problems.problem import build_problem

from .helpers import one_error_line

PY = sys.executable


def ef21(*args: str, cwd: Path | None = None, timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "ef21", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          **kw)




def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# -- the shipped definitions ----------------------------------------------------------------------------------------

def test_every_shipped_definition_parses_into_valid_runs():
    names = shipped()
    assert {"finetuned", "stepsize-sweep", "least-squares"} <= set(names)
    for name, path in names.items():
        exp = load(path)
        assert exp.name == name, f"{path}: the name inside must be the file's name"
        assert exp.runs and exp.panels and exp.version >= 1
        for run in exp.runs:
            # Every run is a valid `ef21 simulate` command and a valid run configuration.
            cfg = config_from_args(simulate_namespace(command_args(run.flags)))
            assert isinstance(cfg, RunConfig)
            if run.reference is not None:
                assert len(run.reference) == len(exp.thresholds)
        keys = {r.config_key("simulate", str(r.flags["data"])) for r in exp.runs}
        assert len(keys) == len(exp.runs), f"{name}: two runs with the same configuration"


def test_the_shipped_definitions_hold_the_papers_settings():
    fine = load(shipped()["finetuned"])
    assert [p.name for p in fine.panels] == ["phishing", "mushrooms", "a9a", "w8a"]
    assert fine.thresholds == (1e-4, 1e-6, 1e-7)
    ef21_mush = next(r for r in fine.runs if r.panel == "mushrooms" and r.flags["method"] == "ef21")
    assert (ef21_mush.flags["k"], ef21_mush.flags["stepsize-mult"], ef21_mush.flags["x0"]) == (2, 1024.0, "normal:0")
    assert ef21_mush.reference == (30528.0, 204032.0, 210304.0)
    assert sum(r.reference is not None for r in fine.runs) == 16
    sweep = load(shipped()["stepsize-sweep"])
    assert sweep.sweep_values == tuple(float(2 ** i) for i in range(13))
    assert {r.flags["method"] for r in sweep.runs} == {"ef", "ef21", "ef21plus"} and {r.flags["k"] for r in
                                                                                       sweep.runs} == {1}
    lsq = load(shipped()["least-squares"])
    assert lsq.metric == "f_gap" and all(r.flags["problem"] == "lsq" and "mu" in r.flags for r in lsq.runs)


@pytest.mark.parametrize("body,match", [
    ('[[panel]]\nname = "a"\ndata = "mushrooms"\n[[panel.run]]\nlabel = "x"\nstepsize_mul = 2\n',
     "unknown key 'stepsize_mul' (not a flag of ef21 simulate)"),
    ('[[panel]]\nname = "a"\ndata = "mushrooms"\n[[panel.run]]\nlabel = "x"\nk = "two"\n',
     "key 'k' must be an integer, got a string ('two')"),
    ('[[panel]]\nname = "a"\ndata = "mushrooms"\n[[panel.run]]\nlabel = "x"\nlog = "a.jsonl"\n',
     "'log' is set by ef21 experiment itself"),
    ('thresholds = [1e-3]\n[[panel]]\nname = "a"\ndata = "mushrooms"\n[[panel.run]]\nlabel = "x"\n'
     'reference = [1, 2]\n', "'reference' must be an array of 1 numbers"),
    ('metric = "f_gap"\n[[panel]]\nname = "a"\ndata = "mushrooms"\n[[panel.run]]\nlabel = "x"\n',
     "metric f_gap needs problem = \"lsq\""),
    ('colour = "red"\n[[panel]]\nname = "a"\ndata = "mushrooms"\n[[panel.run]]\nlabel = "x"\n',
     "unknown key 'colour'"),
    ('[[panel]]\nname = "a"\ndata = "mushrooms"\n', "no runs"),
    ('kind = "sweep"\n[[panel]]\nname = "a"\ndata = "mushrooms"\n[[run]]\nlabel = "x"\n', "missing key 'sweep'"),
])
def test_bad_definitions_are_one_line_errors(tmp_path, body, match):
    path = tmp_path / "bad.toml"
    text = 'name = "bad"\nversion = 1\n' + ("" if "kind" in body else 'kind = "curves"\n') + body
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load(path)
    assert match in str(err.value) and "bad.toml" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_bad_definition_on_the_command_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\nversion = 1\nkind = "curves"\n[[panel]]\nname = "a"\ndata = "mushrooms"\n'
                    '[[panel.run]]\nlabel = "x"\nrounds = 1.5\n')
    line = one_error_line(ef21("experiment", str(path), "--output-dir", str(tmp_path / "out")))
    assert "bad.toml" in line and "key 'rounds' must be an integer, got a float (1.5)" in line
    assert not (tmp_path / "out").exists()


# -- tiny experiments end to end ------------------------------------------------------------------------------------

TINY = '''
name = "tiny"
version = 1
title = "Tiny: EF21 and GD"
description = "Two small problems."
kind = "curves"
metric = "grad_norm_sq"
x = "bits"
thresholds = [1e-2, 1e-7]
reference-label = "by hand"

[defaults]
workers = 3
x0 = "normal:0"
rounds = 40

[[run]]
label = "EF21 (k=2, 8×)"
method = "ef21"
k = 2
stepsize-mult = 8

[[panel]]
name = "synth"
data = "synthetic:240:12:4"
title = "synthetic logistic"

[[panel.run]]
label = "GD"
method = "gd"
reference = [1, 2]          # wrong on purpose: the report must say so

[[panel]]
name = "mushrooms"
data = "mushrooms"
note = "By hand: GD at 4x with n = 20 reaches 1e-7 with 949,760 bits (the method notes' figure)."

[[panel.run]]
label = "GD (4×, n=20)"
method = "gd"
workers = 20
stepsize-mult = 4
rounds = 400
tol = 1e-7
reference = [290304, 949760]
'''


def test_tiny_experiment_writes_figures_csv_and_report_and_redoes_nothing_the_second_time(tmp_path):
    definition = tmp_path / "tiny.toml"
    definition.write_text(TINY)
    out = tmp_path / "out"
    r = ef21("experiment", str(definition), "--output-dir", str(out), "--jobs", "2")
    assert r.returncode == 0, r.stderr
    assert "4 runs, 0 already done, 4 to run" in r.stdout
    stem = out / "tiny"
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in stem.with_suffix(".svg").read_text()
    report = stem.with_suffix(".md").read_text()
    rows = read_csv(stem.with_suffix(".csv"))
    logs = sorted((out / "runs").glob("*.jsonl"))
    assert len(logs) == 4 and not list((out / "runs").glob(".*"))
    # The CSV holds every round of every run, as logged.
    assert len(rows) == sum(len(p.read_text().splitlines()) for p in logs)
    gd = [row for row in rows if row["label"] == "GD (4×, n=20)"]
    assert gd[-1]["round"] == "265" and gd[-1]["bits_per_worker"] == "949760"
    assert float(gd[-1]["grad_norm_sq"]) < 1e-7 and gd[-1]["metric"] == gd[-1]["grad_norm_sq"]
    # The report: ours next to the reference, the verdicts, and the exact commands.
    assert "| GD (4×, n=20) | 290,304 / 290,304 ✓ | 949,760 / 949,760 ✓ | 265 |" in report
    assert "/ 1 ✗" in report and "/ 2 ✗" in report
    assert "**2 of 4** by hand numbers reproduced exactly." in report
    assert "\nBy hand: GD at 4x with n = 20" in report
    commands = [line for line in report.splitlines() if line.startswith("ef21 simulate ")]
    assert len(commands) == 4
    # A command from the report, run by hand, gives the same curve.
    cmd = next(c for c in commands if "--method gd" in c and "--workers 20" in c)
    own_log = tmp_path / "by-hand.jsonl"
    argv = shlex.split(cmd)[1:]
    argv[argv.index("--log") + 1] = str(own_log)
    again = ef21(*argv)
    assert again.returncode == 0, again.stderr
    assert [json.loads(l)["grad_norm_sq"] for l in own_log.read_text().splitlines()] == \
        [float(row["grad_norm_sq"]) for row in gd]

    # Second invocation: every run is found done; nothing is run again, the outputs are written again.
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    r2 = ef21("experiment", str(definition), "--output-dir", str(out))
    assert r2.returncode == 0, r2.stderr
    assert "4 runs, 4 already done, 0 to run" in r2.stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == before
    assert read_csv(stem.with_suffix(".csv")) == rows

    # A run whose log is gone (or was never finished) is the only one run again.
    logs[0].unlink()
    (out / "runs" / f".{logs[1].stem}.jsonl.part").write_text('{"round": 0}\n')  # left by an interrupted run
    r3 = ef21("experiment", str(definition), "--output-dir", str(out), "-q")
    assert r3.returncode == 0, r3.stderr
    assert "4 runs, 3 already done, 1 to run" in r3.stdout
    assert logs[0].exists() and logs[1].stat().st_mtime_ns == before[logs[1]]


def test_a_sweep_with_a_diverging_run(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('''
name = "tiny-sweep"
version = 1
kind = "sweep"
[defaults]
data = "synthetic:200:8:2"
problem = "lsq"
workers = 2
rounds = 60
x0 = "normal:1"
[sweep]
key = "stepsize-mult"
values = [0.5, 64]
[[run]]
label = "GD"
method = "gd"
[[run]]
label = "EF21"
method = "ef21"
k = 2
[[panel]]
name = "synth"
data = "synthetic:200:8:2"
''')
    out = tmp_path / "out"
    r = ef21("experiment", str(path), "--output-dir", str(out))
    assert r.returncode == 0, r.stderr
    report = (out / "tiny-sweep.md").read_text()
    assert "| final ‖∇f‖² \\ stepsize-mult | 0.5× | 64× |" in report
    gd = next(line for line in report.splitlines() if line.startswith("| GD |"))
    assert gd.endswith("| diverged |")  # 64/L on least squares blows up; the sweep goes on and says so
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert sum(r["diverged"] for r in records) >= 1 and len(records) == 4
    assert (out / "tiny-sweep.png").is_file() and (out / "tiny-sweep.svg").is_file()


def test_least_squares_optimum_is_stationary():
    flags = {"data": "synthetic:300:10:7", "problem": "lsq", "workers": 3}
    x_star, f_star = least_squares_solution(flags)
    problem = build_problem(config_from_args(simulate_namespace(command_args(flags))))
    grad = sum(o.value_and_grad(x_star)[1] for o in problem.objectives) / problem.n
    assert np.linalg.norm(grad) < 1e-12
    rng = np.random.default_rng(0)
    for _ in range(5):  # and no nearby point is lower
        x = x_star + 1e-3 * rng.standard_normal(x_star.shape)
        assert sum(o.value_and_grad(x)[0] for o in problem.objectives) / problem.n > f_star


def test_through_the_local_cluster_the_curves_are_the_simulators(tmp_path):
    path = tmp_path / "svc.toml"
    path.write_text('''
name = "svc"
version = 1
kind = "curves"
metric = "f_gap"
thresholds = [1e-3]
[defaults]
problem = "lsq"
workers = 2
rounds = 25
x0 = "normal:0"
[[panel]]
name = "synth"
data = "synthetic:120:6:3"
[[panel.run]]
label = "EF21"
method = "ef21"
k = 2
stepsize-mult = 4
[[panel.run]]
label = "GD"
method = "gd"
''')
    out = tmp_path / "out"
    svc = ef21("experiment", str(path), "--output-dir", str(out), "--service")
    assert svc.returncode == 0, svc.stderr
    assert "2 runs, 0 already done, 2 to run, 1 at a time" in svc.stdout
    sim = ef21("experiment", str(path), "--output-dir", str(out))
    assert sim.returncode == 0, sim.stderr
    assert "2 runs, 0 already done, 2 to run" in sim.stdout  # a service run is not a simulator run
    report = (out / "svc-service.md").read_text()
    assert "the local cluster (`ef21 run`" in report and "ef21 run --data synthetic:120:6:3" in report
    keep = ("panel", "label", "round", "bits_per_worker", "f", "grad_norm_sq", "G", "metric")
    via_service = [{k: row[k] for k in keep} for row in read_csv(out / "svc-service.csv")]
    via_simulator = [{k: row[k] for k in keep} for row in read_csv(out / "svc.csv")]
    assert via_service == via_simulator and len(via_service) == 52
    assert min(float(row["metric"]) for row in via_service) >= 0.0


def test_the_progress_bar_runs_across_the_sweep(tmp_path):
    path = tmp_path / "bar.toml"
    path.write_text('name = "bar"\nversion = 1\nkind = "curves"\n[defaults]\nworkers = 2\nrounds = 300\n'
                    '[[panel]]\nname = "s"\ndata = "synthetic:100:5:1"\n'
                    '[[panel.run]]\nlabel = "EF21"\nmethod = "ef21"\n[[panel.run]]\nlabel = "GD"\nmethod = "gd"\n')
    controller, terminal = pty.openpty()  # the bar is drawn only on a terminal, as wide as the terminal
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    try:
        r = subprocess.run([PY, "-m", "ef21", "experiment", str(path), "--output-dir", str(tmp_path / "out")],
                           stderr=terminal, stdout=subprocess.PIPE, timeout=120)
        os.set_blocking(controller, False)
        drawn = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(controller)
        os.close(terminal)
    assert r.returncode == 0
    text = drawn.decode(errors="replace")
    assert "bar:" in text and "602/602" in text and "round" in text and "2/2 runs" in text


# -- bad input ------------------------------------------------------------------------------------------------------

def test_unknown_experiment_lists_the_names(tmp_path):
    line = one_error_line(ef21("experiment", "finetune", cwd=tmp_path))
    assert "unknown experiment 'finetune'" in line
    for name in shipped():
        assert name in line


def test_a_data_folder_missing_a_file_is_named_with_where_to_get_it(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "phishing").write_text("1 1:1\n-1 2:1\n")
    line = one_error_line(ef21("experiment", "finetuned", "--data-dir", str(tmp_path / "data"), cwd=tmp_path))
    assert "no file 'a9a'" in line and str(tmp_path / "data") in line
    assert "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary.html#a9a" in line
    assert not (tmp_path / "experiments").exists()  # nothing ran, nothing was written
    line = one_error_line(ef21("experiment", "stepsize-sweep", cwd=tmp_path))
    assert "needs the LIBSVM file 'phishing': pass --data-dir DIR" in line
    line = one_error_line(ef21("experiment", "finetuned", "--only", "iris", cwd=tmp_path))
    assert "no panel 'iris'" in line and "phishing, mushrooms, a9a, w8a" in line


@pytest.mark.slow
def test_finetuned_on_mushrooms_reproduces_the_method_notes(tmp_path):
    r = ef21("experiment", "finetuned", "--only", "mushrooms", "--output-dir", str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr
    report = (tmp_path / "finetuned.md").read_text()
    for row in ("| EF (k=2, 64×) | NA / NA ✓ | NA / NA ✓ | NA / NA ✓ |",
                "| EF21+ (k=1, 4096×) | 10,816 / 10,816 ✓ | 15,232 / 15,232 ✓ | 17,504 / 17,504 ✓ |",
                "| GD (4×) | 372,736 / 372,736 ✓ | 698,880 / 698,880 ✓ | 949,760 / 949,760 ✓ |",
                "| EF21 (k=2, 1024×) | 30,528 / 30,528 ✓ |"):
        assert row in report, report
    # EF21 at 1024× oscillates for thousands of rounds before it settles, so where it crosses 1e-6 and 1e-7
    # moves by a few rounds with the BLAS kernel's rounding (3284-3288 rounds measured across OpenBLAS kernels,
    # 3286 in the notes): checked to within 8 rounds of Top-2 (512 bits).
    ef21_row = next(line for line in report.splitlines() if line.startswith("| EF21 (k=2, 1024×)"))
    cells = [c.strip() for c in ef21_row.split("|")[1:-1]]
    for cell, ref in zip(cells[2:4], (204032, 210304)):
        ours = int(cell.split("/")[0].replace(",", ""))
        assert abs(ours - ref) <= 512, cell
