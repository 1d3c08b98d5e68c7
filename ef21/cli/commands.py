"""``ef21 simulate`` and ``ef21 plot``: the subcommands that need no network."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ef21.errors import UserError

from .args import ArgumentParser, add_config_args, add_output_args, config_from_args
from .configfile import print_config
from .exits import EXIT_DIVERGED
from .runlog import ensure_parent


def write_outputs(ns: argparse.Namespace, x: np.ndarray) -> None:
    if ns.out is not None:
        try:
            np.save(ensure_parent(ns.out, "--out"), x)
        except OSError as exc:
            raise UserError(f"--out {ns.out}: cannot write ({exc.strerror})") from None
    if ns.plot is not None and ns.log is not None:
        from .plotting import plot_logs

        plot_logs([ns.log], ns.plot, y_axis="gradmap" if getattr(ns, "prox", None) else "grad")


def cmd_simulate(ns: argparse.Namespace) -> int:
    from ef21.engine.simulate import plan_for, simulate
    from ef21.problems.problem import build_problem

    from .progress import Progress
    from .runlog import JsonlWriter

    print_config(ns)
    cfg = config_from_args(ns)
    if ns.eval_every < 1:
        raise UserError(f"--eval-every must be >= 1, got {ns.eval_every}")
    problem = build_problem(cfg)
    plan = plan_for(cfg, problem)
    print(describe_run(cfg, plan.compressor.name, problem.n, problem.d))
    print(plan.constants.describe())
    if cfg.optimizer is not None:
        from ef21.methods.optim import describe

        print(describe(cfg, plan.gamma))
    log_path = ns.log
    if ns.plot is not None and log_path is None:
        log_path = ns.plot.with_suffix(".jsonl")
        ns.log = log_path
    log = JsonlWriter(log_path)
    bar = Progress(cfg.rounds, enabled=not ns.quiet, desc=cfg.method)

    def on_round(rec):  # type: ignore[no-untyped-def]
        log.write(rec.to_dict())
        bar.update(rec.round, rec.grad_norm_sq)

    try:
        result = simulate(cfg, problem, on_round=on_round, eval_every=ns.eval_every)
    finally:
        bar.close()
        log.close()
    last = result.records[-1]
    print(f"round {last.round}: f={_fmt(last.f, '.10g')} |grad f|^2={_fmt(last.grad_norm_sq, '.6e')} "
          f"G={_fmt(last.G, '.3e')} bits/worker={last.bits_per_worker:.0f}"
          + (f" ({result.message})" if result.message else ""))
    write_outputs(ns, result.x)
    if result.stop_reason == "diverged":
        print(f"error: {result.message}; try a smaller --stepsize-mult", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


def _fmt(v: object, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def describe_run(cfg, compressor: str, n: int, d: int) -> str:  # type: ignore[no-untyped-def]
    """One line: the variant, its compressor and the problem."""
    from ef21.methods.variants import variant_name

    k = "" if compressor in ("identity", "sign", "natural", "cnatural") else f" k={cfg.k}"
    if cfg.k_per_tensor is not None and compressor != "identity":
        k = f" k={cfg.k_per_tensor} per tensor" + (f" (at least {cfg.k_floor})" if "." in cfg.k_per_tensor else "")
    what = cfg.objective if cfg.objective is not None else f"{cfg.data or 'no data'} ({cfg.problem})"
    down = "" if cfg.downlink_k is None else f", downlink {cfg.downlink_compressor} K={cfg.downlink_k}"
    return f"{variant_name(cfg)} / {compressor}{k}{down} on {what}, n={n}, d={d}"


def cmd_plot(ns: argparse.Namespace) -> int:
    from .plotting import plot_logs

    if ns.config is not None:  # stdout is the command's own output; say what the file set on stderr
        print_config(ns, file=sys.stderr)
    plot_logs(ns.logs, ns.output, x_axis=ns.x, y_axis=ns.y, labels=ns.labels, title=ns.title)
    print(f"wrote {ns.output}")
    return 0


def add_simulate_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``ef21 simulate``: a run's configuration, its outputs and how often it evaluates."""
    add_config_args(p)
    add_output_args(p)
    p.add_argument("--eval-every", type=int, default=1, metavar="R",
                   help="evaluate f, |grad f|^2 and G every R rounds (as the master's --eval-every; default 1)")


def simulate_parser() -> ArgumentParser:
    """``ef21 simulate``'s flags as a parser of their own (experiment definitions use them as their keys)."""
    p = ArgumentParser(prog="ef21 simulate")
    add_simulate_args(p)
    return p


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``simulate`` and ``plot`` to the ``ef21`` command."""
    sim = sub.add_parser("simulate", help="run a method in one process (no network)")
    add_simulate_args(sim)
    sim.set_defaults(func=cmd_simulate)

    pl = sub.add_parser("plot", help="plot |grad f|^2 of one or more JSONL logs on one figure")
    pl.add_argument("logs", nargs="+", type=Path)
    pl.add_argument("-o", "--output", type=Path, required=True)
    pl.add_argument("--x", default="bits", choices=["bits", "bits-both", "payload", "rounds", "time", "wire",
                                                    "wire-both"])
    pl.add_argument("--y", default="grad", help="grad (|grad f|^2), gradmap (with --prox), f, or metric:NAME")
    pl.add_argument("--labels", nargs="*", default=None)
    pl.add_argument("--title", default=None)
    pl.set_defaults(func=cmd_plot)
