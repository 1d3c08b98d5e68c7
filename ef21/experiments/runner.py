"""Running an experiment's runs: each one an ``ef21 simulate`` (or, with ``--service``, ``ef21 run``) process, up
to ``--jobs`` at a time, its log filed under ``OUT/runs/`` by the hash of its configuration.

A run writes its log to a hidden ``.part`` file; only once the process has ended (converged, out of rounds or
diverged — a diverged run is a result too) is its record written and the log renamed into place, both atomically.
A log in place therefore means a finished run, and a second invocation skips it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ef21.cli.exits import EXIT_DIVERGED
from ef21.errors import UserError
from ef21.problems.data import BUILTIN

from .schema import Experiment, RunSpec, command_args

LIBSVM_PAGE = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary.html"


@dataclass(frozen=True)
class Job:
    spec: RunSpec
    key: str
    command: str
    """``simulate`` or ``run`` (the local cluster)."""
    args: tuple[str, ...]
    """The run's flags, with the data resolved; the runner adds the log and its own quiet flags."""
    rounds: int


@dataclass(frozen=True)
class Outcome:
    job: Job
    status: str
    """``cached`` (done by an earlier invocation), ``done`` or ``failed``."""
    message: str = ""


def run_dir(out: Path) -> Path:
    return out / "runs"


def log_path(out: Path, key: str) -> Path:
    return run_dir(out) / f"{key}.jsonl"


def record_path(out: Path, key: str) -> Path:
    return run_dir(out) / f"{key}.json"


def is_done(out: Path, key: str) -> bool:
    return log_path(out, key).is_file() and record_path(out, key).is_file()


# -- data ------------------------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_data(exp: Experiment, data_dir: Path | None) -> dict[str, tuple[str, str]]:
    """Each dataset the runs name → (what ``--data`` gets, an identity of the content for the run keys).

    Shipped names and synthetic specs stand for themselves; a path is taken as written (relative to the
    definition's folder); any other name is a LIBSVM file looked up in ``data_dir``. Every file is checked before
    anything runs: a missing one is an error naming it and where to get it."""
    out: dict[str, tuple[str, str]] = {}
    base = exp.path.parent if exp.path is not None else Path.cwd()
    for spec in exp.runs:
        name = str(spec.flags["data"])
        if name in out:
            continue
        if name in BUILTIN:
            out[name] = (name, f"shipped:{name}:{BUILTIN[name][1]}")
        elif name.startswith("synthetic:"):
            out[name] = (name, name)
        elif "/" in name or name.endswith((".npz", ".txt", ".svm", ".gz")):
            path = Path(name) if Path(name).is_absolute() else base / name
            if not path.is_file():
                raise UserError(f"experiment {exp.name}: data file {path} not found")
            out[name] = (str(path), f"sha256:{_sha256(path)}")
        else:
            panel = next(p for p in exp.panels if p.name == spec.panel)
            where = panel.source or f"{LIBSVM_PAGE}#{name}"
            if data_dir is None:
                raise UserError(f"experiment {exp.name} needs the LIBSVM file '{name}': pass --data-dir DIR with it "
                                f"(get it from {where})")
            path = next((data_dir / f for f in (name, f"{name}.gz") if (data_dir / f).is_file()), None)
            if path is None:
                raise UserError(f"--data-dir {data_dir}: no file '{name}' (needed by experiment {exp.name}; "
                                f"get it from {where})")
            out[name] = (str(path), f"sha256:{_sha256(path)}")
    return out


def plan(exp: Experiment, data: dict[str, tuple[str, str]], *, service: bool) -> list[Job]:
    mode = "service" if service else "simulate"
    jobs = []
    for spec in exp.runs:
        where, identity = data[str(spec.flags["data"])]
        flags = {**spec.flags, "data": where}
        jobs.append(Job(spec, spec.config_key(mode, identity), "run" if service else "simulate",
                        tuple(command_args(flags)), int(spec.flags.get("rounds", 1000))))
    return jobs


def argv(job: Job, log: Path) -> list[str]:
    extra = ["--status-port", "-1"] if job.command == "run" else []
    return [job.command, *job.args, "--log", str(log), "-q", *extra]


