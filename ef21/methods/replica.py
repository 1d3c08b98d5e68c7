"""(x, g): the model and the aggregate direction, held identically by the master and every worker, and the step
that moves x — plain, heavy ball (EF21-HB) or proximal (EF21-Prox).

Every replica applies the same downlink with the same code, so the master's copy and each worker's hold the same
bits; a checksum over (x, g, v) catches one that drifts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .prox import Prox

if TYPE_CHECKING:
    from .base import Downlink


@dataclass(frozen=True)
class StepRule:
    """How x moves once g is updated: x ← x − s·g; with ``momentum`` η (EF21-HB) v ← ηv + g (v⁰ = g⁰) and
    x ← x − s·v; with ``prox`` x ← prox_{s·r}(x − s·g)."""

    x_step: float
    """s: γ for most methods, 1 for EF whose messages already carry γ."""
    momentum: float = 0.0
    prox: Prox | None = None


@dataclass(eq=False)
class Replica:
    x: np.ndarray
    g: np.ndarray
    rule: StepRule
    v: np.ndarray | None = None
    """The heavy ball's direction (None until the first round, and without momentum)."""
    scratch: np.ndarray | None = field(default=None, repr=False)
    """The step's product s·g, in a buffer kept across rounds: the step allocates nothing of size d."""

    @property
    def x_step(self) -> float:
        return self.rule.x_step

    @staticmethod
    def start(x0: np.ndarray, rule: StepRule | float) -> Replica:
        if not isinstance(rule, StepRule):
            rule = StepRule(float(rule))
        return Replica(np.array(x0, dtype=np.float64, copy=True), np.zeros_like(x0, dtype=np.float64), rule)

    def apply(self, down: Downlink) -> None:
        if down.mode == "replace":
            self.g[:] = 0.0
        down.vector.add_to(self.g, down.scale)
        rule = self.rule
        direction = self.g
        if rule.momentum > 0.0:
            if self.v is None:
                self.v = self.g.copy()
            else:
                self.v *= rule.momentum
                self.v += self.g
            direction = self.v
        if self.scratch is None or self.scratch.shape != self.x.shape:
            self.scratch = np.empty_like(self.x)
        # x −= s·g in two passes, as numpy's own expression computes it (the same bits), into the kept buffer.
        np.multiply(direction, rule.x_step, out=self.scratch)
        np.subtract(self.x, self.scratch, out=self.x)
        if rule.prox is not None:
            rule.prox.apply(self.x, rule.x_step)

    def state_arrays(self) -> list[np.ndarray]:
        """What a checksum or a hand-over covers: x, g and (with momentum) v."""
        return [self.x, self.g] + ([] if self.v is None else [self.v])
