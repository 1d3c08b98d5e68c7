"""A real ef21 run in network namespaces (``tests.netns``): a master and n worker processes, each in a node of
its own, with the master's status, the processes' logs as timed events, and their exit statuses.

    with Network(["m", "w0", "w1", ...]) as net:
        run = ChaosRun(net, tmp, ["--workers", "4", ...])
        run.start()
        run.wait_round(100)
        net.link_down("w1"); ...
        result = run.finish(timeout=120)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Sequence

from .netns import Network

PORT = 50051
STATUS_PORT = 8080
ROOT = Path(__file__).resolve().parents[1]
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\S+) (\w+) (.*)$")


@dataclass(frozen=True)
class Event:
    t: float
    """Wall-clock time (the processes and the test share one clock)."""
    who: str
    level: str
    message: str


@dataclass
class RunResult:
    master_code: int | None
    worker_codes: list[int | None]
    events: list[Event] = field(default_factory=list)
    started_at: float | None = None
    """When round 0 started (the master's ``start:`` line)."""
    log: list[dict] = field(default_factory=list)

    def find(self, who: str, pattern: str, after: float = 0.0) -> Event | None:
        """The first event of ``who`` (``master``, ``w1``, …) matching ``pattern`` at or after ``after``."""
        rx = re.compile(pattern)
        return next((e for e in self.events if e.who == who and e.t >= after and rx.search(e.message)), None)

    def round_at(self, t: float) -> int | None:
        """The round in progress at wall-clock time t, from the log's elapsed times."""
        if self.started_at is None:
            return None
        closed = [r["round"] for r in self.log if self.started_at + r["elapsed_s"] <= t]
        return (max(closed) + 1) if closed else 0

    def missing(self) -> dict[int, list[int]]:
        return {r["round"]: r["missing"] for r in self.log if r.get("missing")}


class ChaosRun:
    """``master_args``: the run's flags (``--workers`` among them); the node names are ``m`` and ``w0`` …"""

    def __init__(self, net: Network, tmp: Path, master_args: Sequence[str], *, workers: int,
                 worker_args: Sequence[str] = (), relay_ms: tuple[float, float] | None = None) -> None:
        self.net, self.tmp, self.n = net, tmp, workers
        self.master_args = list(master_args)
        self.worker_args = list(worker_args)
        self.relay_ms = relay_ms
        self.master: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.relays: list[subprocess.Popen] = []
        self.log_path = tmp / "run.jsonl"
        self.out = tmp / "x.npy"

    def _err(self, who: str) -> Path:
        return self.tmp / f"{who}.err"

    def start_master(self, *extra: str) -> None:
        cmd = [sys.executable, "-m", "ef21", "master", "--host", "0.0.0.0", "--port", str(PORT), "--status-port",
               str(STATUS_PORT), "--log", str(self.log_path), "--out", str(self.out), "-v", *self.master_args, *extra]
        self.master = self.net.popen("m", cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self._err("master"), "a"))

    def start_workers(self) -> None:
        for r in range(self.n):
            node = f"w{r}"
            target = f"{self.net.addr('m')}:{PORT}"
            if self.relay_ms is not None:
                self.relays.append(self.net.relay(node, 40000, target, delay_ms=self.relay_ms, seed=r))
                target = "127.0.0.1:40000"
            cmd = [sys.executable, "-m", "ef21_worker", "--master", target, "--rank", str(r), "-v",
                   *self.worker_args]
            self.workers.append(self.net.popen(node, cmd, cwd=ROOT, stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL, stderr=open(self._err(node), "a")))

    def start(self) -> None:
        self.start_master()
        self.start_workers()

    def status(self) -> dict | None:
        """The master's status document, or None while it does not answer."""
        def get() -> dict | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{STATUS_PORT}/status", timeout=2) as r:
                    return json.loads(r.read())
            except OSError:
                return None
        return self.net.call_in("m", get)

    def wait_round(self, r: int, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self.status()
            if doc is not None and doc["round"] >= r:
                return doc
            if self.master is not None and self.master.poll() is not None:
                raise AssertionError(f"the master exited ({self.master.returncode}) before round {r}:\n"
                                     + self._err("master").read_text()[-3000:])
            time.sleep(0.1)
        raise AssertionError(f"round {r} not reached in {timeout:g} s:\n" + self._err("master").read_text()[-3000:])

    def kill_master(self) -> None:
        assert self.master is not None
        self.master.kill()
        self.master.wait(10)

    def finish(self, timeout: float) -> RunResult:
        """Wait for every process (killing what outlives ``timeout``) and read what they left."""
        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        for p in [self.master, *self.workers]:
            if p is None:
                continue
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
                codes.append(None)  # killed: it hung
                continue
            codes.append(p.returncode)
        self.close()
        events = [*self._events("master"), *(e for r in range(self.n) for e in self._events(f"w{r}"))]
        events.sort(key=lambda e: e.t)
        log = [json.loads(line) for line in self.log_path.read_text().splitlines()] if self.log_path.exists() else []
        start = next((e.t for e in events if e.who == "master" and e.message.startswith("start:")), None)
        return RunResult(codes[0], codes[1:], events, start, log)

    def close(self) -> None:
        for p in [self.master, *self.workers, *self.relays]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)

    def _events(self, who: str) -> list[Event]:
        path = self._err(who)
        if not path.exists():
            return []
        out = []
        for line in path.read_text(errors="replace").splitlines():
            m = _STAMP.match(line)
            if m:
                t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                out.append(Event(t, who, m.group(3), m.group(4)))
        return out

    def stderr(self, who: str) -> str:
        return self._err(who).read_text(errors="replace")
