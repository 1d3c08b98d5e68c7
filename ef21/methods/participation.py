"""EF21-PP's partial participation by sampling: how many workers a round draws, and which."""

from __future__ import annotations

import math

import numpy as np

from ef21.errors import UserError

from .streams import PARTICIPATION_STREAM


def participation_count(spec: str | None, n: int) -> int | None:
    """How many workers a round samples: None (everyone), from a fraction in (0, 1] or a count in 1..n."""
    if spec is None:
        return None
    text = str(spec).strip()
    try:
        if text.isdigit():
            count = int(text)
            if not 1 <= count <= n:
                raise UserError(f"--participation count must lie in 1..{n} (the workers), got {count}")
            return count
        frac = float(text)
    except ValueError:
        raise UserError(f"--participation must be a fraction in (0, 1] or a count 1..n, got {spec!r}") from None
    if not (math.isfinite(frac) and 0.0 < frac <= 1.0):
        raise UserError(f"--participation fraction must lie in (0, 1], got {spec!r}")
    # The official code's n_pw = int(n·prw), but never nobody.
    return max(1, int(n * frac))


def participants(seed: int, round_: int, n: int, count: int | None) -> frozenset[int] | None:
    """EF21-PP's "nice" sampling: ``count`` of n ranks drawn without replacement from (seed, round); None means
    everyone. Round 0 (the initialization g_i⁰) always has everyone. Master and workers draw the same set."""
    if count is None or count >= n or round_ == 0:
        return None
    rng = np.random.default_rng([seed, round_, PARTICIPATION_STREAM])
    return frozenset(int(r) for r in rng.choice(n, size=count, replace=False))
