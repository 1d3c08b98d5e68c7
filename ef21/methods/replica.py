"""(x, g): the model and the aggregate direction, held identically by the master and every worker, and the step
that moves x — plain, heavy ball (EF21-HB), proximal (EF21-Prox) or DIANA's shifted step; and EF21-P's shared
point, which the broadcast moves directly.

Every replica applies the same downlink with the same code, so the master's copy and each worker's hold the same
bits; a checksum over (x, g, v) catches one that drifts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .prox import Prox

if TYPE_CHECKING:
    from .base import Downlink


@dataclass(frozen=True)
class StepRule:
    """How x moves once g is updated: x ← x − s·g; with ``momentum`` η (EF21-HB) v ← ηv + g (v⁰ = g⁰) and
    x ← x − s·v; with ``prox`` x ← prox_{s·r}(x − s·g).

    ``shift`` α (DIANA): g holds the shift h, and an added downlink D moves x ← x − s·(h + D·scale) before
    h ← h + α·D·scale (a replacing one sets h ← D·scale and steps as usual: the round-0 start).
    ``primal`` (EF21-P, the workers' replica): x is the shared point w and the downlink moves it,
    w ← w + D·scale; g and the step are unused."""

    x_step: float
    """s: γ for most methods, 1 for EF whose messages already carry γ."""
    momentum: float = 0.0
    prox: Prox | None = None
    shift: float | None = None
    primal: bool = False


@dataclass(eq=False)
class Replica:
    x: np.ndarray
    g: np.ndarray
    rule: StepRule
    v: np.ndarray | None = None
    """The heavy ball's direction (None until the first round, and without momentum)."""

    @property
    def x_step(self) -> float:
        return self.rule.x_step

    @staticmethod
    def start(x0: np.ndarray, rule: StepRule | float) -> Replica:
        if not isinstance(rule, StepRule):
            rule = StepRule(float(rule))
        return Replica(np.array(x0, dtype=np.float64, copy=True), np.zeros_like(x0, dtype=np.float64), rule)

    def apply(self, down: Downlink) -> None:
        rule = self.rule
        if rule.primal:
            down.vector.add_to(self.x, down.scale)
            return
        if rule.shift is not None and down.mode == "add":
            # DIANA: x moves by h + D·scale (built in a scratch vector so that h keeps its own bits), then h moves.
            direction = self.g.copy()
            down.vector.add_to(direction, down.scale)
            self.x -= rule.x_step * direction
            down.vector.add_to(self.g, rule.shift * down.scale)
            return
        if down.mode == "replace":
            self.g[:] = 0.0
        down.vector.add_to(self.g, down.scale)
        if rule.momentum > 0.0:
            if self.v is None:
                self.v = self.g.copy()
            else:
                self.v *= rule.momentum
                self.v += self.g
            self.x -= rule.x_step * self.v
        else:
            self.x -= rule.x_step * self.g
        if rule.prox is not None:
            rule.prox.apply(self.x, rule.x_step)

    def state_arrays(self) -> list[np.ndarray]:
        """What a checksum or a hand-over covers: x, g and (with momentum) v."""
        return [self.x, self.g] + ([] if self.v is None else [self.v])
