"""Config files for every ``ef21`` command (``--config run.toml``) and which flags were given explicitly.

The keys of a config file are derived from the argparse parser itself: the key of a flag is its long name without
the leading dashes (``stepsize-mult``; ``stepsize_mult`` is accepted too), the key of a positional argument its
name. A flag added to a parser later is settable in a file with no change here. Precedence: parser default <
top-level key < key in the command's own table (``[simulate]``, ``[worker]``, …) < command line (a plain key named
like a command is a flag: ``master = "host:50051"``, ``plot = "run.png"``). Any other table only groups keys (``[method]``, ``[problem]``) and reads as if its keys stood at the top. A top-level key that is a
flag of another command only (``master`` in a file shared by ``ef21 master`` and ``ef21 worker``) is skipped by the
commands that do not take it and reported as such; a key that no command knows is an error.

Besides the merged namespace, parsing records which options were given *explicitly* — on the command line or in
the file — as opposed to left at their defaults: ``--resume`` needs that to refuse flags that contradict the
checkpoint even when their value happens to be the default.
"""

from __future__ import annotations

import argparse
import math
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Callable, Sequence

CONFIG_DEST = "config"
INFO_ATTR = "_cli"
"""The namespace attribute holding a ``CliInfo`` (a name no flag can take: dests never start with '_')."""
REDACTED = "<redacted>"


@dataclass(frozen=True)
class CliInfo:
    command: str
    config_file: Path | None
    keys: dict[str, str]
    """Option key → namespace dest, in the parser's order (every option of the command but --help/--config)."""
    explicit: frozenset[str] = frozenset()
    """Dests given on the command line or in the config file."""
    from_file: frozenset[str] = frozenset()
    """Dests whose value came from the config file (and not from the command line)."""
    skipped: tuple[str, ...] = ()
    """Top-level keys of the file that are options of other commands only."""


@dataclass(frozen=True)
class Option:
    key: str
    action: argparse.Action


@dataclass
class _Relaxation:
    """What pass 1 of the parse may drop: required-ness and defaults (so that only what was given remains)."""

    suppress_defaults: bool
    provided: set[str] = field(default_factory=set)


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand of ``parser`` a ``--config FILE`` flag (subcommands added later get it too)."""
    for sub in subcommands(parser).values():
        if not any(a.dest == CONFIG_DEST for a in sub._actions):
            sub.add_argument("--config", type=Path, default=None, metavar="FILE",
                             help="read flags from this TOML file (keys: long flag names; the command line wins)")


def option_key(action: argparse.Action) -> str:
    longs = [s for s in action.option_strings if s.startswith("--")]
    return canonical_key(longs[0][2:] if longs else action.dest)


def canonical_key(key: str) -> str:
    return key.replace("_", "-")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def command_options(sub: argparse.ArgumentParser) -> dict[str, Option]:
    out: dict[str, Option] = {}
    for a in sub._actions:
        if isinstance(a, (argparse._HelpAction, argparse._VersionAction)) or a.dest == CONFIG_DEST:
            continue
        out[option_key(a)] = Option(option_key(a), a)
    return out


def parse_command_line(build_parser: Callable[[], argparse.ArgumentParser],
                       argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` for a parser with subcommands, merging ``--config FILE``; errors exit 2 with one line.

    Two passes over fresh parsers: the first, with every default suppressed and nothing required, yields exactly
    what the command line gave (and the config file's path); the second parses again with the file's values as
    defaults, so argparse itself applies the command line on top and checks what is still required."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        return build_parser().parse_args(args)
    first = build_parser()
    for sub in subcommands(first).values():
        _relax(sub, _Relaxation(suppress_defaults=True, provided={a.dest for a in sub._actions}))
    given = first.parse_args(args)
    command = given.command
    final = build_parser()
    sub = subcommands(final)[command]
    options = command_options(sub)
    cli_dests = {o.action.dest for o in options.values() if hasattr(given, o.action.dest)}
    path = getattr(given, CONFIG_DEST, None)
    file_values: dict[str, Any] = {}
    skipped: list[str] = []
    if path is not None:
        try:
            file_values, skipped = values_from_file(Path(path), command, subcommands(final))
        except ConfigError as exc:
            sub.error(str(exc))
        _relax(sub, _Relaxation(suppress_defaults=False, provided=set(file_values)))
        sub.set_defaults(**file_values)
    ns = final.parse_args(args)
    setattr(ns, INFO_ATTR, CliInfo(
        command=command, config_file=None if path is None else Path(path),
        keys={k: o.action.dest for k, o in options.items()},
        explicit=frozenset(cli_dests | set(file_values)), from_file=frozenset(set(file_values) - cli_dests),
        skipped=tuple(skipped)))
    return ns


def _relax(sub: argparse.ArgumentParser, how: _Relaxation) -> None:
    """Make the actions in ``how.provided`` optional (their value comes from elsewhere); in pass 1 also drop every
    default, so that the namespace holds only what was given."""
    for a in sub._actions:
        if isinstance(a, argparse._HelpAction) or a.dest not in how.provided:
            continue
        if how.suppress_defaults:
            a.default = argparse.SUPPRESS
        a.required = False
        if not a.option_strings:
            if a.nargs == argparse.ONE_OR_MORE:
                a.nargs = argparse.ZERO_OR_MORE
            elif a.nargs is None:
                a.nargs = argparse.OPTIONAL


class ConfigError(ValueError):
    """A config file that cannot be used; the message is one line and names the file and the key."""


def read_toml(path: Path, name: str, missing: str = "no such file") -> dict[str, Any]:
    """A TOML file's document; a missing, unreadable or malformed file is a one-line ConfigError that starts with
    ``name`` (how the user knows the file, e.g. "--config run.toml")."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{name}: {missing}") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: not valid TOML ({exc})") from None


