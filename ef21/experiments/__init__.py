"""``ef21 experiment NAME``: the paper's results regenerated from named, versioned definitions.

The definitions are TOML files in ``definitions/`` (``schema`` says what they hold); ``runner`` executes their
runs in parallel and files each run's log under the output folder by a hash of its configuration, so a second
invocation redoes nothing; ``report`` draws the figures and writes the CSV of the curves and the markdown report.
A new experiment is a new definition file.

May import: ``ef21.cli`` (a definition's keys are ``ef21 simulate``'s flags) and everything below it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ef21.errors import UserError


def shipped() -> dict[str, Path]:
    """Shipped experiment names → their definition files."""
    folder = resources.files(__package__) / "definitions"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


def resolve(name: str) -> Path:
    """A shipped name, or the path of a definition file of one's own."""
    known = shipped()
    if name in known:
        return known[name]
    if name.endswith(".toml") and Path(name).is_file():
        return Path(name)
    raise UserError(f"unknown experiment {name!r}; choose one of {', '.join(sorted(known))} "
                    f"(or give the path of a definition .toml)")
