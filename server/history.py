"""The curves the dashboard draws, kept in bounded memory, and served as JSON by ``GET /history?since=ROUND``.

Every round is kept until ``cap`` points are held; then every other point is dropped and from then on only
rounds that are multiples of the (doubled) stride are kept, so a long run keeps evenly spaced points over its
whole length in at most ``cap`` of them. The newest round is always served, kept or not, so the dashboard's
last point is the run's.
"""

from __future__ import annotations

import json
import math
from typing import NamedTuple

from ef21.engine.records import RoundRecord

DEFAULT_CAP = 4096
MAX_POINTS_PER_REPLY = 512
"""A reply is serialized on the event loop: a bounded slice keeps each one well under a millisecond; the page
asks again with the last round it got."""

COLUMNS = ("round", "elapsed_s", "bits_per_worker", "f", "grad_norm_sq", "G", "g_norm_sq", "wire_bytes_up",
           "wire_bytes_down")


class Point(NamedTuple):
    round: int
    elapsed_s: float
    bits_per_worker: float
    f: float | None
    grad_norm_sq: float | None
    G: float | None
    g_norm_sq: float | None
    wire_bytes_up: int | None
    wire_bytes_down: int | None


def _finite(v: float | None) -> float | None:
    """JSON has no NaN or infinity (a diverging run has both): the page shows them as gaps."""
    return v if v is not None and math.isfinite(v) else None


class History:
    """Fed once per round, off the round's critical path (the master's ``on_round``); one append, no copying."""

    def __init__(self, cap: int = DEFAULT_CAP) -> None:
        if cap < 2:
            raise ValueError("history cap must be at least 2")
        self.cap = cap
        self.stride = 1
        self._points: list[Point] = []
        self._newest: Point | None = None

    def __len__(self) -> int:
        return len(self._points)

    def add(self, rec: RoundRecord) -> None:
        p = Point(rec.round, rec.elapsed_s, rec.bits_per_worker, _finite(rec.f), _finite(rec.grad_norm_sq),
                  _finite(rec.G), _finite(rec.g_norm_sq), rec.wire_bytes_up, rec.wire_bytes_down)
        self._newest = p
        if rec.round % self.stride:
            return
        if self._points and self._points[-1].round >= rec.round:
            # A resumed run repeats rounds after its last checkpoint: the later ones replace them.
            self._points = [q for q in self._points if q.round < rec.round]
        self._points.append(p)
        if len(self._points) >= self.cap:
            self.stride *= 2
            self._points = [q for q in self._points if q.round % self.stride == 0]

    def since(self, round_: int, limit: int = MAX_POINTS_PER_REPLY) -> dict:
        """Points after ``round_`` (the oldest ``limit`` of them); ``more`` says whether to ask again at once."""
        lo, hi = 0, len(self._points)
        while lo < hi:  # first kept point with round > round_
            mid = (lo + hi) // 2
            if self._points[mid].round <= round_:
                lo = mid + 1
            else:
                hi = mid
        points = self._points[lo:lo + limit]
        more = lo + limit < len(self._points)
        newest = self._newest
        if not more and newest is not None and newest.round > round_ and (not points or points[-1].round != newest.round):
            points = [*points, newest]
        return {"columns": COLUMNS, "stride": self.stride, "more": more, "points": points}

    def to_json(self, round_: int) -> bytes:
        return json.dumps(self.since(round_), separators=(",", ":")).encode()
