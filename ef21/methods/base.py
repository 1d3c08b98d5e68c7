"""The shape every method has: what a worker computes and sends, what the master does with it.

A round, for every method:

1. every replica holds (x, g); a worker evaluates ∇f_i at its replica's x;
2. ``worker_step`` turns that gradient (or a stochastic estimate of it, ``ef21.methods.estimators``) and the worker's
   state into a ``Message`` (the uplink);
3. ``master_aggregate`` folds the messages, in rank order, into a ``Downlink`` and its own state (with EF21-W's
   weights, the weighted sum Σ w_i c_i);
4. the master may transform the downlink (EF21-BC compresses it, ``ef21.methods.downlink``);
5. master and workers apply the same ``Downlink`` to their replicas with ``Replica.apply``: g ← g + D·scale (or
   g ← D·scale), then the step (x ← x − s·g, or with heavy ball or a prox, ``ef21.methods.replica``), so every replica
   holds the same bits as the master. (EF21-P: the workers' replica is the shared point w, which the broadcast
   moves directly; the master keeps the model (x, g) apart, ``ef21.methods.downlink``.)

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

from ef21.compression.compressors import Compressor
from ef21.compression.ops import NUMPY, ArrayOps
from ef21.compression.sparse import SparseVector, sparse_sum

InitMode = Literal["full", "compressed"]


@dataclass(frozen=True, eq=False)
class Message:
    """A worker's uplink for one round.

    ``replace`` is EF21+'s selector bit: True when the worker's g_i was replaced by a fresh compressed gradient
    (the master then replaces its copy) rather than moved by an EF21 delta.
    """

    vector: SparseVector
    replace: bool = False
    buffers: SparseVector | None = None
    """The change of the model's buffers by this round's training forwards (``ef21.methods.buffers``)."""


@dataclass(frozen=True, eq=False)
class Downlink:
    """What every replica applies after a round: ``vector`` is the rank-ordered sum, ``scale`` is 1/n."""

    vector: SparseVector
    mode: Literal["add", "replace"]
    scale: float
    buffers: SparseVector | None = None
    """The mean change of the model's buffers, added to every replica's b (``ef21.methods.buffers``)."""


@dataclass(frozen=True)
class WorkerContext:
    """What a worker's method step may use besides its gradient and state."""

    compressor: Compressor
    gamma: float
    init: InitMode
    rng: np.random.Generator | None
    round: int = 0
    """The round being computed (MARINA's shared coin is drawn from (seed, round))."""
    scratch: np.ndarray | None = None
    """A d-long buffer (the vectors' dtype) the step may overwrite. Given, the step may also update its state in place and
    return it as an ``InPlace`` (the caller commits it, or undoes it when the round leaves the message out); the
    steady round then allocates nothing of size d. None: the step copies (callers that keep the old state)."""
    mag: np.ndarray | None = None
    """A second d-long buffer, for Top-k's magnitudes (``ef21.compression.compressors.compress``)."""
    cand: np.ndarray | None = None
    """A kept int64 buffer for Top-k's candidates on the fused path (``TopK.compress_difference``): given, with
    ``scratch``, a steady EF21 step may compress ∇ − g_i in one compiled pass over d without forming it."""
    ops: ArrayOps = NUMPY
    """The backend of the worker's vectors (``grad``, the state, the buffers above): numpy, or the objective's own
    (PyTorch's tensors on the model's device, ``ef21.problems.torch.ops``). Methods whose ``worker_step`` does its
    vector work through ``ops`` say so with ``ops_aware = True``; the others are always handed numpy."""


@dataclass(frozen=True, eq=False)
class InPlace:
    """A worker state its step changed in place at ``indices`` (their previous values in ``before``): committing
    is free and undoing, for a round that left the message out, is O(k) — where a copy of the state was O(d)."""

    state: Any
    indices: np.ndarray
    before: Any
    ops: ArrayOps = NUMPY

    def undo(self) -> Any:
        self.ops.put(self.state, self.indices, self.before)
        return self.state


