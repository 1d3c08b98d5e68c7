"""Experiment definitions: a TOML file names panels (usually one per dataset) and the runs drawn in each.

A run is an ``ef21 simulate`` configuration written with the same keys as a config file (``method``, ``k``,
``stepsize-mult``, … : the long flag names), checked against the simulate parser itself, so a method or flag added
to the simulator is usable in a definition without a change here. Layout::

    name = "finetuned"              # what `ef21 experiment NAME` calls it (the file is NAME.toml)
    version = 1                     # bump when the runs change meaning; shown in the report
    title = "…"
    description = "…"               # a paragraph for the report (markdown)
    kind = "curves"                 # curves: metric against x per run; sweep: final metric against a swept flag
    metric = "grad_norm_sq"         # or "f_gap" (f − f*, least squares only)
    x = "bits"                      # curves: bits | bits-both (up + down) | payload | rounds | time
    thresholds = [1e-4, 1e-6, 1e-7] # report bits/n (and rounds) to metric < each threshold
    reference-label = "§8"          # what the reference numbers are called in the report

    [defaults]                      # flags of every run
    workers = 20
    [sweep]                         # kind = "sweep" only: every run once per value
    key = "stepsize-mult"
    values = [1, 2, 4]
    [[run]]                         # runs drawn in every panel
    label = "EF21"
    method = "ef21"

    [[panel]]
    name = "phishing"
    data = "phishing"               # a shipped name, synthetic:N:D[:SEED], or a LIBSVM file name looked up in --data-dir
    note = "…"                      # shown under the panel's table (e.g. what the reference says, in its words)
    x-max = 130000                  # curves: the figure's x axis ends here (GD's long tail would squash the rest)
    [panel.defaults]                # flags of this panel's runs
    [[panel.run]]                   # runs of this panel only
    label = "EF21 (k=1, 16×)"
    method = "ef21"
    reference = [7680, 10688, 12128]  # the reference's bits/n to each threshold; "NA" where it never gets there

Precedence of flags: [defaults] < the panel's data < [panel.defaults] < the run's own < the sweep value.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ef21.cli.commands import simulate_parser
from ef21.cli.configfile import ConfigError, Option, canonical_key, command_options, convert, read_toml
from ef21.errors import UserError

KINDS = ("curves", "sweep")
METRICS = {"grad_norm_sq": r"$\|\nabla f(x^t)\|^2$", "f_gap": r"$f(x^t) - f^\star$"}
METRIC_TEXT = {"grad_norm_sq": "‖∇f‖²", "f_gap": "f − f*"}
X_AXES = {"bits": "bits_per_worker", "bits-both": "bits_both", "payload": "payload_bits_per_worker",
          "rounds": "round", "time": "elapsed_s"}
"""``bits-both``: uplink + downlink bits per worker (derived from the log's ``bits_down_per_worker``): what
EF21-BC is about."""
RUNNER_FLAGS = ("log", "out", "plot", "quiet", "config")
"""Flags the runner sets itself (each run's log goes under the output folder); a definition may not."""
TOP_KEYS = {"name", "version", "title", "description", "kind", "metric", "x", "thresholds", "reference-label",
            "defaults", "sweep", "run", "panel"}
PANEL_KEYS = {"name", "data", "title", "note", "source", "x-max", "defaults", "run"}
RUN_KEYS = {"label", "reference"}


@dataclass(frozen=True)
class Panel:
    name: str
    data: str
    title: str
    note: str = ""
    source: str = ""
    """Where to get the data file, for the error when it is missing."""
    x_max: float | None = None
    """The figure's x axis ends here (the runs still go their full length, and the tables and CSV hold it all)."""


@dataclass(frozen=True)
class RunSpec:
    panel: str
    label: str
    """The legend label; in a sweep, the line the run belongs to."""
    flags: dict[str, Any]
    """ef21 simulate flags by key (``stepsize-mult``), as converted by the parser's types (``data`` as written)."""
    reference: tuple[float | None, ...] | None = None
    sweep_value: float | None = None

    def config_key(self, mode: str, data_identity: str) -> str:
        """The run's identity: mode, flags and the data's content; its logs are filed under this hash."""
        flags = {k: v for k, v in self.flags.items() if k != "data"}
        doc = {"format": 1, "mode": mode, "flags": flags, "data": data_identity}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Experiment:
    name: str
    version: int
    title: str
    description: str
    kind: str
    metric: str
    x: str
    thresholds: tuple[float, ...]
    reference_label: str
    panels: tuple[Panel, ...]
    runs: tuple[RunSpec, ...]
    sweep_key: str | None = None
    sweep_values: tuple[float, ...] = ()
    path: Path | None = field(default=None, compare=False)

    def panel(self, name: str) -> Panel:
        return next(p for p in self.panels if p.name == name)

    def only(self, names: list[str]) -> Experiment:
        """The same experiment restricted to some panels."""
        unknown = [n for n in names if n not in {p.name for p in self.panels}]
        if unknown:
            raise UserError(f"--only: experiment {self.name} has no panel {unknown[0]!r} "
                            f"(panels: {', '.join(p.name for p in self.panels)})")
        return Experiment(self.name, self.version, self.title, self.description, self.kind, self.metric, self.x,
                          self.thresholds, self.reference_label,
                          tuple(p for p in self.panels if p.name in names),
                          tuple(r for r in self.runs if r.panel in names), self.sweep_key, self.sweep_values,
                          self.path)


def _simulate_options() -> dict[str, Option]:
    return command_options(simulate_parser())  # the simulate command's own flags are the definition's keys


def load(path: Path) -> Experiment:
    """Read and check a definition; errors are one line naming the file and the key."""
    try:
        return _parse(read_toml(path, str(path), missing="no such experiment definition"), path)
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def _get(doc: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in doc:
        if default is ...:
            raise ConfigError(f"{where}: missing key '{key}'")
        return default
    v = doc[key]
    if not isinstance(v, typ) or (isinstance(v, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,))):
        names = {str: "a string", int: "an integer", float: "a number", list: "an array", dict: "a table"}
        want = " or ".join(names.get(t, t.__name__) for t in (typ if isinstance(typ, tuple) else (typ,)))
        raise ConfigError(f"{where}: key '{key}' must be {want}, got {type(v).__name__} ({v!r})")
    return v


def _unknown(doc: dict[str, Any], allowed: set[str], where: str, also: set[str] | None = None) -> None:
    for key in doc:
        if canonical_key(key) not in allowed and (also is None or canonical_key(key) not in also):
            raise ConfigError(f"{where}: unknown key '{key}'")


def _flags(table: dict[str, Any], where: str, options: dict[str, Option]) -> dict[str, Any]:
    """Flags of a table, by canonical key, checked and converted with the simulate parser's own types."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        k = canonical_key(key)
        if k in RUN_KEYS:
            continue
        if k in RUNNER_FLAGS:
            raise ConfigError(f"{where}: '{key}' is set by ef21 experiment itself (each run's log goes under --out)")
        if k not in options:
            raise ConfigError(f"{where}: unknown key '{key}' (not a flag of ef21 simulate)")
        out[k] = convert(options[k], value, where)
    return out


def _reference(run: dict[str, Any], n: int, where: str) -> tuple[float | None, ...] | None:
    ref = run.get("reference")
    if ref is None:
        return None
    if not isinstance(ref, list) or len(ref) != n:
        raise ConfigError(f"{where}: 'reference' must be an array of {n} numbers (one per threshold), got {ref!r}")
    out: list[float | None] = []
    for v in ref:
        if v == "NA":
            out.append(None)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
        else:
            raise ConfigError(f"{where}: 'reference' entries are numbers or \"NA\", got {v!r}")
    return tuple(out)


def _parse(doc: dict[str, Any], path: Path) -> Experiment:
    where = str(path)
    _unknown(doc, TOP_KEYS, where)
    name = _get(doc, "name", str, where)
    version = _get(doc, "version", int, where)
    kind = _get(doc, "kind", str, where)
    if kind not in KINDS:
        raise ConfigError(f"{where}: 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    metric = _get(doc, "metric", str, where, "grad_norm_sq")
    if metric not in METRICS:
        raise ConfigError(f"{where}: 'metric' must be one of {', '.join(METRICS)}, got {metric!r}")
    x = _get(doc, "x", str, where, "bits")
    if x not in X_AXES:
        raise ConfigError(f"{where}: 'x' must be one of {', '.join(X_AXES)}, got {x!r}")
    thresholds = _get(doc, "thresholds", list, where, [])
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in thresholds):
        raise ConfigError(f"{where}: 'thresholds' must be positive numbers, got {thresholds!r}")
    options = _simulate_options()
    defaults = _flags(_get(doc, "defaults", dict, where, {}), f"{where} [defaults]", options)
    sweep_key, sweep_values = None, ()
    if kind == "sweep":
        sweep = _get(doc, "sweep", dict, where)
        _unknown(sweep, {"key", "values"}, f"{where} [sweep]")
        sweep_key = canonical_key(_get(sweep, "key", str, f"{where} [sweep]"))
        if sweep_key not in options:
            raise ConfigError(f"{where} [sweep]: key '{sweep_key}' is not a flag of ef21 simulate")
        values = _get(sweep, "values", list, f"{where} [sweep]")
        if not values:
            raise ConfigError(f"{where} [sweep]: 'values' is empty")
        sweep_values = tuple(convert(options[sweep_key], v, f"{where} [sweep]") for v in values)
    elif "sweep" in doc:
        raise ConfigError(f"{where}: [sweep] needs kind = \"sweep\"")
    shared_runs = _get(doc, "run", list, where, [])
    panels_doc = _get(doc, "panel", list, where)
    if not panels_doc:
        raise ConfigError(f"{where}: no [[panel]]")
    panels: list[Panel] = []
    runs: list[RunSpec] = []
    for i, p in enumerate(panels_doc):
        pw = f"{where} [[panel]] #{i + 1}"
        if not isinstance(p, dict):
            raise ConfigError(f"{pw}: must be a table")
        _unknown(p, PANEL_KEYS, pw)
        pname = _get(p, "name", str, pw)
        if pname in {q.name for q in panels}:
            raise ConfigError(f"{pw}: panel name {pname!r} is used twice")
        x_max = _get(p, "x-max", (int, float), pw, None)
        if x_max is not None and not x_max > 0:
            raise ConfigError(f"{pw}: 'x-max' must be positive, got {x_max!r}")
        panel = Panel(pname, _get(p, "data", str, pw), _get(p, "title", str, pw, pname), _get(p, "note", str, pw, ""),
                      _get(p, "source", str, pw, ""), None if x_max is None else float(x_max))
        panels.append(panel)
        pdefaults = _flags(_get(p, "defaults", dict, pw, {}), f"{pw} defaults", options)
        own = _get(p, "run", list, pw, [])
        if not own and not shared_runs:
            raise ConfigError(f"{pw}: no runs ([[run]] or [[panel.run]])")
        labels: set[str] = set()
        for j, r in enumerate([*shared_runs, *own]):
            rw = f"{pw} run {r.get('label', j + 1) if isinstance(r, dict) else j + 1!r}"
            if not isinstance(r, dict):
                raise ConfigError(f"{rw}: must be a table")
            label = _get(r, "label", str, rw)
            if label in labels:
                raise ConfigError(f"{rw}: label {label!r} is used twice in panel {pname!r}")
            labels.add(label)
            flags = {**defaults, "data": panel.data, **pdefaults, **_flags(r, rw, options)}
            reference = _reference(r, len(thresholds), rw)
            if sweep_key is None:
                runs.append(RunSpec(pname, label, flags, reference))
            else:
                for v in sweep_values:
                    runs.append(RunSpec(pname, label, {**flags, sweep_key: v}, reference, float(v)))
    if metric == "f_gap":
        bad = [r for r in runs if r.flags.get("problem") != "lsq"]
        if bad:
            raise ConfigError(f"{where}: metric f_gap needs problem = \"lsq\" (f* is computed by least squares); "
                              f"run {bad[0].label!r} of panel {bad[0].panel!r} has problem "
                              f"{bad[0].flags.get('problem', 'logreg')!r}")
    return Experiment(name, version, _get(doc, "title", str, where, name), _get(doc, "description", str, where, ""),
                      kind, metric, x, tuple(float(t) for t in thresholds),
                      _get(doc, "reference-label", str, where, "reference"), tuple(panels), tuple(runs), sweep_key,
                      tuple(float(v) for v in sweep_values), path)


def command_args(flags: dict[str, Any], options: dict[str, Option] | None = None) -> list[str]:
    """The command-line flags of a run, in the parser's order (what the report prints and what runs)."""
    options = options or _simulate_options()
    out: list[str] = []
    for key, opt in options.items():
        if key not in flags:
            continue
        v = flags[key]
        flag = f"--{key}"
        if opt.action.nargs == 0:
            if v == opt.action.const and v != opt.action.default:
                out.append(flag)
            continue
        if v is None:
            continue
        if isinstance(v, list):
            out += [flag, *(_text(x) for x in v)]
        else:
            out += [flag, _text(v)]
    return out


def _text(v: Any) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return str(v)


def simulate_namespace(args: list[str]) -> argparse.Namespace:
    """A run's flags parsed by the simulate parser, as ``ef21 simulate`` would see them."""
    return simulate_parser().parse_args(args)
