"""Shared helpers for the benchmark scripts: tables, JSON output, worker processes."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Sequence


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def write_json(path: Path | None, name: str, results: list[dict[str, Any]], **extra: Any) -> None:
    if path is None:
        return
    doc = {"benchmark": name, "date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
           "python": platform.python_version(), "results": results, **extra}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}")
