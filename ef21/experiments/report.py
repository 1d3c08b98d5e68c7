"""What an experiment leaves behind: figures (PNG and SVG), a CSV of every curve and a markdown report with the
exact commands and the reference numbers next to ours."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ef21.cli.runlog import read_jsonl

from .runner import Job, display_command, log_path, record_path
from .schema import METRIC_TEXT, METRICS, X_AXES, Experiment

X_LABELS = {"bits": "bits per worker (32 per value, the paper's count)", "payload": "payload bits per worker",
            "bits-both": "uplink + downlink bits per worker (32 per value)", "rounds": "round",
            "time": "wall time (s)"}


@dataclass
class Curve:
    job: Job
    rows: list[dict[str, Any]]
    metric: list[float | None]
    diverged: bool
    record: dict[str, Any] = field(default_factory=dict)

    def first_below(self, threshold: float) -> dict[str, Any] | None:
        for row, m in zip(self.rows, self.metric):
            if m is not None and m < threshold:
                return row
        return None

    @property
    def final(self) -> float | None:
        """The metric at the last round (None when the run diverged or the last value is unknown)."""
        if self.diverged:
            return None
        for m in reversed(self.metric):
            if m is not None:
                return m
        return None


def least_squares_solution(flags: dict[str, Any]) -> tuple[np.ndarray, float]:
    """x* and f* of a least-squares run's problem f = (1/n) Σ (1/N_i)‖A_i x − b_i‖²: a lstsq of the rows scaled by
    1/√N_i (the common 1/n does not move the minimizer); f* is evaluated by the run's own objectives."""
    from ef21.cli.args import config_from_args
    from ef21.problems.problem import build_problem

    from .schema import command_args, simulate_namespace

    cfg = config_from_args(simulate_namespace(command_args(flags)))
    problem = build_problem(cfg)
    blocks = [(o.A / math.sqrt(o.A.shape[0]), o.b / math.sqrt(o.A.shape[0])) for o in problem.objectives]
    x_star = np.linalg.lstsq(np.vstack([a for a, _ in blocks]), np.concatenate([b for _, b in blocks]), rcond=None)[0]
    return x_star, math.fsum(o.value_and_grad(x_star)[0] for o in problem.objectives) / problem.n


def load_curves(exp: Experiment, jobs: list[Job], out: Path) -> list[Curve]:
    import json

    curves = []
    for job in jobs:
        rows = read_jsonl(log_path(out, job.key))
        for r in rows:
            if r.get("bits_down_per_worker") is not None:
                r["bits_both"] = r["bits_per_worker"] + r["bits_down_per_worker"]
        record = json.loads(record_path(out, job.key).read_text())
        key = "grad_norm_sq" if exp.metric == "grad_norm_sq" else "f"
        curves.append(Curve(job, rows, [r.get(key) for r in rows], bool(record.get("diverged")), record))
    if exp.metric == "f_gap":
        # f depends on the data and its split (f = (1/n) Σ f_i), not on the method: one f* per (data, split).
        groups: dict[tuple[str, Any, Any], list[Curve]] = {}
        for c in curves:
            f = c.job.spec.flags
            groups.setdefault((_data_arg(c.job), f.get("workers"), f.get("shuffle")), []).append(c)
        for mine in groups.values():
            # lstsq's f* is exact to rounding; a run may get below it by rounding, so the lowest f seen bounds it.
            seen = [m for c in mine for m in c.metric if m is not None and math.isfinite(m)]
            fs = min([least_squares_solution(mine[0].job.spec.flags | {"data": _data_arg(mine[0].job)})[1], *seen])
            for c in mine:
                c.metric = [None if m is None else m - fs for m in c.metric]
                c.record["f_star"] = fs
    return curves


def _data_arg(job: Job) -> str:
    args = list(job.args)
    return args[args.index("--data") + 1]


# -- figures ---------------------------------------------------------------------------------------------------------

