"""``ef21 worker`` and the ``ef21-worker`` script."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from ef21.cli.configfile import print_config
from ef21.errors import UserError
from ef21_wire import eventloop
from ef21_wire.eventloop import EVENT_LOOPS

from .channel import add_client_security_args, client_security_from_args
from .client import WorkerFailure, WorkerOptions, run_worker
from .memory import unmap_large_blocks


def check_master_address(target: str) -> None:
    """HOST:PORT (or a gRPC target with a scheme, e.g. unix:PATH or dns:///HOST:PORT), else a one-line error."""
    if target.split(":", 1)[0] in ("unix", "unix-abstract", "dns", "ipv4", "ipv6", "vsock"):
        return
    host, sep, port = target.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise UserError(f"--master {target}: expected HOST:PORT, e.g. 10.0.0.5:50051")


def cmd_worker(ns: argparse.Namespace) -> int:
    check_master_address(ns.master)
    if ns.rank < -1:
        raise UserError(f"--rank must be a rank (0, 1, ...) or -1 for any, got {ns.rank}")
    if not ns.connect_timeout > 0:
        raise UserError(f"--connect-timeout must be positive, got {ns.connect_timeout:g}")
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print_config(ns)
    unmap_large_blocks()
    opts = WorkerOptions(master=ns.master, rank=ns.rank, data=ns.data, objective=ns.objective,
                         connect_timeout=ns.connect_timeout, delay=ns.delay, security=client_security_from_args(ns))
    try:
        reason = eventloop.run(_run_until_signal(opts), ns.event_loop)
    except WorkerFailure as exc:
        print(f"ef21 worker: {exc}", file=sys.stderr)
        return exc.code
    except UserError as exc:
        print(f"ef21 worker: error: {exc}", file=sys.stderr)
        return 2
    if reason is None:
        print("ef21 worker: stopped by signal; left the run", file=sys.stderr)
        return 143
    if ns.verbose:
        print(f"ef21 worker: run ended ({reason})")
    return 0


async def _run_until_signal(opts: WorkerOptions) -> str | None:
    """Run the worker; SIGTERM/SIGINT cancel it, which closes the stream so the master marks the rank gone at once."""
    task = asyncio.create_task(run_worker(opts))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        return None


def register(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("worker", help="join a master and train on this machine's shard")
    w.add_argument("--master", required=True, help="HOST:PORT of the master")
    w.add_argument("--rank", type=int, default=-1, help="ask for this rank (default: any free rank)")
    w.add_argument("--data", default=None, help="path of the dataset on this machine (overrides the master's)")
    w.add_argument("--objective", default=None, metavar="FILE.py:FUNC",
                   help="where the run's objective is on this machine (overrides the master's path; its content "
                        "must be the same)")
    w.add_argument("--connect-timeout", type=float, default=120.0,
                   help="keep trying to join this many seconds while the master cannot be reached, at the start "
                        "and whenever the worker lost it during the run; then exit 4 (default 120)")
    w.add_argument("--delay", type=float, default=0.0, metavar="S",
                   help="testing aid: sleep a random 0..S seconds before each update (simulates a straggler)")
    w.add_argument("--verbose", "-v", action="store_true")
    w.add_argument("--event-loop", choices=EVENT_LOOPS, default="asyncio",
                   help="asyncio (default) or uvloop (pip install 'ef21[fast]')")
    add_client_security_args(w)
    w.set_defaults(func=cmd_worker)
