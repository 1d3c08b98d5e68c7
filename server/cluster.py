"""``ef21 run``: a master in this process and N worker processes on loopback, stopped cleanly on any exit."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

from ef21.progress import Progress
from ef21.simulate import RoundRecord

from .cli import print_summary
from .coordinator import MasterOptions
from .master import ListenOptions, Master

WORKER_EXIT_GRACE_S = 10.0


async def _stop_workers(procs: list[asyncio.subprocess.Process]) -> None:
    """Workers leave by themselves after Stop; whatever is still running after the grace period is ended."""
    async def one(p: asyncio.subprocess.Process) -> None:
        try:
            await asyncio.wait_for(p.wait(), WORKER_EXIT_GRACE_S)
        except asyncio.TimeoutError:
            p.terminate()
            try:
                await asyncio.wait_for(p.wait(), 3.0)
            except asyncio.TimeoutError:
                p.kill()
                await p.wait()

    await asyncio.gather(*(one(p) for p in procs))


async def run_local_cluster(mo: MasterOptions, lo: ListenOptions, *, quiet: bool = False) -> int:
    cfg = mo.config
    bar = Progress(cfg.rounds, enabled=not quiet, desc=f"{cfg.method} x{cfg.workers}")
    printed: list[bool] = []

    def on_round(rec: RoundRecord) -> None:
        if not printed and master.coord.constants is not None:
            printed.append(True)
            print(master.coord.constants.describe(), flush=True)
        bar.update(rec.round, rec.grad_norm_sq)

    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)
    master = Master(mo, lo, on_round=on_round)
    procs: list[asyncio.subprocess.Process] = []
    waiters: set[asyncio.Task] = set()
    failure = ""
    try:
        await master.start()
        host = "127.0.0.1" if lo.host in ("0.0.0.0", "") else lo.host
        target = f"{host}:{master.port}"
        status = "" if master.http is None else f"; status: http://{lo.status_host or host}:{master.http.port}/status"
        print(f"ef21 run: master {target}, {cfg.workers} worker processes{status}", flush=True)
        for i in range(cfg.workers):
            if interrupted.is_set():
                break
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ef21_worker", "--master", target, "--rank", str(i),
                stdin=subprocess.DEVNULL,
                # Own session: a Ctrl-C in the terminal reaches only this process, which stops the run in order.
                start_new_session=True,
            ))
        waiters = {
            asyncio.create_task(master.wait(), name="run"),
            asyncio.create_task(interrupted.wait(), name="signal"),
            *(asyncio.create_task(p.wait(), name=f"worker-{i}") for i, p in enumerate(procs)),
        }
        while not failure:
            done, waiters = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            names = {t.get_name() for t in done}
            if "run" in names:
                break
            if "signal" in names:
                failure = "interrupted"
                break
            for t in done:
                code = t.result()
                if code != 0 and not master.coord.done.is_set():
                    failure = f"{t.get_name()} exited with status {code}"
    finally:
        for t in waiters:
            t.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        bar.close()
        await master.shutdown()
        await _stop_workers(procs)
    if failure:
        print(f"ef21 run: {failure}; run stopped at round {master.coord.round}", file=sys.stderr)
        return 130 if failure == "interrupted" else 1
    print_summary(master)
    if master.coord.stop_reason == "diverged":
        print(f"error: {master.coord.stop_message}; try a smaller --stepsize-mult", file=sys.stderr)
        return 3
    return 0 if master.coord.state == "done" else 1
