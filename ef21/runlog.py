"""The per-round JSONL log: one JSON object per round, written as the run goes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO, Any

from .errors import UserError


def _clean(v: Any) -> Any:
    # JSON has no inf/nan; a diverged round is still logged, as null.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def ensure_parent(path: Path, flag: str) -> Path:
    """Create the folder an output goes to, so `--log runs/a.jsonl` works in a fresh checkout."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot create its folder ({exc.strerror})") from None
    return Path(path)


class JsonlWriter:
    def __init__(self, path: Path | None) -> None:
        self._fh: IO[str] | None = None
        if path is not None:
            try:
                self._fh = open(ensure_parent(path, "--log"), "w", encoding="utf-8")
            except OSError as exc:
                raise UserError(f"--log {path}: cannot write ({exc.strerror})") from None

    def write(self, obj: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps({k: _clean(v) for k, v in obj.items()}) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    out = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {i} is not JSON ({exc.msg})") from None
    if not out:
        raise UserError(f"{path}: empty log")
    return out
