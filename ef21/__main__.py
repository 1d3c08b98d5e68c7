"""The ``ef21`` command (``python -m ef21``), and ``ef21-master`` / ``ef21-worker`` as its two shorthands.

It puts the subcommands together from the rooms that own them: ``simulate`` and ``plot`` from ``ef21.cli``,
``experiment`` from ``ef21.experiments``, and the networked service's ``master``, ``run``, ``status`` (the master's
package) and ``worker`` (the worker's package) when those are installed. Nothing imports this module except the
console scripts and tests: it sits above every room.
"""

from __future__ import annotations

import os

# One BLAS/OpenMP thread per process unless the environment says otherwise, set before numpy loads its BLAS: ef21
# runs a master and several workers side by side, and thread pools that each think they own every core fight
# (a 3·10⁵-long dot product took ~35 ms instead of 0.04 ms with five processes on two cores). A worker's gradient
# also comes out the same whatever the machine's core count. The usual variables change it (OMP_NUM_THREADS=4
# ...); children of `ef21 run` inherit them.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
for _var in THREAD_VARS:
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
from typing import Callable, Sequence  # noqa: E402

from ef21.cli import commands  # noqa: E402
from ef21.cli.args import ArgumentParser  # noqa: E402
from ef21.cli.configfile import add_config_flag, parse_command_line  # noqa: E402
from ef21.cli.exits import EXIT_USAGE  # noqa: E402
from ef21.errors import UserError  # noqa: E402
from ef21.experiments import cli as experiments  # noqa: E402


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="ef21", description="EF21 error-feedback training: simulator, master, workers.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    commands.register(sub)
    experiments.register(sub)
    for register in _service_commands():
        register(sub)
    add_config_flag(p)
    return p


def _service_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Subcommands of the networked service, registered when its packages are installed."""
    try:
        from ef21_server.cli import register as register_server
        from ef21_worker.cli import register as register_worker
    except ModuleNotFoundError as exc:
        # Only the service's own packages may be absent (a core-only install); anything else they fail to import
        # is a broken install that must say so, not turn into "invalid choice: 'master'".
        if exc.name not in ("ef21_server", "ef21_worker"):
            raise
        return []
    return [register_server, register_worker]


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_command_line(build_parser, argv)
    try:
        return int(ns.func(ns) or 0)
    except UserError as exc:
        print(f"ef21 {ns.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"ef21 {ns.command}: interrupted", file=sys.stderr)
        return 130


def master_main(argv: Sequence[str] | None = None) -> int:
    """``ef21-master``: the same as ``ef21 master``."""
    return main(["master", *(sys.argv[1:] if argv is None else argv)])


def worker_main(argv: Sequence[str] | None = None) -> int:
    """``ef21-worker``: the same as ``ef21 worker``."""
    return main(["worker", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
