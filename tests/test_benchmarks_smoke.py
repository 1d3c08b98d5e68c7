"""The benchmark scripts still run (tiny sizes), so they do not rot. Their numbers are not checked here."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["round_rate.py", "wire.py", "master_cost.py", "constrained_link.py", "compact.py"])
def test_benchmark_smoke(script, tmp_path):
    out = tmp_path / "out.json"
    extra = ["--out", str(tmp_path / "cl")] if script == "constrained_link.py" else []
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--json", str(out), *extra],
                       capture_output=True, text=True, timeout=200, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["results"] and doc["date"]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["vs_ddp.py", "torch_digits.py", "torch_dtype.py"])
def test_torch_benchmark_smoke(script, tmp_path):
    pytest.importorskip("torch", reason="PyTorch is not installed: the torch benchmarks are not run")
    out = tmp_path / "out.json"
    extra = [] if script == "torch_dtype.py" else ["--work-dir", str(tmp_path / "runs"), "--plot",
                                                   str(tmp_path / "fig.png")]
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--json", str(out), *extra],
                       capture_output=True, text=True, timeout=200, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["results"] and doc["date"]
    if script != "torch_dtype.py":
        assert (tmp_path / "fig.png").stat().st_size > 0