def values_from_file(path: Path, command: str,
                     commands: dict[str, argparse.ArgumentParser]) -> tuple[dict[str, Any], list[str]]:
    """The values (by dest) that ``path`` gives ``command``, checked and converted; and the top-level keys that
    belong to other commands only. Every command table in the file is checked, used or not."""
    doc = read_toml(path, f"--config {path}")
    where = str(path)
    top: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    for key, value in doc.items():
        # A table named after a command is that command's; a plain value under such a name is a flag
        # (``master = "host:port"`` of the worker, ``plot = "run.png"``).
        if key in commands and isinstance(value, dict):
            tables[key] = _flatten(value, f"{where} [{key}]")
        elif isinstance(value, dict):
            _merge(top, _flatten(value, f"{where} [{key}]"), f"{where} [{key}]")
        else:
            _merge(top, {key: value}, where)
    all_keys = {k for sub in commands.values() for k in command_options(sub)}
    mine = command_options(commands[command])
    values: dict[str, Any] = {}
    skipped: list[str] = []
    for key, value in top.items():
        k = canonical_key(key)
        if k == CONFIG_DEST:
            raise ConfigError(f"{where}: key 'config' cannot be set in a config file")
        if k in mine:
            values[mine[k].action.dest] = convert(mine[k], value, where)
        elif k in all_keys:
            skipped.append(key)
        else:
            raise ConfigError(f"{where}: unknown key '{key}' (not an option of any ef21 command)")
    for name, table in tables.items():
        theirs = command_options(commands[name])
        for key, value in table.items():
            k = canonical_key(key)
            if k not in theirs:
                raise ConfigError(f"{where} [{name}]: unknown key '{key}' (not an option of ef21 {name})")
            converted = convert(theirs[k], value, f"{where} [{name}]")
            if name == command:
                values[theirs[k].action.dest] = converted
    return values, skipped


def _flatten(table: dict[str, Any], where: str) -> dict[str, Any]:
    for key, value in table.items():
        if isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' is a nested table; tables only group flags, one level deep")
    return table


def _merge(into: dict[str, Any], new: dict[str, Any], where: str) -> None:
    seen = {canonical_key(k): k for k in into}
    for key, value in new.items():
        if canonical_key(key) in seen:
            raise ConfigError(f"{where}: key '{key}' is given twice (as '{seen[canonical_key(key)]}')")
        into[key] = value
        seen[canonical_key(key)] = key


# -- values ---------------------------------------------------------------------------------------------------------

