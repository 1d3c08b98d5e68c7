"""Real processes and sockets for the service tests: an in-process master on port 0, worker subprocesses."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from ef21_server.coordinator import MasterOptions
from ef21_server.master import ListenOptions, Master


async def spawn_worker(target: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ef21_worker", "--master", target, *args,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


@asynccontextmanager
async def running_master(opts: MasterOptions, *, status: bool = True) -> AsyncIterator[Master]:
    master = Master(opts, ListenOptions(host="127.0.0.1", port=0, status_port=0 if status else None, drain_s=2.0))
    await master.start()
    try:
        yield master
    finally:
        await master.shutdown()


async def finish(procs: list[asyncio.subprocess.Process], timeout: float = 60.0) -> list[tuple[int, str]]:
    """Wait for worker processes; returns (exit status, stderr) of each, killing any that hang."""
    out = []
    for p in procs:
        try:
            _, err = await asyncio.wait_for(p.communicate(), timeout)
        except asyncio.TimeoutError:
            p.kill()
            _, err = await p.communicate()
        out.append((p.returncode, err.decode()))
    return out


def http_get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def eventually(pred: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def ef21_cli(*args: str, timeout: float = 180, **kw) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    """The ``ef21`` command line, run for real in a new process (output captured as text)."""
    return subprocess.run([sys.executable, "-m", "ef21", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """Bad input's promise: exit status 2 and exactly one line on stderr, no traceback. Returns the line."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]
