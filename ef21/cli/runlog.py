"""The per-round JSONL log: one JSON object per round, written as the run goes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO, Any

from ef21.errors import UserError


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
    """Writes rounds as they finish. ``offset`` continues a log (a resumed run): the file is cut back to that
    many bytes, dropping rounds logged after the checkpoint, and appended to."""

    def __init__(self, path: Path | None, *, offset: int | None = None) -> None:
        self._fh: IO[bytes] | None = None
        self.offset = 0
        if path is not None:
            try:
                ensure_parent(path, "--log")
                if offset is None or not Path(path).exists():
                    self._fh = open(path, "wb")
                else:
                    self._fh = open(path, "r+b")
                    self._fh.truncate(offset)
                    self._fh.seek(offset)
                    self.offset = offset
            except OSError as exc:
                raise UserError(f"--log {path}: cannot write ({exc.strerror})") from None

    def write(self, obj: dict[str, Any]) -> None:
        if self._fh is not None:
            line = (json.dumps({k: _clean(v) for k, v in obj.items()}) + "\n").encode()
            self._fh.write(line)
            self.offset += len(line)

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

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