def committed(pending: Any) -> Any:
    """The state a step left, once the round took its message."""
    return pending.state if isinstance(pending, InPlace) else pending


class Method(Protocol):
    name: str
    needs_contractive: bool  # the theory needs C ∈ B(α)
    uncompressed: bool  # sends full gradients (GD): stepsize 1/L, compressor ignored
    gamma_in_message: bool  # EF: γ is inside the compressed vector, so x moves by −mean(w)
    tolerates_missing: bool  # a round may close without some workers (EF21-PP semantics)

    def worker_init(self, d: int) -> Any: ...

    def worker_step(self, state: Any, grad: np.ndarray, ctx: WorkerContext,
                    reference: np.ndarray | None) -> tuple[Message, Any, float | None]:
        """Returns (message, new state, distortion ‖ĝ_i − reference‖² of the worker's new estimate ĝ_i).

        ``grad`` is what the worker compresses against (∇f_i(x) or an estimate of it); it is never modified.
        ``reference`` is the vector the distortion is measured against: ``grad`` itself (the full-gradient case,
        computed from the residual in hand), another vector (∇f_i(x) when ``grad`` is stochastic), or None (not
        wanted this round)."""

    def stale_distortion(self, state: Any, reference: np.ndarray) -> float | None:
        """‖ĝ_i − reference‖² of a worker that sits out a round (its estimate unchanged); None if undefined."""

    def master_init(self, n: int, d: int, dtype: Any = np.float64) -> np.ndarray | None:
        """The master's per-worker state (n × d rows), or None for methods that need none."""

    def master_aggregate(self, rows: np.ndarray | None, messages: Sequence[Message | None], d: int,
                         weights: np.ndarray | None = None, round_: int = 0) -> Downlink:
        """Fold round ``round_``'s messages (rank order, None = left out) into the downlink, updating ``rows``.
        ``weights`` (EF21-W): the aggregate moves by Σ w_i c_i instead of (1/n)Σ c_i."""

    def master_worker_state(self, rows: np.ndarray | None, rank: int) -> np.ndarray | None:
        """Worker ``rank``'s row as the master keeps it, for a replacement; None: start it fresh."""

    def resume_state(self, row: np.ndarray) -> Any:
        """A replacement worker's method state from the row the master handed it (``master_worker_state``)."""


def sum_messages(messages: Sequence[Message | None], d: int, weights: np.ndarray | None = None) -> SparseVector:
    """Σ c_i in rank order, or Σ w_i c_i: each message scaled by its weight first, then summed in rank order."""
    if weights is None:
        return sparse_sum([m.vector for m in messages if m is not None], d)
    return sparse_sum([m.vector.scaled(float(weights[r])) for r, m in enumerate(messages) if m is not None], d)


def require_all(method: str, messages: Sequence[Message | None]) -> None:
    if any(m is None for m in messages):
        raise ValueError(f"{method} cannot close a round without every worker")


class Stateless:
    """Master side of methods whose aggregate replaces g every round and that keep nothing per worker."""

    name: str
    tolerates_missing = False

    def master_init(self, n: int, d: int, dtype: Any = np.float64) -> None:
        return None

    def master_aggregate(self, rows: None, messages: Sequence[Message | None], d: int,
                         weights: np.ndarray | None = None, round_: int = 0) -> Downlink:
        require_all(self.name, messages)
        return Downlink(sum_messages(messages, d), "replace", 1.0 / len(messages))

    def master_worker_state(self, rows: None, rank: int) -> None:
        return None

    def resume_state(self, row: np.ndarray) -> Any:
        return row

    def stale_distortion(self, state: Any, reference: np.ndarray) -> None:
        return None


def sq_dist(a: np.ndarray, b: np.ndarray) -> float:
    r = a - b
    return float(r @ r)


def distortion_of(estimate: SparseVector | np.ndarray, grad: np.ndarray, reference: np.ndarray | None) -> float | None:
    """‖estimate − reference‖² (None when no reference is wanted)."""
    if reference is None:
        return None
    dense = estimate.to_dense() if isinstance(estimate, SparseVector) else estimate
    return sq_dist(dense, reference)
