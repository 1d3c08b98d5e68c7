"""A progress bar for long runs, shown only on a terminal."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    def __init__(self, total: int, *, enabled: bool = True, desc: str = "") -> None:
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="round", dynamic_ncols=True, leave=False)

    def update(self, round_: int, grad_norm_sq: float | None) -> None:
        if self._bar is None:
            return
        if grad_norm_sq is not None:
            self._bar.set_postfix_str(f"|grad f|^2={grad_norm_sq:.3e}", refresh=False)
        # update() redraws at most every mininterval, so calling it every round stays cheap.
        self._bar.update(round_ - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
