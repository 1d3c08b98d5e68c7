"""EControl (Gao, Islamov, Stich, ICLR 2024): EF21 whose message also feeds back a share η of its own error.

Worker i keeps an error e_i and an estimate h_i: Δ_i = C(η e_i + ∇f_i − h_i), e_i ← e_i + ∇f_i − h_i − Δ_i,
h_i ← h_i + Δ_i, and sends Δ_i; the master adds (1/n)ΣΔ_i to h (= g), exactly EF21's master. η = 0 is EF21.
Round 0 (``--init full``): h_i⁰ = ∇f_i(x⁰) sent whole, e_i⁰ = 0; ``compressed``: the step above from e = h = 0.

The master's rows hold h_i (for a hand-over); e_i lives on the worker only (it depends on the uncompressed
gradients), so a replacement restarts from e_i = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ef21.compression.sparse import SparseVector

from .base import Message, WorkerContext, sq_dist
from .ef21 import EF21


@dataclass(frozen=True, eq=False)
class ControlState:
    e: np.ndarray
    h: np.ndarray


@dataclass(frozen=True)
class EControl(EF21):
    eta: float = 0.1
    name: str = "econtrol"

    def worker_step(self, state: ControlState | None, grad: np.ndarray, ctx: WorkerContext,
                    reference: np.ndarray | None) -> tuple[Message, ControlState, float | None]:
        if state is None:
            zero = np.zeros_like(grad)
            if ctx.init == "full":
                return self._full_start(grad, zero, reference)
            state = ControlState(zero, zero.copy())
        diff = grad - state.h
        u = diff + self.eta * state.e
        delta = ctx.compressor(u, ctx.rng)
        e_new = state.e + diff
        delta.add_to(e_new, -1.0)
        h_new = state.h.copy()
        delta.add_to(h_new)
        return Message(delta), ControlState(e_new, h_new), None if reference is None else sq_dist(h_new, reference)

    @staticmethod
    def _full_start(grad: np.ndarray, zero: np.ndarray,
                    reference: np.ndarray | None) -> tuple[Message, ControlState, float | None]:
        h = grad.copy()
        return (Message(SparseVector.dense(h.copy())), ControlState(zero, h),
                None if reference is None else sq_dist(h, reference))

    def stale_distortion(self, state: ControlState | None, reference: np.ndarray) -> float | None:
        return None if state is None else sq_dist(state.h, reference)

    def resume_state(self, row: np.ndarray) -> ControlState:
        return ControlState(np.zeros_like(row), row)
