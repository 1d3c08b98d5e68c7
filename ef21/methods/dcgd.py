"""DCGD, naive compressed GD: x ← x − γ·mean C(∇f_i(x)). No state; diverges for biased C in general."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Message, Stateless, WorkerContext, sq_dist


@dataclass(frozen=True)
class DCGD(Stateless):
    name: str = "dcgd"
    needs_contractive: bool = False
    uncompressed: bool = False
    gamma_in_message: bool = False

    def worker_init(self, d: int) -> None:
        return None

    def worker_step(self, state: None, grad: np.ndarray, ctx: WorkerContext) -> tuple[Message, None, float]:
        c = ctx.compressor(grad, ctx.rng)
        return Message(c), None, sq_dist(c.to_dense(), grad)
