"""The master's broadcast compressed: EF21-BC on the direction g, EF21-P on the model.

EF21-BC: the master runs its own EF21 on the broadcast (method doc §3.9).

The workers' messages move g̃ = (1/n)Σ g̃_i as before; the master then sends only b = C_M(g̃ − g) and every replica
(its own included) sets g ← g + b. So the downlink carries K entries whatever the union of the workers' supports,
and workers mirror g exactly because they apply the same b. Round 0 sends g⁰ = g̃⁰ whole (the official code's
initialization), since g starts at 0 on every replica.

EF21-P (Gruntkowska, Tyurin, Richtárik 2023): error feedback on the model. The master keeps its model (x, g) and
a copy of the point w the workers hold (w⁰ = x⁰); once the uplink has moved x to x^{t+1}, it sends
b = C_P(x^{t+1} − w^t) and every copy of w, its own included, sets w ← w + b. The workers' replica *is* w (the
primal step rule): they compute their gradients there and never see x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ef21.compression.compressors import Compressor
from ef21.compression.sparse import SparseVector

from .base import Downlink
from .replica import Replica, StepRule
from .streams import DOWNLINK_STREAM


def downlink_rng(seed: int, round_: int) -> np.random.Generator:
    return np.random.default_rng([seed, round_, DOWNLINK_STREAM])


@dataclass(eq=False)
class BroadcastCompressor:
    """The master's side of EF21-BC. ``g_tilde`` is its state (saved in checkpoints)."""

    compressor: Compressor
    seed: int
    g_tilde: np.ndarray

    @staticmethod
    def start(compressor: Compressor, d: int, seed: int, dtype: object = np.float64) -> BroadcastCompressor:
        return BroadcastCompressor(compressor, seed, np.zeros(d, dtype=dtype))  # type: ignore[call-overload]

    def transform(self, up: Downlink, g: np.ndarray, round_: int) -> Downlink:
        """From the uplink aggregate of round ``round_`` to the broadcast b; ``g`` is the replicas' g^t."""
        if up.mode == "replace":
            self.g_tilde[:] = 0.0
        up.vector.add_to(self.g_tilde, up.scale)
        if round_ == 0:
            return Downlink(SparseVector.dense(self.g_tilde.copy()), "add", 1.0)
        rng = downlink_rng(self.seed, round_) if self.compressor.randomized else None
        b = self.compressor(self.g_tilde - g, rng)
        return Downlink(b, "add", 1.0)


def primal_rule(x_step: float) -> StepRule:
    """The step rule of a replica that holds EF21-P's shared point w (``x_step`` is carried, not used)."""
    return StepRule(x_step, primal=True)


@dataclass(eq=False)
class PrimalBroadcast:
    """The master's side of EF21-P: its copy of the workers' replica (w), saved in checkpoints."""

    compressor: Compressor
    seed: int
    shared: Replica

    @staticmethod
    def start(compressor: Compressor, x0: np.ndarray, x_step: float, seed: int) -> PrimalBroadcast:
        return PrimalBroadcast(compressor, seed, Replica.start(x0, primal_rule(x_step)))

    def transform(self, x_new: np.ndarray, round_: int) -> Downlink:
        """The broadcast of round ``round_`` once the master's model is at ``x_new`` = x^{t+1}: C_P(x^{t+1} − w^t)."""
        rng = downlink_rng(self.seed, round_) if self.compressor.randomized else None
        return Downlink(self.compressor(x_new - self.shared.x, rng), "add", 1.0)
