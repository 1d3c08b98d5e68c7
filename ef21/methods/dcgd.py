"""DCGD, naive compressed GD: x ← x − γ·mean C(∇f_i(x)). No state; diverges for biased C in general."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Message, Stateless, WorkerContext, distortion_of


@dataclass(frozen=True)
class DCGD(Stateless):
    name: str = "dcgd"
    sums_messages = True  # the master only adds the messages up (ef21.engine.tree)
    needs_contractive: bool = False
    uncompressed: bool = False
    gamma_in_message: bool = False

    def worker_init(self, d: int) -> None:
        return None

    def worker_step(self, state: None, grad: np.ndarray, ctx: WorkerContext,
                    reference: np.ndarray | None) -> tuple[Message, None, float | None]:
        c = ctx.compressor(grad, ctx.rng)
        return Message(c), None, distortion_of(c, grad, reference)
