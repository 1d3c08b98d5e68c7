"""DIANA (Mishchenko et al. 2019; Horváth et al. 2019): compressed gradient differences against learned shifts.

Worker i keeps a shift h_i: m_i = Q(∇f_i − h_i), h_i ← h_i + α m_i, and sends m_i (Q unbiased). The master keeps
h = (1/n)Σh_i and moves with ĝ = h + (1/n)Σm_i, then h ← h + α(1/n)Σm_i. In the replicas g holds h and the step
rule does the rest (``StepRule.shift``), so the broadcast is just the sum of the messages and every replica mirrors
h. Round 0 under ``--init full``: h_i⁰ = ∇f_i(x⁰) sent whole, and the round replaces h (the first step is GD's);
under ``compressed`` the shifts start at 0, the papers' start.

Every m_i is needed every round (the estimate is unbiased only over all workers), so a round never closes without
one. The master's rows hold h_i, updated like the worker's, so a replacement worker continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np

from ef21.compression.sparse import SparseVector

from .base import Downlink, Message, WorkerContext, require_all, sq_dist, sum_messages


@dataclass(frozen=True)
class DIANA:
    alpha: float
    """The shifts' stepsize α ≤ 1/(ω + 1)."""
    full_start: bool = True
    """``--init full``: round 0 sends h_i⁰ = ∇f_i(x⁰) whole and replaces h."""
    name: str = "diana"
    needs_contractive: bool = False
    needs_unbiased: ClassVar[bool] = True
    uncompressed: bool = False
    gamma_in_message: bool = False
    tolerates_missing: bool = False

    def worker_init(self, d: int) -> None:
        return None  # h_i does not exist until round 0

    def worker_step(self, h: np.ndarray | None, grad: np.ndarray, ctx: WorkerContext,
                    reference: np.ndarray | None) -> tuple[Message, np.ndarray, float | None]:
        if h is None:
            if self.full_start and ctx.round == 0:
                h_new = grad.copy()
                return (Message(SparseVector.dense(h_new.copy())), h_new,
                        None if reference is None else sq_dist(h_new, reference))
            h = np.zeros_like(grad)
        diff = grad - h
        m = ctx.compressor(diff, ctx.rng)
        h_new = h.copy()
        m.add_to(h_new, self.alpha)
        if reference is None:
            return Message(m), h_new, None
        estimate = h.copy()  # this round's estimate of ∇f_i is h_i + m_i
        m.add_to(estimate)
        return Message(m), h_new, sq_dist(estimate, reference)

    def stale_distortion(self, h: Any, reference: np.ndarray) -> None:
        return None

    def master_init(self, n: int, d: int, dtype: Any = np.float64) -> np.ndarray | None:
        return None if dtype is None else np.zeros((n, d), dtype=dtype)

    def master_aggregate(self, rows: np.ndarray | None, messages: Sequence[Message | None], d: int,
                         weights: np.ndarray | None = None, round_: int = 0) -> Downlink:
        require_all(self.name, messages)
        start = self.full_start and round_ == 0
        if rows is not None:
            for rank, msg in enumerate(messages):
                assert msg is not None
                if start:
                    rows[rank] = msg.vector.to_dense()
                else:
                    msg.vector.add_to(rows[rank], self.alpha)
        return Downlink(sum_messages(messages, d), "replace" if start else "add", 1.0 / len(messages))

    def master_worker_state(self, rows: np.ndarray | None, rank: int) -> np.ndarray | None:
        if rows is None or not rows[rank].any():
            return None
        return np.array(rows[rank], dtype=np.float64)

    def resume_state(self, row: np.ndarray) -> np.ndarray:
        return row