def draw(exp: Experiment, curves: list[Curve], stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    panels = list(exp.panels)
    cols = 2 if len(panels) == 4 else min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        mine = [c for c in curves if c.job.spec.panel == panel.name]
        if exp.kind == "curves":
            key = X_AXES[exp.x]
            for c in mine:
                pts = [(r.get(key), m) for r, m in zip(c.rows, c.metric)
                       if r.get(key) is not None and m is not None and m > 0 and math.isfinite(m)]
                if pts:
                    ax.semilogy([p[0] for p in pts], [p[1] for p in pts], label=c.job.spec.label, lw=1.4)
            ax.set_xlabel(X_LABELS[exp.x])
            if panel.x_max is not None:
                starts = [r[key] for c in mine for r in c.rows[:1] if r.get(key) is not None]
                ax.set_xlim(min(starts, default=0), panel.x_max)
                visible = [m for c in mine for r, m in zip(c.rows, c.metric)
                           if m is not None and m > 0 and (r.get(key) or 0) <= panel.x_max]
                if visible:
                    ax.set_ylim(min(visible) / 2, max(visible) * 2)
            if exp.x in ("bits", "bits-both", "payload"):
                ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 200k, 1M: long counts do not collide
        else:
            finals = [c.final for c in mine if c.final is not None and c.final > 0]
            top = 10 * max(finals) if finals else 1.0
            for label in dict.fromkeys(c.job.spec.label for c in mine):
                line = [c for c in mine if c.job.spec.label == label]
                pts = [(c.job.spec.sweep_value, c.final) for c in line if c.final is not None and c.final > 0]
                (drawn,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3.5, label=label)
                div = [c.job.spec.sweep_value for c in line if c.diverged]
                if div:
                    ax.scatter(div, [top] * len(div), marker="x", color=drawn.get_color())
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(f"{exp.sweep_key} (x: diverged)")
        ax.set_title(panel.title)
        ax.set_ylabel(("final " if exp.kind == "sweep" else "") + METRICS[exp.metric])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(exp.title, fontsize=10)
    fig.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p, dpi=120)
    plt.close(fig)
    return paths


# -- CSV -------------------------------------------------------------------------------------------------------------

CSV_COLUMNS = ["experiment", "panel", "label", "sweep_value", "run_key", "round", "bits_per_worker",
               "payload_bits_per_worker", "f", "grad_norm_sq", "G", "metric"]


def write_csv(exp: Experiment, curves: list[Curve], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for c in curves:
            s = c.job.spec
            for row, m in zip(c.rows, c.metric):
                w.writerow([exp.name, s.panel, s.label, "" if s.sweep_value is None else _num(s.sweep_value),
                            c.job.key, row["round"], _cell(row.get("bits_per_worker")),
                            _cell(row.get("payload_bits_per_worker")), _cell(row.get("f")),
                            _cell(row.get("grad_norm_sq")), _cell(row.get("G")), _cell(m)])


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v) if isinstance(v, float) else str(v)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


# -- markdown --------------------------------------------------------------------------------------------------------

@dataclass
class Summary:
    compared: int = 0
    matched: int = 0
    lines: list[str] = field(default_factory=list)


def _bits(v: float | None) -> str:
    return "NA" if v is None else f"{v:,.0f}"


def _thr(t: float) -> str:
    return f"{t:.0e}".replace("e-0", "e-").replace("e+0", "e")


