"""The shape every method has: what a worker computes and sends, what the master does with it.

A round, for every method:

1. every replica holds (x, g); a worker evaluates ∇f_i at its replica's x;
2. ``worker_step`` turns that gradient and the worker's state into a ``Message`` (the uplink);
3. ``master_aggregate`` folds the messages, in rank order, into a ``Downlink`` and its own state;
4. master and workers apply the same ``Downlink`` to their replicas with ``Replica.apply``: g ← g + D/n (or
   g ← D/n), then x ← x − s·g, so every replica holds the same bits as the master.

Round 0 is the initialization: the first ``worker_step`` of a fresh state sends g_i⁰.

A worker whose message a round leaves out (partial participation, a straggler) is ``None`` in ``messages``; only
methods with ``tolerates_missing`` accept that, and the worker then keeps its previous state. Methods whose workers
hold state the master can reproduce keep a copy of it (``master_worker_state``), so a replacement worker or a
resumed master can carry on exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, Sequence

import numpy as np

from ..compressors import Compressor
from ..sparse import SparseVector, sparse_sum

InitMode = Literal["full", "compressed"]


@dataclass(frozen=True, eq=False)
class Message:
    """A worker's uplink for one round.

    ``replace`` is EF21+'s selector bit: True when the worker's g_i was replaced by a fresh compressed gradient
    (the master then replaces its copy) rather than moved by an EF21 delta.
    """

    vector: SparseVector
    replace: bool = False


@dataclass(frozen=True, eq=False)
class Downlink:
    """What every replica applies after a round: ``vector`` is the rank-ordered sum, ``scale`` is 1/n."""

    vector: SparseVector
    mode: Literal["add", "replace"]
    scale: float


@dataclass(eq=False)
class Replica:
    """(x, g): the model and the aggregate direction, held identically by the master and each worker."""

    x: np.ndarray
    g: np.ndarray
    x_step: float  # s in x ← x − s·g: γ for most methods, 1 for EF whose messages already carry γ

    @staticmethod
    def start(x0: np.ndarray, x_step: float) -> Replica:
        return Replica(np.array(x0, dtype=np.float64, copy=True), np.zeros_like(x0, dtype=np.float64), x_step)

    def apply(self, down: Downlink) -> None:
        if down.mode == "replace":
            self.g[:] = 0.0
        down.vector.add_to(self.g, down.scale)
        self.x -= self.x_step * self.g


@dataclass(frozen=True)
class WorkerContext:
    """What a worker's method step may use besides its gradient and state."""

    compressor: Compressor
    gamma: float
    init: InitMode
    rng: np.random.Generator | None


class Method(Protocol):
    name: str
    needs_contractive: bool  # the theory needs C ∈ B(α)
    uncompressed: bool  # sends full gradients (GD): stepsize 1/L, compressor ignored
    gamma_in_message: bool  # EF: γ is inside the compressed vector, so x moves by −mean(w)
    tolerates_missing: bool  # a round may close without some workers (EF21-PP semantics)

    def worker_init(self, d: int) -> Any: ...

    def worker_step(self, state: Any, grad: np.ndarray, ctx: WorkerContext) -> tuple[Message, Any, float]:
        """Returns (message, new state, distortion ‖ĝ_i − ∇f_i(x)‖² of the worker's new estimate ĝ_i)."""

    def master_init(self, n: int, d: int) -> np.ndarray | None:
        """The master's per-worker state (n × d rows), or None for methods that need none."""

    def master_aggregate(self, rows: np.ndarray | None, messages: Sequence[Message | None], d: int) -> Downlink:
        """Fold one round's messages (rank order, None = left out) into the downlink, updating ``rows``."""

    def master_worker_state(self, rows: np.ndarray | None, rank: int) -> Any:
        """Worker ``rank``'s state as the master knows it, for a replacement; None: start it fresh."""


def sum_messages(messages: Sequence[Message | None], d: int) -> SparseVector:
    return sparse_sum([m.vector for m in messages if m is not None], d)


def require_all(method: str, messages: Sequence[Message | None]) -> None:
    if any(m is None for m in messages):
        raise ValueError(f"{method} cannot close a round without every worker")


class Stateless:
    """Master side of methods whose aggregate replaces g every round and that keep nothing per worker."""

    name: str
    tolerates_missing = False

    def master_init(self, n: int, d: int) -> None:
        return None

    def master_aggregate(self, rows: None, messages: Sequence[Message | None], d: int) -> Downlink:
        require_all(self.name, messages)
        return Downlink(sum_messages(messages, d), "replace", 1.0 / len(messages))

    def master_worker_state(self, rows: None, rank: int) -> None:
        return None


def sq_dist(a: np.ndarray, b: np.ndarray) -> float:
    r = a - b
    return float(r @ r)
