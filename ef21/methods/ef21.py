"""EF21: c_i = C(∇f_i(x) − g_i), g_i ← g_i + c_i; the master adds mean(c_i) to g and never needs each g_i."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .base import Downlink, Message, WorkerContext, sq_dist, sum_messages


def initial_estimate(grad: np.ndarray, ctx: WorkerContext) -> Message:
    """g_i⁰: the uncompressed local gradient (``full``, the official experiments) or C(∇f_i(x⁰)) (Algorithm 1)."""
    from ..sparse import SparseVector

    if ctx.init == "full":
        return Message(SparseVector.dense(grad.copy()), replace=True)
    return Message(ctx.compressor(grad, ctx.rng), replace=True)


@dataclass(frozen=True)
class EF21:
    name: str = "ef21"
    needs_contractive: bool = True
    uncompressed: bool = False
    gamma_in_message: bool = False

    def worker_init(self, d: int) -> np.ndarray | None:
        return None  # g_i does not exist until round 0 sends it

    def worker_step(
        self, g_i: np.ndarray | None, grad: np.ndarray, ctx: WorkerContext
    ) -> tuple[Message, np.ndarray, float]:
        if g_i is None:
            msg = initial_estimate(grad, ctx)
            g_new = msg.vector.to_dense()
            return Message(msg.vector), g_new, sq_dist(g_new, grad)
        c = ctx.compressor(grad - g_i, ctx.rng)
        g_new = g_i.copy()
        c.add_to(g_new)
        return Message(c), g_new, sq_dist(g_new, grad)

    def master_init(self, n: int, d: int) -> tuple[int, int]:
        return (n, d)

    def master_aggregate(self, state: tuple[int, int], messages: Sequence[Message]) -> tuple[Downlink, tuple]:
        n, d = state
        return Downlink(sum_messages(messages, d), "add", 1.0 / n), state
