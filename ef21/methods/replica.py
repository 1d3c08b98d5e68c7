"""(x, g): the model and the aggregate direction, held identically by the master and every worker, and the step
that moves x — plain, heavy ball (EF21-HB), proximal (EF21-Prox), DIANA's shifted step or an optimizer on g
(``optim``: SGD with momentum or Nesterov, Adam, AdamW, clipping, a schedule) — with the state beside them: the
heavy ball's v, the optimizer's state and the model's buffers b (``buffers``); and EF21-P's shared point, which the
broadcast moves directly.

Every replica applies the same downlink with the same code, so the master's copy and each worker's hold the same
bits; a checksum over all of it catches one that drifts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ef21.compression import kernels
from ef21.compression.ops import NUMPY, ArrayOps

from .optim import State, Transform
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
    optimizer: Transform | None = None
    """An optimizer on g (``ef21.methods.optim``): x ← x + update(g), in place of the steps above."""


@dataclass(eq=False)
class Replica:
    x: np.ndarray
    g: np.ndarray
    rule: StepRule
    v: np.ndarray | None = None
    """The heavy ball's direction (None until the first round, and without momentum)."""
    buffers: np.ndarray | None = None
    """The model's buffers b (None when the objective has none)."""
    opt_state: State | None = None
    """The optimizer's state (None without one)."""
    scratch: np.ndarray | None = field(default=None, repr=False)
    """A d-long buffer for the step's product s·g, kept across rounds so the step allocates nothing of size d (a
    worker's replica); None: a temporary each round (the master's, whose memory target is (n + 3)·8d bytes)."""
    ops: ArrayOps = field(default=NUMPY, repr=False)
    """The backend of x, g and v (``ef21.compression.ops``): numpy, or a worker's model tensors (the plain and the
    heavy-ball steps only: ``supports``). The buffers and the optimizer's state stay numpy."""

    @property
    def x_step(self) -> float:
        return self.rule.x_step

    @staticmethod
    def supports(rule: StepRule) -> bool:
        """Whether x and g may live on a backend other than numpy under ``rule`` (the optimizers, the prox and
        DIANA's and EF21-P's steps are numpy code)."""
        return rule.optimizer is None and rule.prox is None and rule.shift is None and not rule.primal

    @staticmethod
    def start(x0: np.ndarray, rule: StepRule | float, buffers: np.ndarray | None = None,
              ops: ArrayOps = NUMPY) -> Replica:
        if not isinstance(rule, StepRule):
            rule = StepRule(float(rule))
        if ops is not NUMPY and not Replica.supports(rule):
            raise ValueError(f"a {ops.name} replica takes the plain or heavy-ball step only")
        # x and g keep x0's dtype when it is float32 (``--dtype float32``): every vector of the step follows them.
        dtype = np.float32 if x0.dtype == np.float32 else np.float64
        x = ops.from_numpy(np.asarray(x0, dtype=dtype))
        opt = None if rule.optimizer is None else rule.optimizer.init(x.shape[0])
        b = None if buffers is None or len(buffers) == 0 else np.array(buffers, dtype=np.float64, copy=True)
        g = ops.from_numpy(np.zeros(x.shape[0], dtype=dtype))
        return Replica(x, g, rule, buffers=b, opt_state=opt, ops=ops)

    def set_vectors(self, x: np.ndarray | None = None, g: np.ndarray | None = None,
                    v: np.ndarray | None = None) -> None:
        """Take x, g and the heavy ball's v as numpy arrays (a Start, a Resync), onto this replica's backend."""
        if x is not None:
            self.x[:] = self.ops.from_numpy(x)
        if g is not None:
            self.g[:] = self.ops.from_numpy(g)
        if v is not None:
            self.v = self.ops.from_numpy(v)

    def apply(self, down: Downlink) -> None:
        rule = self.rule
        # A Python float (never a numpy float64) times a float32 vector stays float32: one rounding, the same on
        # every replica however the product is formed.
        step = float(rule.x_step)
        if down.buffers is not None and self.buffers is not None:
            down.buffers.add_to(self.buffers)
        ops = self.ops
        if rule.primal:
            down.vector.add_to(self.x, down.scale)
            return
        if rule.shift is not None and down.mode == "add":
            # DIANA: x moves by h + D·scale (built in a scratch vector so that h keeps its own bits), then h moves.
            direction = self.g.copy()
            down.vector.add_to(direction, down.scale)
            self.x -= step * direction
            down.vector.add_to(self.g, rule.shift * down.scale)
            return
        if down.mode == "replace":
            self.g[:] = 0.0
        ops.add_sparse(self.g, down.vector, down.scale)
        if rule.optimizer is not None:
            assert self.opt_state is not None
            update, self.opt_state = rule.optimizer.update(self.g, self.opt_state, self.x)
            self.x += update
        else:
            direction = self.g
            if rule.momentum > 0.0:
                if self.v is None:
                    self.v = ops.copy(self.g)
                else:
                    self.v *= rule.momentum
                    self.v += self.g
                direction = self.v
            if ops is NUMPY and kernels.sub_scaled(self.x, step, direction):
                pass  # one compiled pass, the same bits as the two numpy operations below
            elif self.scratch is None:
                self.x -= step * direction
            else:
                # The same two operations (the same bits), the product into the kept buffer.
                ops.multiply(direction, step, self.scratch)
                ops.subtract(self.x, self.scratch, self.x)
        if rule.prox is not None:
            rule.prox.apply(self.x, rule.x_step)

    def extra_state(self) -> dict[str, np.ndarray]:
        """The state beside (x, g, v) by name: ``buffers`` and the optimizer's ``opt.*`` arrays; what a Start, a
        Resync and a checkpoint carry."""
        out = {} if self.buffers is None else {"buffers": self.buffers}
        if self.opt_state is not None:
            out.update({f"opt.{k}": a for k, a in sorted(self.opt_state.items())})
        return out

    def set_extra_state(self, state: dict[str, np.ndarray]) -> None:
        """Take ``extra_state`` as another replica sent it; ValueError unless it has this replica's names and
        shapes exactly."""
        mine = self.extra_state()
        if set(state) != set(mine):
            raise ValueError(f"replicated state has {sorted(state)}, expected {sorted(mine)}")
        for name, a in state.items():
            if a.shape != mine[name].shape or not np.all(np.isfinite(a)):
                raise ValueError(f"replicated state {name!r} has shape {a.shape} or non-finite values, expected "
                                 f"{mine[name].shape}")
        if self.buffers is not None:
            self.buffers = np.array(state["buffers"], dtype=np.float64, copy=True)
        if self.opt_state is not None:
            self.opt_state = {k: np.array(state[f"opt.{k}"], dtype=np.float64, copy=True) for k in self.opt_state}

    def state_arrays(self) -> list[np.ndarray]:
        """What a checksum covers, as numpy: x, g, (with momentum) v, then the extra state in name order."""
        vectors = [self.x, self.g] + ([] if self.v is None else [self.v])
        return [self.ops.to_numpy(a) for a in vectors] + list(self.extra_state().values())
