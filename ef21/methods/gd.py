"""GD: every worker sends its full local gradient; the master averages and steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..sparse import SparseVector
from .base import Downlink, Message, WorkerContext, sum_messages


@dataclass(frozen=True)
class GD:
    name: str = "gd"
    needs_contractive: bool = False
    uncompressed: bool = True
    gamma_in_message: bool = False

    def worker_init(self, d: int) -> None:
        return None

    def worker_step(self, state: None, grad: np.ndarray, ctx: WorkerContext) -> tuple[Message, None, float]:
        return Message(SparseVector.dense(grad.copy())), None, 0.0

    def master_init(self, n: int, d: int) -> tuple[int, int]:
        return (n, d)

    def master_aggregate(self, state: tuple[int, int], messages: Sequence[Message]) -> tuple[Downlink, tuple]:
        n, d = state
        return Downlink(sum_messages(messages, d), "replace", 1.0 / n), state
