"""DCGD, naive compressed GD: x ← x − γ·mean C(∇f_i(x)). No state; diverges for biased C in general."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .base import Downlink, Message, WorkerContext, sq_dist, sum_messages


@dataclass(frozen=True)
class DCGD:
    name: str = "dcgd"
    needs_contractive: bool = False
    uncompressed: bool = False
    gamma_in_message: bool = False

    def worker_init(self, d: int) -> None:
        return None

    def worker_step(self, state: None, grad: np.ndarray, ctx: WorkerContext) -> tuple[Message, None, float]:
        c = ctx.compressor(grad, ctx.rng)
        return Message(c), None, sq_dist(c.to_dense(), grad)

    def master_init(self, n: int, d: int) -> tuple[int, int]:
        return (n, d)

    def master_aggregate(self, state: tuple[int, int], messages: Sequence[Message]) -> tuple[Downlink, tuple]:
        n, d = state
        return Downlink(sum_messages(messages, d), "replace", 1.0 / n), state
