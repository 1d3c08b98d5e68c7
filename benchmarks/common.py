"""Shared helpers for the benchmark scripts: tables, JSON output, worker processes."""

from __future__ import annotations

import argparse
import json
import platform
import time
import timeit
from pathlib import Path
from typing import Any, Callable, Sequence


def base_parser(doc: str | None) -> argparse.ArgumentParser:
    """The flags every benchmark has: --smoke (tiny, as CI runs it) and --json PATH."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    return ap


def best_time(fn: Callable[[], object], number: int, repeat: int = 5) -> float:
    """Seconds per call, the best of ``repeat`` batches: the least disturbed by a shared, noisy machine."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


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
