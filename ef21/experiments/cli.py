"""``ef21 experiment NAME``: run an experiment definition's runs (resumable, in parallel) and write its figures, CSV
and report."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from ef21.cli.configfile import print_config
from ef21.errors import UserError
from ef21.experiments import resolve, shipped

from .runner import Job, Outcome, Runner, is_done, plan, resolve_data
from .schema import load


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("experiment", help="regenerate the paper's results from a named experiment definition",
                       description="Regenerate a figure of the paper: runs in parallel, resumable (finished runs "
                                   "are not redone), figures, CSV and a markdown report under --output-dir. "
                                   f"Shipped experiments: {', '.join(sorted(shipped()))}.")
    e.add_argument("name", metavar="NAME", help="a shipped experiment, or the path of a definition .toml")
    e.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                   help="folder of the LIBSVM files the experiment needs besides the shipped mushrooms "
                        "(named as in LIBSVM: phishing, a9a, w8a)")
    e.add_argument("--output-dir", type=Path, default=None, metavar="DIR",
                   help="where the runs' logs, the figures, the CSV and the report go (default experiments/NAME)")
    e.add_argument("--service", action="store_true",
                   help="run each configuration through the local cluster (ef21 run: master and worker processes "
                        "over gRPC) instead of the simulator")
    e.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                   help="runs at a time (default: the number of cores; 1 with --service, whose runs are already "
                        "n + 1 processes each)")
    e.add_argument("--only", nargs="+", default=None, metavar="PANEL", help="only these panels (e.g. mushrooms)")
    e.add_argument("--redo", action="store_true", help="run again even the runs already done")
    e.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_experiment)


class Progress:
    """A bar in rounds across the whole sweep on a terminal; otherwise one line per finished run."""

    def __init__(self, total_rounds: int, runs: int, *, desc: str, quiet: bool) -> None:
        self.runs, self.done = runs, 0
        self.quiet = quiet
        self._bar: Any = None
        if not quiet and sys.stderr.isatty() and runs:
            from tqdm import tqdm

            self._bar = tqdm(total=total_rounds, desc=desc, unit="round", dynamic_ncols=True, smoothing=0.05)

    def advance(self, rounds: int) -> None:
        if self._bar is not None and rounds > 0:
            self._bar.update(rounds)

    def finished(self, outcome: Outcome) -> None:
        self.done += 1
        s = outcome.job.spec
        what = f"{s.panel} · {s.label}" + ("" if s.sweep_value is None else f" · {s.sweep_value:g}")
        line = f"[{self.done}/{self.runs}] {what}: {outcome.status}" + (f" ({outcome.message})" if outcome.message
                                                                        else "")
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.done}/{self.runs} runs", refresh=False)
            if outcome.status == "failed":
                self._bar.write(line, file=sys.stderr)
        elif not self.quiet or outcome.status == "failed":
            print(line, file=sys.stderr if outcome.status == "failed" else sys.stdout, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def invocation(ns: argparse.Namespace) -> str:
    parts = ["ef21", "experiment", ns.name]
    if ns.data_dir is not None:
        parts += ["--data-dir", str(ns.data_dir)]
    if ns.output_dir is not None:
        parts += ["--output-dir", str(ns.output_dir)]
    if ns.only:
        parts += ["--only", *ns.only]
    if ns.service:
        parts.append("--service")
    return " ".join(shlex.quote(p) for p in parts)


def cmd_experiment(ns: argparse.Namespace) -> int:
    from .report import draw, load_curves, write_csv, write_report

    print_config(ns)
    if ns.jobs is not None and ns.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {ns.jobs}")
    exp = load(resolve(ns.name))
    if ns.only:
        exp = exp.only(list(ns.only))
    data = resolve_data(exp, ns.data_dir)
    out = ns.output_dir if ns.output_dir is not None else Path("experiments") / exp.name
    jobs = plan(exp, data, service=ns.service)
    todo: dict[str, Job] = {}
    for job in jobs:
        if ns.redo or not is_done(out, job.key):
            todo.setdefault(job.key, job)  # two runs of the same configuration run once
    n_jobs = ns.jobs or (1 if ns.service else os.cpu_count() or 1)
    print(f"ef21 experiment {exp.name} (v{exp.version}): {len(jobs)} runs, {len(jobs) - len(todo)} already done, "
          f"{len(todo)} to run, {min(n_jobs, len(todo)) if todo else 0} at a time; output in {out}", flush=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--output-dir {out}: cannot create it ({exc.strerror})") from None
    progress = Progress(sum(j.rounds + 1 for j in todo.values()), len(todo), desc=exp.name, quiet=ns.quiet)

    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # the runs are in sessions of their own: stop them, as on Ctrl-C

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        outcomes = Runner(out, jobs=n_jobs).run_all(list(todo.values()), progress)
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        for o in failed:
            print(f"ef21 experiment: run failed: {o.job.spec.panel} · {o.job.spec.label}: {o.message}",
                  file=sys.stderr)
        print(f"ef21 experiment: {len(failed)} of {len(todo)} runs failed; the finished ones are kept, and the "
              f"report is written once every run has finished", file=sys.stderr)
        return 1
    curves = load_curves(exp, jobs, out)
    stem = out / (exp.name + ("-service" if ns.service else ""))
    figures = draw(exp, curves, stem)
    csv_path = stem.with_suffix(".csv")
    write_csv(exp, curves, csv_path)
    report = stem.with_suffix(".md")
    summary = write_report(exp, curves, report, invocation=invocation(ns), out=out, service=ns.service,
                           figure=figures[0], csv_path=csv_path)
    for line in summary.lines:
        print(line)
    print(f"wrote {report}, {csv_path}, {', '.join(str(f) for f in figures)}")
    return 0
