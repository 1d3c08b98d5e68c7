"""MARINA (Gorbunov, Burlachenko, Li, Richtárik, ICML 2021): compressed gradient differences, and now and then a
dense round.

One coin a round, c_t ~ Bernoulli(p) drawn from (seed, round) by every worker and the master alike (nobody sends
it). c_t = 1 (and round 0): worker i sends ∇f_i(x^t) whole and g_i ← ∇f_i(x^t); c_t = 0: it sends
Q(∇f_i(x^t) − ∇f_i(x^{t−1})) and g_i ← g_i + that. The master's g = (1/n)Σg_i: a dense round replaces it, a
compressed one adds the mean of the messages. Under ``--init compressed`` round 0 sends Q(∇f_i(x⁰)) instead.

The worker keeps g_i (for G in the log and a hand-over) and its previous gradient; the master's rows hold g_i.
A replacement worker resumes with the master's g_i as its previous gradient too (the true ∇f_i(x^{t−1}) is gone
with its predecessor): its first difference is then taken against g_i, an EF21-like step, until the next dense
round makes it exact again. (Without rows, --master-rows none, it starts from g_i = 0: the master's g then
mixes its predecessor's contribution in until the next dense round replaces every g_i.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np

from ef21.compression.sparse import SparseVector

from .base import Downlink, Message, WorkerContext, require_all, sq_dist, sum_messages
from .streams import MARINA_COIN_STREAM


def marina_coin(seed: int, round_: int, p: float) -> bool:
    """MARINA's shared coin: True (a dense round) with probability p; round 0 always."""
    return round_ == 0 or bool(np.random.default_rng([seed, round_, MARINA_COIN_STREAM]).random() < p)


@dataclass(frozen=True, eq=False)
class MarinaState:
    g: np.ndarray
    """g_i."""
    prev: np.ndarray
    """∇f_i at the previous round."""


@dataclass(frozen=True)
class MARINA:
    p: float
    seed: int = 0
    full_start: bool = True
    name: str = "marina"
    needs_contractive: bool = False
    needs_unbiased: ClassVar[bool] = True
    uncompressed: bool = False
    gamma_in_message: bool = False
    tolerates_missing: bool = False

    def dense_round(self, round_: int) -> bool:
        """Whether round ``round_``'s messages are whole gradients (what the master lets through)."""
        return marina_coin(self.seed, round_, self.p)

    def worker_init(self, d: int) -> None:
        return None

    def worker_step(self, state: MarinaState | None, grad: np.ndarray, ctx: WorkerContext,
                    reference: np.ndarray | None) -> tuple[Message, MarinaState, float | None]:
        prev = grad.copy()  # the next round's difference needs this gradient (``grad`` may be reused by its owner)
        if self.dense_round(ctx.round):
            if ctx.round == 0 and not self.full_start:
                vec = ctx.compressor(grad, ctx.rng)
                g_new = vec.to_dense()
            else:
                vec = SparseVector.dense(grad.copy())
                g_new = prev.copy()
            return Message(vec, replace=True), MarinaState(g_new, prev), _dist(g_new, reference)
        if state is None:  # a replacement the master kept no row for (--master-rows none): from zero
            state = MarinaState(np.zeros_like(grad), np.zeros_like(grad))
        q = ctx.compressor(grad - state.prev, ctx.rng)
        g_new = state.g.copy()
        q.add_to(g_new)
        return Message(q), MarinaState(g_new, prev), _dist(g_new, reference)

    def stale_distortion(self, state: Any, reference: np.ndarray) -> None:
        return None

    def master_init(self, n: int, d: int, dtype: Any = np.float64) -> np.ndarray | None:
        return None if dtype is None else np.zeros((n, d), dtype=dtype)

    def master_aggregate(self, rows: np.ndarray | None, messages: Sequence[Message | None], d: int,
                         weights: np.ndarray | None = None, round_: int = 0) -> Downlink:
        require_all(self.name, messages)
        dense = self.dense_round(round_)
        if rows is not None:
            for rank, msg in enumerate(messages):
                assert msg is not None
                if dense:
                    rows[rank] = msg.vector.to_dense()
                else:
                    msg.vector.add_to(rows[rank])
        return Downlink(sum_messages(messages, d), "replace" if dense else "add", 1.0 / len(messages))

    def master_worker_state(self, rows: np.ndarray | None, rank: int) -> np.ndarray | None:
        if rows is None or not rows[rank].any():
            return None
        return np.array(rows[rank], dtype=np.float64)

    def resume_state(self, row: np.ndarray) -> MarinaState:
        return MarinaState(row, row.copy())


def _dist(g_new: np.ndarray, reference: np.ndarray | None) -> float | None:
    return None if reference is None else sq_dist(g_new, reference)