def display_command(job: Job, out: Path) -> str:
    """The command as a user would type it (the log under the output folder, as it ends up)."""
    return " ".join(_quote(a) for a in ["ef21", *argv(job, log_path(out, job.key))])


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


# -- running ---------------------------------------------------------------------------------------------------------

def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Runner:
    """Runs jobs in child processes, at most ``jobs`` at once; ``stop()`` ends the running ones."""

    def __init__(self, out: Path, *, jobs: int, on_line: Any = None) -> None:
        self.out = out
        self.jobs = max(1, jobs)
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._on_line = on_line
        self.env = dict(os.environ)  # each run's process limits its own BLAS threads (ef21/__main__.py)

    def part_path(self, job: Job) -> Path:
        return run_dir(self.out) / f".{job.key}.jsonl.part"

    def run_one(self, job: Job) -> Outcome:
        part = self.part_path(job)
        cmd = [sys.executable, "-m", "ef21", *argv(job, part)]
        t0 = time.monotonic()
        with self._lock:
            if self._stopping:
                return Outcome(job, "failed", "interrupted")
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=self.env, start_new_session=True)
            self._procs[job.key] = proc
        try:
            stdout, stderr = proc.communicate()
        finally:
            with self._lock:
                self._procs.pop(job.key, None)
        elapsed = time.monotonic() - t0
        if proc.returncode not in (0, EXIT_DIVERGED) or not part.is_file():
            part.unlink(missing_ok=True)
            lines = (stderr or stdout).strip().splitlines()
            return Outcome(job, "failed", lines[-1] if lines else f"exit status {proc.returncode}")
        outcome = stdout.strip().splitlines()[-1] if stdout.strip() else ""
        record = {
            "key": job.key, "panel": job.spec.panel, "label": job.spec.label, "sweep_value": job.spec.sweep_value,
            "command": argv(job, log_path(self.out, job.key)), "exit_status": proc.returncode,
            "diverged": proc.returncode == EXIT_DIVERGED, "outcome": outcome, "elapsed_s": round(elapsed, 3),
        }
        _write_atomically(record_path(self.out, job.key), json.dumps(record, indent=1) + "\n")
        os.replace(part, log_path(self.out, job.key))
        return Outcome(job, "done", outcome)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            procs = list(self._procs.values())
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def run_all(self, todo: list[Job], progress: Any) -> list[Outcome]:
        """Run ``todo``; ``progress.advance(n)`` gets the rounds logged as they come, ``progress.finished(outcome)``
        each run's end."""
        run_dir(self.out).mkdir(parents=True, exist_ok=True)
        for job in todo:  # a .part left by an interrupted invocation is started over
            self.part_path(job).unlink(missing_ok=True)
        seen: dict[str, int] = {}
        offsets: dict[str, int] = {}
        outcomes: list[Outcome] = []

        def poll(job: Job) -> None:
            try:
                with open(self.part_path(job), "rb") as fh:
                    fh.seek(offsets.get(job.key, 0))
                    chunk = fh.read()
            except FileNotFoundError:
                return
            offsets[job.key] = offsets.get(job.key, 0) + len(chunk)
            rows = min(seen.get(job.key, 0) + chunk.count(b"\n"), job.rounds + 1)
            progress.advance(rows - seen.get(job.key, 0))
            seen[job.key] = rows

        pool = ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="ef21-experiment")
        futures: dict[Future, Job] = {pool.submit(self.run_one, job): job for job in todo}
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in pending:
                    if fut.running():
                        poll(futures[fut])
                for fut in done:
                    job = futures[fut]
                    outcome = fut.result()
                    # A run that stops early (tol, divergence) still counts its planned rounds as done.
                    progress.advance(job.rounds + 1 - seen.get(job.key, 0))
                    seen[job.key] = job.rounds + 1
                    progress.finished(outcome)
                    outcomes.append(outcome)
        except BaseException:
            self.stop()
            pool.shutdown(wait=True, cancel_futures=True)
            for job in todo:
                self.part_path(job).unlink(missing_ok=True)
            raise
        pool.shutdown(wait=True)
        return outcomes
