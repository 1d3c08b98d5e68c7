"""GD: every worker sends its full local gradient (or, with a stochastic estimator, SGD's minibatch gradient);
the master averages and steps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Message, Stateless, WorkerContext, distortion_of


@dataclass(frozen=True)
class GD(Stateless):
    name: str = "gd"
    sums_messages = True  # the master only adds the messages up (ef21.engine.tree)
    needs_contractive: bool = False
    uncompressed: bool = True
    gamma_in_message: bool = False

    def worker_init(self, d: int) -> None:
        return None

    def worker_step(self, state: None, grad: np.ndarray, ctx: WorkerContext,
                    reference: np.ndarray | None) -> tuple[Message, None, float | None]:
        c = ctx.compressor(grad, ctx.rng)  # the identity (or its float32 rounding)
        # The estimate is the message itself: exact against its own gradient, SGD's noise against ∇f_i.
        return Message(c), None, 0.0 if reference is grad else distortion_of(c, grad, reference)
