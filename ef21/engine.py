"""The two roles of a round, with their state, independent of any transport.

``WorkerNode`` and ``MasterNode`` are what the simulator drives in one process and what the gRPC worker and
master drive over the network, so both give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .compressors import Compressor
from .methods import Downlink, InitMode, Message, Method, Replica, WorkerContext
from .objectives import Objective


def round_rng(seed: int, rank: int, round_: int) -> np.random.Generator:
    """The generator of one worker in one round: a pure function of (seed, rank, round), so runs replay exactly."""
    return np.random.default_rng([seed, rank, round_])


@dataclass(frozen=True, eq=False)
class WorkerReport:
    """One worker's output for a round: the uplink message and what the log needs."""

    round: int
    message: Message
    f: float
    grad: np.ndarray
    distortion: float


class WorkerNode:
    """A worker's state across rounds: its method state and its replica of (x, g)."""

    def __init__(
        self,
        method: Method,
        compressor: Compressor,
        objective: Objective,
        rank: int,
        *,
        gamma: float,
        x0: np.ndarray,
        init: InitMode = "full",
        seed: int = 0,
        g: np.ndarray | None = None,
        state: Any = None,
        round_: int = 0,
    ) -> None:
        """A fresh worker (round 0), or with ``g``, ``state`` and ``round_`` one that takes over a running rank."""
        self.method = method
        self.compressor = compressor
        self.objective = objective
        self.rank = rank
        self.gamma = gamma
        self.init = init
        self.seed = seed
        self.state: Any = method.worker_init(objective.d) if state is None else state
        self.replica = Replica.start(x0, 1.0 if method.gamma_in_message else gamma)
        if g is not None:
            self.replica.g[:] = g
        self.round = round_
        self._pending: Any = None

    def step(self) -> WorkerReport:
        """Evaluate ∇f_i at the replica's x and produce this round's message (round 0: the initialization).

        The new method state is held back until ``apply`` says whether the master included the message.
        """
        f, grad = self.objective.value_and_grad(self.replica.x)
        rng = round_rng(self.seed, self.rank, self.round) if self.compressor.randomized else None
        ctx = WorkerContext(self.compressor, self.gamma, self.init, rng)
        msg, self._pending, dist = self.method.worker_step(self.state, grad, ctx)
        return WorkerReport(self.round, msg, f, grad, dist)

    def apply(self, down: Downlink, included: bool = True) -> None:
        """Apply the round's downlink; a worker left out of the round keeps its previous state."""
        if included:
            self.state = self._pending
        self._pending = None
        self.replica.apply(down)
        self.round += 1


class MasterNode:
    """The master's state: its replica of (x, g) and the method's master state (e.g. EF21+'s g_i)."""

    def __init__(self, method: Method, n: int, x0: np.ndarray, *, gamma: float) -> None:
        self.method = method
        self.n = n
        self.d = x0.shape[0]
        self.rows: np.ndarray | None = method.master_init(n, self.d)
        self.replica = Replica.start(x0, 1.0 if method.gamma_in_message else gamma)
        self.round = 0

    @property
    def x(self) -> np.ndarray:
        return self.replica.x

    def aggregate(self, messages: Sequence[Message | None]) -> Downlink:
        """Fold one round's messages, in rank order (None: left out), and move (x, g); returns the downlink."""
        down = self.fold(messages)
        self.apply(down)
        return down

    def fold(self, messages: Sequence[Message | None]) -> Downlink:
        """The round's downlink and the method's per-worker state: O(n·k) for sparse messages.

        Split from ``apply`` so that a networked master can send the downlink before it spends O(d) on its own
        replica, which then overlaps with the workers' next gradient.
        """
        if len(messages) != self.n:
            raise ValueError(f"expected {self.n} messages, got {len(messages)}")
        return self.method.master_aggregate(self.rows, messages, self.d)

    def apply(self, down: Downlink) -> None:
        self.replica.apply(down)
        self.round += 1

    def worker_state(self, rank: int) -> Any:
        return self.method.master_worker_state(self.rows, rank)
