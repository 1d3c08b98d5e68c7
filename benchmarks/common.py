"""Shared helpers for the benchmark scripts: tables, JSON output, worker processes."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np


def base_parser(doc: str | None) -> argparse.ArgumentParser:
    """The flags every benchmark has: --smoke (tiny, as CI runs it) and --json PATH."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    return ap


def best_time(fn: Callable[[], object], number: int, repeat: int = 5) -> float:
    """Seconds per call, the best of ``repeat`` batches: the least disturbed by a shared, noisy machine."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def save_figure(fig: Any, path: Path) -> None:
    """A matplotlib figure as the results' PNG (its folder made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def write_json(path: Path | None, name: str, results: list[dict[str, Any]], **extra: Any) -> None:
    if path is None:
        return
    doc = {"benchmark": name, "date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
           "python": platform.python_version(), "results": results, **extra}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}")


def config_flags(cfg: Any) -> list[str]:
    """The command-line flags of a RunConfig: every field that differs from its default (what `ef21 master` needs
    to run the same configuration)."""
    import dataclasses

    defaults = type(cfg)()
    out: list[str] = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name == "objective_args" or v is None or v == getattr(defaults, f.name):
            continue
        out += [f"--{f.name.replace('_', '-')}", repr(v) if isinstance(v, float) else str(v)]
    return out


# -- raw logs: scratch by default ------------------------------------------------------------------------------------


# -- raw logs: scratch by default --------------------------------------------------------------------------------------

def add_logs_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--logs", type=Path, default=None, metavar="DIR",
                    help="keep the runs' per-round logs here (default: a scratch folder, deleted at exit); "
                         "benchmarks/results keeps summaries and figures only")


@contextlib.contextmanager
def logs_dir(path: Path | None) -> Iterator[Path]:
    """The folder the runs write their JSONL logs to: ``path``, or a scratch folder removed afterwards."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="ef21-bench-") as tmp:
        yield Path(tmp)


def thin(values: Sequence[Any], points: int = 200) -> list[int]:
    """Up to ``points`` indices of a per-round series, denser at the start (log-spaced) and always keeping the
    first and the last: enough to redraw a curve from a summary without its raw log."""
    n = len(values)
    if n <= points:
        return list(range(n))
    idx = np.unique(np.round(np.geomspace(1, n, points)).astype(int) - 1)
    return sorted({0, n - 1, *idx.tolist()})


# -- process memory ----------------------------------------------------------------------------------------------------

def status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


class PeakMemory:
    """Samples VmHWM (the kernel's own peak resident set) of a process and its children until stopped.

    VmHWM only grows, so sampling misses nothing but a peak reached in a process's last interval before it exits.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.peak_kib: dict[int, int] = {}
        self.argv: dict[int, list[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in [self.pid, *children(self.pid)]:
                kib = status_kib(pid, "VmHWM")
                if kib is not None:
                    self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), kib)
                    # Read again each time: a child seen between fork and exec still shows its parent's argv.
                    argv = cmdline(pid)
                    if argv:
                        self.argv[pid] = argv
            self._stop.wait(self.interval)


def idle_rss_mib(imports: Sequence[str]) -> float:
    """Peak RSS of a fresh interpreter that only imports ``imports``: what the process costs before any data."""
    code = "import " + ", ".join(imports) + "\nprint(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


# -- the service started apart: a master and n workers, as on n + 1 machines -------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def run_apart(master_flags: Sequence[str], workers: int, log: Path, *, label: str = "ef21",
              master_prefix: Sequence[str] = (), worker_prefixes: Sequence[Sequence[str]] | None = None,
              host: str = "127.0.0.1", port: int = 50051,
              timeout_s: float = 3600) -> tuple[list[dict[str, Any]], float]:
    """``ef21 master --workers N MASTER_FLAGS`` and N ``ef21 worker`` processes started apart: the master under
    ``master_prefix`` (e.g. ``ip netns exec NS``; it then listens on every address) on ``host:port``, worker r
    under ``worker_prefixes[r]``. Returns the per-round log's records and the whole command's seconds (start-up
    included); raises with the master's stderr if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    master = [*master_prefix, sys.executable, "-m", "ef21", "master", "--workers", str(workers), *master_flags,
              "--log", str(log), "--quiet", "--status-port", "-1", "--host", "0.0.0.0" if master_prefix else host,
              "--port", str(port)]
    t0 = time.perf_counter()
    mp = subprocess.Popen(master, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    ws = [subprocess.Popen([*(worker_prefixes[r] if worker_prefixes else []), sys.executable, "-m", "ef21_worker",
                            "--master", f"{host}:{port}", "--connect-timeout", "120"], cwd=ROOT,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
          for r in range(workers)]
    try:
        _, err = mp.communicate(timeout=timeout_s)
        for w in ws:
            try:
                w.wait(timeout=120)
            except subprocess.TimeoutExpired:
                # The master ended the run (its log is whole); a worker still tearing down after 2 minutes on an
                # oversubscribed machine (seen at load 100 on 2 cores) is killed below rather than losing the run.
                if mp.returncode != 0:
                    raise
    finally:
        for p in (mp, *ws):
            if p.poll() is None:
                p.kill()
                p.wait()
    if mp.returncode != 0:
        raise RuntimeError(f"{label}: ef21 master failed ({mp.returncode}): {err.strip()[-2000:]}")
    return [json.loads(line) for line in log.read_text().splitlines()], time.perf_counter() - t0


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so that a benchmark stopped by ``kill PID`` still runs its ``finally`` blocks:
    its child processes are ended and its network namespaces deleted, not left behind."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages: what a shared machine was doing while a benchmark ran."""
    return [round(v, 2) for v in os.getloadavg()]