def write_report(exp: Experiment, curves: list[Curve], path: Path, *, invocation: str, out: Path,
                 service: bool, figure: Path, csv_path: Path) -> Summary:
    summary = Summary()
    ref = exp.reference_label
    mode = "the local cluster (`ef21 run`: a master and worker processes over gRPC)" if service else \
        "the simulator (`ef21 simulate`)"
    md = [f"# {exp.title}", "", exp.description.strip(), "",
          f"Definition `{exp.name}` version {exp.version}; every run through {mode}. Regenerate with:", "",
          "```bash", invocation, "```", "",
          f"![{exp.name}]({figure.name})", "",
          f"Curves: [`{csv_path.name}`]({csv_path.name}) (one row per run and round). {len(curves)} runs, "
          f"{sum(c.record.get('elapsed_s', 0.0) for c in curves) / 60:.1f} min of run time in all.", ""]
    metric = METRIC_TEXT[exp.metric]
    for panel in exp.panels:
        mine = [c for c in curves if c.job.spec.panel == panel.name]
        md += [f"## {panel.title}", ""]
        if exp.kind == "curves":
            md += _curves_table(exp, mine, summary, ref, metric)
        else:
            md += _sweep_table(exp, mine, metric)
        if exp.metric == "f_gap" and mine:
            md += ["", f"f* = {mine[0].record['f_star']:.17g} (least squares on the whole problem; the lowest f of "
                       f"any run if that is lower)."]
        if panel.note:
            md += ["", panel.note.strip()]
        md.append("")
    if summary.compared:
        line = f"**{summary.matched} of {summary.compared}** {ref} numbers reproduced exactly."
        md[md.index(f"![{exp.name}]({figure.name})"):md.index(f"![{exp.name}]({figure.name})")] = [line, ""]
        summary.lines.append(line.replace("**", ""))
    md += ["## Commands", "", "Each run, exactly as it ran (its log is `runs/KEY.jsonl` under the output folder):",
           "", "```bash"]
    md += [display_command(c.job, out) for c in curves]
    md += ["```", ""]
    path.write_text("\n".join(md), encoding="utf-8")
    return summary


def _curves_table(exp: Experiment, mine: list[Curve], summary: Summary, ref: str, metric: str) -> list[str]:
    thr = exp.thresholds
    has_ref = any(c.job.spec.reference is not None for c in mine)
    head = ["run"] + [f"bits/n to {_thr(t)}" + (f" (ours / {ref})" if has_ref else "") for t in thr] + \
        [f"rounds to {_thr(thr[-1])}" if thr else "rounds", f"last {metric}", "stop"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in mine:
        cells = [c.job.spec.label]
        for i, t in enumerate(thr):
            row = c.first_below(t)
            bits = X_AXES[exp.x] if exp.x in ("bits", "bits-both", "payload") else "bits_per_worker"
            ours = None if row is None else float(row[bits])
            cell = _bits(ours)
            if c.job.spec.reference is not None:
                theirs = c.job.spec.reference[i]
                same = ours == theirs
                summary.compared += 1
                summary.matched += same
                cell = f"{_bits(ours)} / {_bits(theirs)} {'✓' if same else '✗'}"
            cells.append(cell)
        last = c.first_below(thr[-1]) if thr else None
        cells.append(str(last["round"]) if last is not None else f"> {c.rows[-1]['round']}")
        final = c.final
        cells.append("diverged" if c.diverged else "-" if final is None else f"{final:.3e}")
        cells.append(_stop(c))
        out.append("| " + " | ".join(cells) + " |")
    return out


def _sweep_table(exp: Experiment, mine: list[Curve], metric: str) -> list[str]:
    values = list(dict.fromkeys(c.job.spec.sweep_value for c in mine))
    head = [f"final {metric} \\ {exp.sweep_key}"] + [f"{_num(v)}×" if exp.sweep_key == "stepsize-mult" else _num(v)
                                                     for v in values]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in dict.fromkeys(c.job.spec.label for c in mine):
        cells = [label]
        for v in values:
            c = next(c for c in mine if c.job.spec.label == label and c.job.spec.sweep_value == v)
            cells.append("diverged" if c.diverged else "-" if c.final is None else f"{c.final:.1e}")
        out.append("| " + " | ".join(cells) + " |")
    return out


def _stop(c: Curve) -> str:
    text = c.record.get("outcome", "")
    if c.diverged:
        return "diverged"
    if "< tol" in text:
        return f"{METRIC_TEXT['grad_norm_sq']} < tol"
    if "rounds done" in text:
        return "round limit"
    return text.replace("|", "\\|")
