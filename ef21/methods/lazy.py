"""CLAG and LAG (3PC, Richtárik et al. 2022): EF21 that sends only when the change is worth it.

Worker i keeps g_i and its previous gradient. In round t ≥ 1 it sends c_i = C(∇f_i − g_i) (and moves g_i by it) only
when ‖∇f_i − g_i‖² > ζ‖∇f_i(x^t) − ∇f_i(x^{t−1})‖² (the official code's trigger); otherwise it sends a *skip*, an
empty vector, and keeps g_i. The skip is a message like any other, so the master knows the round is complete and
never waits for a worker that chose not to send, nor mistakes it for a straggler. The master side is EF21's: an
empty vector adds nothing. LAG is CLAG with the identity (a fired worker sends ∇f_i − g_i whole).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ef21.compression.sparse import SparseVector

from .base import Message, WorkerContext, sq_dist
from .ef21 import EF21, initial_step


@dataclass(frozen=True, eq=False)
class LazyState:
    g: np.ndarray
    """g_i."""
    prev: np.ndarray | None
    """∇f_i at the previous round; None after a hand-over (the first round then sends)."""


@dataclass(frozen=True)
class CLAG(EF21):
    zeta: float = 1.0
    """ζ ≥ 0 of the trigger; 0 fires whenever g_i differs from ∇f_i (EF21)."""
    name: str = "clag"
    # Every message says whether it was sent or skipped: one bit in the payload count (the paper's bits count the
    # values only, so a skip is 0 there).
    sends_selector: ClassVar[bool] = True

    def worker_step(self, state: LazyState | None, grad: np.ndarray, ctx: WorkerContext,
                    reference: np.ndarray | None) -> tuple[Message, LazyState, float | None]:
        if state is None:
            msg, g_new, dist = initial_step(grad, ctx, replace=False, reference=reference)
            return msg, LazyState(g_new, grad.copy()), dist
        r = grad - state.g
        # The copy: ``grad`` may be a buffer its objective reuses; the trigger of the next round needs this one.
        prev = grad.copy()
        if state.prev is not None and not float(r @ r) > self.zeta * sq_dist(grad, state.prev):
            dist = None if reference is None else sq_dist(state.g, reference)
            return Message(SparseVector.zeros(grad.shape[0])), LazyState(state.g, prev), dist
        c = ctx.compressor(r, ctx.rng)
        g_new = state.g.copy()
        c.add_to(g_new)
        return Message(c), LazyState(g_new, prev), None if reference is None else sq_dist(g_new, reference)

    def stale_distortion(self, state: LazyState | None, reference: np.ndarray) -> float | None:
        return None if state is None else sq_dist(state.g, reference)

    def resume_state(self, row: np.ndarray) -> LazyState:
        return LazyState(row, None)


@dataclass(frozen=True)
class LAG(CLAG):
    """CLAG with the identity compressor (``uncompressed``: the plan gives it the identity whatever --compressor)."""

    name: str = "lag"
    uncompressed: bool = True
