"""``ef21 run``: a master in this process and N worker processes on loopback, stopped cleanly on any exit."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys

from ef21.cli.configfile import format_config
from ef21.cli.exits import EXIT_JOIN_TIMEOUT
from ef21.cli.progress import Progress
from ef21.engine.records import RoundRecord
from ef21.engine.tree import Tree
from ef21.errors import UserError
from ef21_wire.auth import TOKEN_ENV

from .console import print_summary
from .coordinator import MasterOptions
from .master import ListenOptions, Master
from .security import ServerSecurity

WORKER_EXIT_GRACE_S = 10.0
# A worker's own one-line error ("ef21 worker: ..."): the run reports it once, as its own, instead of relaying it.
WORKER_ERROR_PREFIX = "ef21 worker: "


class _DropWorkerLeft(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "worker_left", False)


async def _relay_stderr(proc: asyncio.subprocess.Process, last_error: dict[int, str], rank: int) -> None:
    """Forward a worker's stderr (warnings) to ours, keeping its final error line for the run's own message."""
    assert proc.stderr is not None
    async for raw in proc.stderr:
        line = raw.decode(errors="replace").rstrip("\n")
        if line.startswith(WORKER_ERROR_PREFIX):
            last_error[rank] = line[len(WORKER_ERROR_PREFIX):].removeprefix("error: ")
        else:
            print(line, file=sys.stderr, flush=True)


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


async def start_aggregators(master: str, n: int, F: int, env: dict[str, str], event_loop: str,
                            verbose: bool) -> list[tuple[asyncio.subprocess.Process, str]]:
    """F ``ef21 aggregator`` processes for the master at ``master``, one a block; each says its port first."""
    out: list[tuple[asyncio.subprocess.Process, str]] = []
    for j in range(F):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ef21", "aggregator", "--master", master, "--block", str(j), "--port", "0",
            "--event-loop", event_loop, *(["-v"] if verbose else []),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=None, env=env, start_new_session=True)
        out.append((proc, ""))
    for j, (proc, _) in enumerate(out):
        assert proc.stdout is not None
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), 60.0)).decode()
        except asyncio.TimeoutError:
            line = ""
        if " listening on " not in line:
            raise UserError(f"aggregator {j} did not start: {line.strip() or 'no output'}")
        address = line.split(" listening on ", 1)[1].split(",", 1)[0]
        print(f"ef21 run: aggregator {j}: pid {proc.pid}, {address}", flush=True)
        out[j] = (proc, address)
    return out


async def _stop_aggregators(procs: list[asyncio.subprocess.Process]) -> None:
    """Aggregators leave after the run's Stop; one still there once the workers have gone (a failed start, a
    run that never began) is ended."""
    for p in procs:
        if p.returncode is None:
            try:
                p.terminate()
            except ProcessLookupError:  # it has just left by itself
                pass
    for p in procs:
        try:
            await asyncio.wait_for(p.wait(), 5.0)
        except asyncio.TimeoutError:
            p.kill()
            await p.wait()


async def run_local_cluster(mo: MasterOptions, lo: ListenOptions, sec: ServerSecurity | None = None, *,
                            quiet: bool = False, max_restarts: int = 3, event_loop: str = "asyncio",
                            verbose: bool = False) -> int:
    """Master here, workers as child processes. A worker that dies is started again (same rank: it continues
    from the master's copy of its state), up to ``max_restarts`` times in all.

    The run's effective configuration is printed once, then one line per worker process; ``verbose`` passes
    ``-v`` on to the workers, whose own output (their configuration, their logs) then shows too."""
    cfg = mo.config
    sec = sec or ServerSecurity()
    if sec.tls:
        raise UserError("ef21 run is a loopback cluster without TLS; use ef21 master and ef21 worker for TLS")
    env = dict(os.environ)
    if sec.token is not None:
        env[TOKEN_ENV] = sec.token  # the environment, not the command line, so it does not show in ps
    bar = Progress(cfg.rounds, enabled=not quiet, desc=f"{cfg.method} x{cfg.workers}")
    printed: list[bool] = []

    def on_round(rec: RoundRecord) -> None:
        if not printed and master.coord.constants is not None:
            printed.append(True)
            print(master.coord.constants.describe(), flush=True)
        bar.update(rec.round, rec.grad_norm_sq)

    # A worker that leaves with an error ends the run with that error as our one line; not twice.
    quiet_leaves = _DropWorkerLeft()
    logging.getLogger("ef21.master").addFilter(quiet_leaves)
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)
    master = Master(mo, lo, security=sec, on_round=on_round)
    procs: list[asyncio.subprocess.Process] = []
    procs_agg: list[asyncio.subprocess.Process] = []
    waiters: set[asyncio.Task] = set()
    relays: list[asyncio.Task] = []
    last_error: dict[int, str] = {}
    failure = ""
    usage_error = False
    try:
        await master.start()
        host = "127.0.0.1" if lo.host in ("0.0.0.0", "") else lo.host
        target = f"{host}:{master.port}"
        status = "" if master.http is None else f"; status: http://{lo.status_host or host}:{master.http.port}/status"
        print(f"ef21 run: master {target}, {cfg.workers} worker processes{status}", flush=True)
        if master.status_url is not None:
            print(f"ef21 run: dashboard {master.status_url}" + (
                "#token=RUN_TOKEN (--status-token: the page sends the token from the URL fragment)"
                if sec.status_token else "") + f"; Prometheus: {master.status_url}metrics", flush=True)
        if mo.effective_config:  # after the address line, which scripts read first
            print(f"ef21 run: configuration: {format_config(mo.effective_config)}", flush=True)
        targets = [target] * cfg.workers
        if cfg.aggregators:
            aggs = await start_aggregators(target, cfg.workers, cfg.aggregators, env, event_loop, verbose)
            procs_agg.extend(p for p, _ in aggs)
            tree = Tree(cfg.workers, cfg.aggregators)
            targets = [aggs[tree.block_of(r)][1] for r in range(cfg.workers)]

        async def spawn(rank: int) -> asyncio.subprocess.Process:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ef21_worker", "--master", targets[rank], "--rank", str(rank),
                "--event-loop", event_loop, *(["-v"] if verbose else []),
                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                # The run's configuration was printed once above; a worker's would repeat it n times.
                stdout=None if verbose else subprocess.DEVNULL,
                # Own session: a Ctrl-C in the terminal reaches only this process, which stops the run in order.
                start_new_session=True,
            )
            relays.append(asyncio.create_task(_relay_stderr(proc, last_error, rank), name=f"stderr-{rank}"))
            print(f"ef21 run: worker rank {rank}: pid {proc.pid}", flush=True)
            return proc

        for i in range(cfg.workers):
            if interrupted.is_set():
                break
            procs.append(await spawn(i))
        waiters = {
            asyncio.create_task(master.wait(), name="run"),
            asyncio.create_task(interrupted.wait(), name="signal"),
            *(asyncio.create_task(p.wait(), name=f"worker-{i}") for i, p in enumerate(procs)),
        }
        restarts = 0
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
                if code == 0 or master.coord.done.is_set():
                    continue
                rank = int(t.get_name().split("-")[1])
                if code == 2:
                    # Bad input (the objective failed on this worker): starting it again would fail the same way.
                    await asyncio.sleep(0.1)  # let the relay read the worker's last line
                    failure = last_error.get(rank) or f"{t.get_name()} exited with status 2"
                    usage_error = True
                    break
                if restarts >= max_restarts:
                    failure = f"{t.get_name()} exited with status {code} (after {restarts} restarts)"
                    break
                restarts += 1
                print(f"ef21 run: {t.get_name()} exited with status {code}; restarting it "
                      f"({restarts}/{max_restarts})", file=sys.stderr, flush=True)
                procs[rank] = await spawn(rank)
                waiters.add(asyncio.create_task(procs[rank].wait(), name=f"worker-{rank}"))
    finally:
        for t in waiters:
            t.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        bar.close()
        await master.shutdown()
        await _stop_workers(procs)
        await _stop_aggregators(procs_agg)
        logging.getLogger("ef21.master").removeFilter(quiet_leaves)
        for r in relays:
            r.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
    if usage_error:
        print(f"ef21 run: error: {failure}", file=sys.stderr)
        return 2
    if failure:
        print(f"ef21 run: {failure}; run stopped at round {master.coord.round}", file=sys.stderr)
        return 130 if failure == "interrupted" else 1
    print_summary(master)
    if master.coord.stop_reason == "join-timeout":
        print(f"ef21 run: error: {master.coord.stop_message}", file=sys.stderr)
        return EXIT_JOIN_TIMEOUT
    if master.coord.stop_reason == "diverged":
        print(f"error: {master.coord.stop_message}; try a smaller --stepsize-mult", file=sys.stderr)
        return 3
    return 0 if master.coord.state == "done" else 1
