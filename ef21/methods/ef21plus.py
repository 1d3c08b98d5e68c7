"""EF21+: each worker keeps the closer of a fresh C(∇f_i) and the EF21 update; the master keeps every g_i.

When the fresh vector wins, g_i is *replaced*, which the running sum of EF21 cannot express: the master stores
each g_i and broadcasts the change of their mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np

from ef21.compression.sparse import SparseVector
from ef21.errors import UserError

from .base import Downlink, Message, WorkerContext, sq_dist
from .ef21 import EF21, initial_step


@dataclass(frozen=True)
class EF21Plus(EF21):
    """EF21's master rows, round 0 and hand-over; its own worker choice and the master's replacement rule."""

    name: str = "ef21plus"
    sends_selector: ClassVar[bool] = True  # the 1-bit ``replace`` flag is part of every message's payload

    def worker_step(self, g_i: np.ndarray | None, grad: np.ndarray, ctx: WorkerContext,
                    reference: np.ndarray | None) -> tuple[Message, np.ndarray, float | None]:
        if g_i is None:
            return initial_step(grad, ctx, replace=True, reference=reference)
        b = ctx.compressor(grad, ctx.rng)
        c = ctx.compressor(grad - g_i, ctx.rng)
        m = g_i.copy()
        c.add_to(m)
        b_dense = b.to_dense()
        dist_b, dist_m = sq_dist(b_dense, grad), sq_dist(m, grad)
        if dist_b < dist_m:  # equal distances keep the EF21 candidate, as the official code does
            return Message(b, replace=True), b_dense, dist_b
        return Message(c, replace=False), m, dist_m

    def master_init(self, n: int, d: int, dtype: Any = np.float64) -> np.ndarray:
        if dtype is None:
            raise UserError("ef21plus needs every g_i on the master (a worker may replace its g_i): "
                            "--master-rows none is not possible")
        return np.zeros((n, d), dtype=dtype)

    def master_aggregate(self, rows: np.ndarray, messages: Sequence[Message | None], d: int,
                         weights: np.ndarray | None = None, round_: int = 0) -> Downlink:
        if not any(m is not None and m.replace for m in messages):
            return super().master_aggregate(rows, messages, d)  # pure EF21 rounds keep the downlink sparse
        n = len(messages)
        acc = np.zeros(d, dtype=next(m.vector.values.dtype for m in messages if m is not None))  # the run's
        for rank, msg in enumerate(messages):
            if msg is None:
                continue
            row = rows[rank]
            if msg.replace:
                new = msg.vector.to_dense()
                acc += new - row
                row[:] = new
            else:
                msg.vector.add_to(acc)
                msg.vector.add_to(row)
        return Downlink(SparseVector.dense(acc), "add", 1.0 / n)
