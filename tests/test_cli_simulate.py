"""`ef21 simulate` and `ef21 plot` as a user runs them: a real process, real files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ef21.problems.data import load_dataset


def ef21(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ef21", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def test_simulate_writes_log_model_and_plot(tmp_path):
    log, out, png = tmp_path / "run.jsonl", tmp_path / "x.npy", tmp_path / "run.png"
    r = ef21("simulate", "--workers", "20", "--method", "ef21", "--compressor", "topk", "--k", "2",
             "--stepsize-mult", "1024", "--rounds", "50", "--x0", "normal:0", "--log", str(log), "--out", str(out),
             "--plot", str(png))
    assert r.returncode == 0, r.stderr
    # L computed here from the data (method doc §5: 2.786 for mushrooms); α = k/d = 2/112.
    A = load_dataset("mushrooms").A
    L = float(np.linalg.eigvalsh(A.T @ A / (4 * A.shape[0]))[-1]) + 2 * 0.1
    assert f"L={L:.6g}" in r.stdout and f"alpha={2 / 112:.6g}" in r.stdout and "theta=" in r.stdout
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [row["round"] for row in rows] == list(range(51))
    for key in ("f", "grad_norm_sq", "G", "bits_per_worker", "payload_bits_per_worker", "wire_bytes_up"):
        assert key in rows[0]
    assert rows[-1]["bits_per_worker"] == 50 * 64  # 50 rounds of k = 2 values of 32 bits (round 0 not counted)
    assert np.load(out).shape == (112,)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r2 = ef21("plot", str(log), str(log), "--labels", "a", "b", "-o", str(tmp_path / "cmp.svg"))
    assert r2.returncode == 0, r2.stderr
    assert (tmp_path / "cmp.svg").read_text().lstrip().startswith("<?xml")


def test_tol_stops_early(tmp_path):
    r = ef21("simulate", "--method", "gd", "--stepsize-mult", "4", "--rounds", "1000", "--x0", "normal:0",
             "--tol", "1e-7", "--log", str(tmp_path / "l.jsonl"))
    assert r.returncode == 0
    rows = (tmp_path / "l.jsonl").read_text().splitlines()
    # 949,760 bits = 265 rounds × 112 × 32: the method doc's reference figure (§8). Exact, and stable across
    # machines: GD has no Top-k to amplify rounding, and ‖∇f‖² crosses 1e-7 with a 1.5% margin each side.
    assert len(rows) == 266
    assert json.loads(rows[-1])["grad_norm_sq"] < 1e-7


@pytest.mark.parametrize(
    "args,match",
    [
        (["--data", "/no/such/file"], "/no/such/file: no such file"),
        (["--k", "0"], "0 < k <= d"),
        (["--k", "113"], "0 < k <= d = 112"),
        (["--workers", "9000"], "cannot be split over 9000 workers"),
        (["--method", "adam"], "unknown method 'adam'"),
        (["--compressor", "zip"], "unknown compressor"),
        (["--x0", "normal:x"], "bad --x0"),
        (["--method", "ef21", "--compressor", "urandk", "--k", "3"], "needs a contractive compressor"),
        (["--rounds", "ten"], "invalid int value"),
    ],
)
def test_bad_input_is_one_line_and_status_2(args, match):
    r = ef21("simulate", "--rounds", "2", *args)
    assert r.returncode == 2
    assert match in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2  # argparse adds its usage line; ours is one line


def test_bad_data_files(tmp_path):
    empty = tmp_path / "empty.svm"
    empty.write_text("")
    junk = tmp_path / "junk.svm"
    junk.write_text("1 2:3\n+1 what\n")
    for path, match in ((empty, "no data rows"), (junk, "line 2")):
        r = ef21("simulate", "--data", str(path))
        assert r.returncode == 2 and match in r.stderr and str(path) in r.stderr
        assert "Traceback" not in r.stderr


def test_divergence_is_a_message_not_a_traceback(tmp_path):
    r = ef21("simulate", "--method", "gd", "--stepsize-mult", "1e6", "--rounds", "500", "--problem", "lsq",
             "--log", str(tmp_path / "d.jsonl"))
    assert r.returncode == 3
    assert "diverged at round" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "d.jsonl").exists()