def _toml_type(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a float"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return f"a {type(v).__name__}"


def _plural(action: argparse.Action) -> str:
    t = action.type
    if t is int:
        return "integers"
    if t is float:
        return "numbers"
    if isinstance(t, type) and issubclass(t, PurePath):
        return "strings (paths)"
    return "strings"


def _bad(opt: Option, where: str, value: Any, expected: str) -> ConfigError:
    got = _toml_type(value) if isinstance(value, (list, dict)) else f"{_toml_type(value)} ({value!r})"
    return ConfigError(f"{where}: key '{opt.key}' must be {expected}, got {got}")


def convert(opt: Option, value: Any, where: str) -> Any:
    """A TOML value as the option's argparse value; a wrong type names the key and the type expected."""
    a = opt.action
    if isinstance(a, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _bad(opt, where, value, "a non-negative integer (a count)")
        return value
    if isinstance(a, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise _bad(opt, where, value, "true or false")
        return value
    if a.nargs == 0:  # store_true / store_false / store_const: true gives the flag's value, false the default
        if not isinstance(value, bool):
            raise _bad(opt, where, value, "true or false")
        return a.const if value else a.default
    many = (isinstance(a, argparse._AppendAction) or a.nargs in (argparse.ONE_OR_MORE, argparse.ZERO_OR_MORE)
            or isinstance(a.nargs, int))
    if not many:
        return _scalar(opt, value, where)
    if not isinstance(value, list):
        raise _bad(opt, where, value, f"an array of {_plural(a)}")
    if isinstance(a.nargs, int) and len(value) != a.nargs:
        raise ConfigError(f"{where}: key '{opt.key}' must have {a.nargs} entries, got {len(value)}")
    if a.nargs == argparse.ONE_OR_MORE and not value:
        raise ConfigError(f"{where}: key '{opt.key}' must not be empty")
    items = [_scalar(opt, v, where) for v in value]
    if _custom_type(a):  # argparse converts a string default, not a list of them
        items = [a.type(x) for x in items]  # type: ignore[misc]
    return items


def _custom_type(a: argparse.Action) -> bool:
    t = a.type
    return t not in (None, int, float, str) and not (isinstance(t, type) and issubclass(t, PurePath))


def _scalar(opt: Option, value: Any, where: str) -> Any:
    a = opt.action
    t = a.type
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(opt, where, value, "an integer")
        out: Any = value
    elif t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(opt, where, value, "a number")
        out = float(value)
    elif t is None or t is str:
        if not isinstance(value, str):
            raise _bad(opt, where, value, "a string")
        out = value
    elif isinstance(t, type) and issubclass(t, PurePath):
        if not isinstance(value, str):
            raise _bad(opt, where, value, "a string (a path)")
        out = t(value)
    else:
        # A parsing function of the flag's own: it gets the text, as from the command line (argparse calls it
        # again on the default); called here too so that an error names the key.
        if not isinstance(value, str):
            raise _bad(opt, where, value, "a string")
        try:
            t(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"{where}: key '{opt.key}': invalid value {value!r} ({exc})") from None
        out = value
    if a.choices is not None and not _custom_type(a) and out not in a.choices:
        raise ConfigError(f"{where}: key '{opt.key}' must be one of {', '.join(map(str, a.choices))}, got {value!r}")
    return out


# -- the effective configuration ------------------------------------------------------------------------------------

def info(ns: argparse.Namespace) -> CliInfo | None:
    return getattr(ns, INFO_ATTR, None)


def explicit_dests(ns: argparse.Namespace) -> frozenset[str]:
    """Dests given on the command line or in the config file (empty for a namespace not parsed here)."""
    i = info(ns)
    return frozenset() if i is None else i.explicit


def _jsonable(v: Any) -> Any:
    if isinstance(v, PurePath):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def effective_config(ns: argparse.Namespace) -> dict[str, Any]:
    """Every option of the command with the value it has now, by key, JSON-able; secrets (a string-valued
    ``token`` option) redacted. Empty for a namespace not parsed by ``parse_command_line``."""
    i = info(ns)
    if i is None:
        return {}
    out: dict[str, Any] = {}
    for key, dest in i.keys.items():
        v = getattr(ns, dest, None)
        out[key] = REDACTED if key.endswith("token") and isinstance(v, str) else _jsonable(v)
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def describe(ns: argparse.Namespace) -> str:
    """One line: the effective configuration as a TOML inline table (unset options left out), and its sources."""
    i = info(ns)
    if i is None:
        return ""
    sources = "defaults" + (f" < {i.config_file}" if i.config_file else "") + " < command line"
    skipped = f"; not options of ef21 {i.command}, skipped: {', '.join(i.skipped)}" if i.skipped else ""
    return f"configuration ({sources}): {format_config(effective_config(ns))}{skipped}"


def format_config(cfg: dict[str, Any]) -> str:
    """An effective configuration as a TOML inline table (unset options left out): pasteable into a file."""
    return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in cfg.items() if v is not None) + "}"


def print_config(ns: argparse.Namespace, *, file: Any = None) -> None:
    line = describe(ns)
    if line:
        print(f"ef21 {info(ns).command}: {line}", file=file or sys.stdout, flush=True)  # type: ignore[union-attr]
