"""GD: every worker sends its full local gradient; the master averages and steps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Message, Stateless, WorkerContext


@dataclass(frozen=True)
class GD(Stateless):
    name: str = "gd"
    needs_contractive: bool = False
    uncompressed: bool = True
    gamma_in_message: bool = False

    def worker_init(self, d: int) -> None:
        return None

    def worker_step(self, state: None, grad: np.ndarray, ctx: WorkerContext) -> tuple[Message, None, float]:
        return Message(ctx.compressor(grad, ctx.rng)), None, 0.0  # the identity (or its float32 rounding)
