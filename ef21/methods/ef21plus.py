"""EF21+: each worker keeps the closer of a fresh C(∇f_i) and the EF21 update; the master keeps every g_i.

When the fresh vector wins, g_i is *replaced*, which the running sum of EF21 cannot express: the master stores
each g_i and broadcasts the change of their mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..sparse import SparseVector
from .base import Downlink, Message, WorkerContext, sq_dist, sum_messages
from .ef21 import initial_step


@dataclass(frozen=True)
class EF21Plus:
    name: str = "ef21plus"
    needs_contractive: bool = True
    uncompressed: bool = False
    gamma_in_message: bool = False
    tolerates_missing: bool = True

    def worker_init(self, d: int) -> np.ndarray | None:
        return None

    def worker_step(
        self, g_i: np.ndarray | None, grad: np.ndarray, ctx: WorkerContext
    ) -> tuple[Message, np.ndarray, float]:
        if g_i is None:
            return initial_step(grad, ctx, replace=True)
        b = ctx.compressor(grad, ctx.rng)
        c = ctx.compressor(grad - g_i, ctx.rng)
        m = g_i.copy()
        c.add_to(m)
        b_dense = b.to_dense()
        dist_b, dist_m = sq_dist(b_dense, grad), sq_dist(m, grad)
        if dist_b < dist_m:  # equal distances keep the EF21 candidate, as the official code does
            return Message(b, replace=True), b_dense, dist_b
        return Message(c, replace=False), m, dist_m

    def master_init(self, n: int, d: int) -> np.ndarray:
        return np.zeros((n, d))

    def master_aggregate(self, rows: np.ndarray, messages: Sequence[Message | None], d: int) -> Downlink:
        n = len(messages)
        if not any(m is not None and m.replace for m in messages):
            # Pure EF21 rounds keep the downlink sparse.
            for rank, msg in enumerate(messages):
                if msg is not None:
                    msg.vector.add_to(rows[rank])
            return Downlink(sum_messages(messages, d), "add", 1.0 / n)
        acc = np.zeros(d)
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

    def master_worker_state(self, rows: np.ndarray, rank: int) -> np.ndarray | None:
        row = rows[rank]
        return None if not row.any() else row.copy()
