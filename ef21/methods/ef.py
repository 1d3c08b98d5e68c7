"""EF (error feedback of Seide et al. 2014 / Stich–Karimireddy), in the form of the official code.

Worker: u = e + γ∇f_i(x), w = C(u), e ← u − w, send w. Master: x ← x − mean(w). γ lives inside the compressed
vector, so the master applies no γ of its own (the posters' "x − γw" would apply it twice).

The error e_i lives on the worker only (it depends on the uncompressed u), so a replacement worker or a resumed
master restarts that rank with e_i = 0, and a round cannot close without a worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Message, Stateless, WorkerContext, sq_dist


@dataclass(frozen=True)
class EF(Stateless):
    name: str = "ef"
    sums_messages = True  # the master only adds the messages up (ef21.engine.tree)
    needs_contractive: bool = True
    uncompressed: bool = False
    gamma_in_message: bool = True

    def worker_init(self, d: int) -> np.ndarray:
        return np.zeros(d)

    def worker_step(self, e: np.ndarray, grad: np.ndarray, ctx: WorkerContext,
                    reference: np.ndarray | None) -> tuple[Message, np.ndarray, float | None]:
        u = e + ctx.gamma * grad
        w = ctx.compressor(u, ctx.rng)
        e_new = u.copy()
        w.add_to(e_new, -1.0)
        # The worker's contribution to the direction, in gradient units, is w/γ.
        dist = None if reference is None else sq_dist(w.to_dense() / ctx.gamma, reference)
        return Message(w), e_new, dist
