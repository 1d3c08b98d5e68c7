"""Shared by ``torch_digits.py``, ``vs_ddp.py`` and ``vs_powersgd.py``: the digits examples trained through the
real service (``ef21 run``, or master and workers started apart), read back from the per-round log as accuracy
curves."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from common import ROOT, run_apart

EXAMPLES = {"mlp": ROOT / "examples" / "digits_mlp.py", "cnn": ROOT / "examples" / "digits_cnn.py"}


@dataclass
class Curve:
    """Held-out accuracy at the evaluation rounds of one run, with what the run had spent to get there."""

    label: str
    d: int = 0
    rounds: list[int] = field(default_factory=list)
    acc: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    """Held-out loss at the same rounds (where the run reports it)."""
    wire_bytes: list[int] = field(default_factory=list)
    """Cumulative bytes of the training traffic, up + down (evaluation traffic not included)."""
    eval_bytes: list[int] = field(default_factory=list)
    time_s: list[float] = field(default_factory=list)
    """Seconds since round 0 began (start-up excluded), evaluation rounds included."""
    process_s: float = 0.0
    """The whole command's wall time, start-up (importing torch in every process) included."""
    command: str = ""

    def first_reaching(self, target: float) -> int | None:
        return next((i for i, a in enumerate(self.acc) if a >= target - 1e-12), None)

    def summary(self, target: float | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label, "rounds": self.rounds[-1], "final_acc": self.acc[-1], "best_acc": max(self.acc),
            "wire_bytes": self.wire_bytes[-1], "eval_bytes": self.eval_bytes[-1], "time_s": self.time_s[-1],
            "process_s": self.process_s, "command": self.command,
        }
        if target is not None:
            i = self.first_reaching(target)
            out["target_acc"] = target
            out["to_target"] = None if i is None else {
                "round": self.rounds[i], "wire_bytes": self.wire_bytes[i], "eval_bytes": self.eval_bytes[i],
                "time_s": self.time_s[i]}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "d": self.d, "rounds": self.rounds, "acc": self.acc, "loss": self.loss,
                "wire_bytes": self.wire_bytes, "eval_bytes": self.eval_bytes, "time_s": self.time_s}


def objective_spec(model: str) -> str:
    """The ``--objective`` of an example by its key (mlp, cnn), or ``model`` itself (FILE.py:FUNC)."""
    return f"examples/{EXAMPLES[model].name}:make" if model in EXAMPLES else model


def ef21_command(model: str, workers: int, rounds: int, eval_every: int, flags: Sequence[str],
                 objective_args: Sequence[str] = (), log: Path | None = None) -> list[str]:
    cmd = ["ef21", "run", "--workers", str(workers), "--objective", objective_spec(model),
           *[a for kv in objective_args for a in ("--objective-arg", kv)], *flags, "--rounds", str(rounds),
           "--eval-every", str(eval_every)]
    return cmd + ([] if log is None else ["--log", str(log)])


def run_ef21(label: str, model: str, workers: int, rounds: int, eval_every: int, flags: Sequence[str],
             out_dir: Path, objective_args: Sequence[str] = ()) -> Curve:
    """One ``ef21 run`` of an example; returns its curve (raises with the run's stderr if it fails)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / f"{label.replace(' ', '_').replace('/', '_')}.jsonl"
    shown = ef21_command(model, workers, rounds, eval_every, flags, objective_args)
    cmd = [sys.executable, "-m", "ef21", *ef21_command(model, workers, rounds, eval_every, flags,
                                                           objective_args, log)[1:], "-q", "--status-port", "-1"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{label}: ef21 run failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return read_curve(label, log, wall, " ".join(shown))


def read_curve(label: str, log: Path, process_s: float = 0.0, command: str = "") -> Curve:
    """The evaluation rounds of an ef21 run's per-round log, as a curve."""
    curve = Curve(label, process_s=process_s, command=command)
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if not rec.get("metrics"):
            continue
        curve.rounds.append(rec["round"])
        curve.acc.append(rec["metrics"].get("test_acc", float("nan")))  # a language model has a loss only
        curve.loss.append(rec["metrics"].get("test_loss", float("nan")))
        curve.wire_bytes.append(rec["wire_bytes_up"] + rec["wire_bytes_down"])
        curve.eval_bytes.append(rec["eval_bytes"])
        curve.time_s.append(rec["elapsed_s"])
    if not curve.rounds:
        raise RuntimeError(f"{label}: the log has no evaluation round with metrics")
    return curve


def run_ef21_apart(label: str, objective: str, workers: int, rounds: int, eval_every: int, flags: Sequence[str],
                   log: Path, objective_args: Sequence[str] = (), **where: Any) -> tuple[Curve, list[dict[str, Any]]]:
    """An example through ``ef21 master`` and ``workers`` × ``ef21 worker`` started apart (``common.run_apart``:
    ``where`` places them, e.g. each in a network namespace). Returns the evaluation curve and every round's log
    record."""
    master_flags = ["--objective", objective, *[a for kv in objective_args for a in ("--objective-arg", kv)], *flags,
                    "--rounds", str(rounds), "--eval-every", str(eval_every)]
    records, seconds = run_apart(master_flags, workers, log, label=label, **where)
    shown = " ".join(ef21_command(objective, workers, rounds, eval_every, flags, objective_args))
    return read_curve(label, log, seconds, shown), records


def example_dim(model: str, objective_args: Sequence[str] = ()) -> int:
    """d of an example's model, by its key or its module's path from the repository's root (builds rank 0's
    objective in this process)."""
    from ef21.problems.plugins import build_objective

    opts = tuple(tuple(kv.split("=", 1)) for kv in objective_args)
    module = EXAMPLES[model] if model in EXAMPLES else ROOT / model
    return build_objective(f"{module}:make", opts, 0, 1, 0).d  # type: ignore[arg-type]


def mb(n: float) -> float:
    return n / 1e6
