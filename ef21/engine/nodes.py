"""The two roles of a round, with their state, independent of any transport.

``WorkerNode`` and ``MasterNode`` are what the simulator drives in one process and what the gRPC worker and
master drive over the network, so both give the same numbers. What a run's two sides agree on (method,
compressors, stepsize, estimator, step rule, participation, weights) is resolved once into a ``Plan``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ef21.compression.compressors import Compressor
from ef21.compression.ops import NUMPY, ArrayOps
from ef21.compression.sparse import SparseVector
from ef21.methods import Downlink, InitMode, Message, Method, WorkerContext
from ef21.methods.base import InPlace, committed
from ef21.methods.buffers import buffer_delta, mean_delta
from ef21.methods.downlink import BroadcastCompressor, PrimalBroadcast
from ef21.methods.estimators import EstimateContext, Estimator, Full
from ef21.methods.participation import participants
from ef21.methods.replica import Replica, StepRule
from ef21.methods.streams import round_rng
from ef21.problems.objectives import Objective, SeparableQuadratic, _DesignMatrix


def is_eval_round(t: int, eval_every: int, rounds: int) -> bool:
    """Rounds on which workers evaluate f_i and ∇f_i exactly for the log (and send their dense gradient)."""
    return t % eval_every == 0 or t >= rounds


def sends_eval_grad(eval_grad: bool, tol: float, has_metrics: bool) -> bool:
    """Whether a worker's evaluation carries its dense ∇f_i(x^t) (for the log's ‖∇f‖²): always for objectives
    without metrics of their own (it is their figure) and when ``--tol`` stops on ‖∇f‖²; for the others only with
    ``--eval-grad``, since at model scale those d floats per worker are most of what an evaluation moves."""
    return eval_grad or tol > 0 or not has_metrics


@dataclass(frozen=True, eq=False)
class WorkerReport:
    """One worker's output for a round: the uplink (None when it sits the round out) and what the log needs
    (None when the round does not evaluate)."""

    round: int
    message: Message | None
    f: float | None
    grad: np.ndarray | None
    """∇f_i(x^t), the full local gradient (evaluation rounds)."""
    distortion: float | None
    """‖g_i^{t+1} − ∇f_i(x^t)‖² of the worker's new estimate (evaluation rounds)."""
    metrics: dict[str, float] | None = None


@dataclass(frozen=True)
class WorkerSetting:
    """What a worker needs beyond its objective, as the master (or the simulator) resolved it."""

    gamma: float
    rule: StepRule
    init: InitMode = "full"
    seed: int = 0
    n: int = 1
    estimator: Estimator = Full()
    tau: int = 0
    """This worker's minibatch size τ_i (stochastic estimators)."""
    page_p: float = 1.0
    grad_scale: float = 1.0
    """1/(n·w_i) for EF21-W, else 1: the worker compresses against ∇f_i/(n·w_i)."""
    participation: int | None = None


# Objectives whose ``grad`` is known to give value_and_grad's gradient bit for bit (a plugin's might not).
_GRAD_ONLY = (_DesignMatrix, SeparableQuadratic)


def gradient(objective: Any, x: np.ndarray) -> np.ndarray:
    """∇f_i(x) alone, for rounds that do not log f_i: the built-in objectives' ``grad`` skips the value's O(d) or
    O(N_i) passes and returns the same bits as ``value_and_grad``; other objectives (plugins, PyTorch) are asked
    for both."""
    grad = getattr(objective, "grad", None)
    return grad(x) if isinstance(objective, _GRAD_ONLY) and grad is not None else objective.value_and_grad(x)[1]


def backend_for(objective: Any, method: Method, rule: StepRule, dtype: np.dtype = np.dtype(np.float64)) -> ArrayOps:
    """Where the worker keeps its method vectors: the objective's backend (``array_ops()``: a PyTorch model's
    tensors on its device) when it offers one and the method and the step can use it (``ops_aware``,
    ``Replica.supports``), else numpy. Either gives the same bits. A ``--dtype float32`` run stays on numpy: the
    tensor backend is float64, and a float32 model already hands its gradient over without a float64 copy."""
    make = getattr(objective, "array_ops", None)
    ops = make() if make is not None and dtype == np.float64 else None
    if ops is None or not getattr(method, "ops_aware", False) or not Replica.supports(rule):
        return NUMPY
    return ops


class WorkerNode:
    """A worker's state across rounds: its method state, estimator state and replica of (x, g)."""

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
        setting: WorkerSetting | None = None,
        g: np.ndarray | None = None,
        v: np.ndarray | None = None,
        state: Any = None,
        round_: int = 0,
        buffers: np.ndarray | None = None,
        extra_state: dict[str, np.ndarray] | None = None,
    ) -> None:
        """A fresh worker (round 0), or with ``g``, ``v``, ``state``, ``extra_state`` (the replica's buffers and
        optimizer state) and ``round_`` one that takes over a running rank (its estimator state, if any, restarts
        from the full gradient). ``state`` is the row the master kept for the rank, which the method turns into its
        own state (``Method.resume_state``). ``buffers``: the model's b⁰."""
        self.method = method
        self.compressor = compressor
        self.objective = objective
        self.rank = rank
        self.setting = setting or WorkerSetting(gamma, StepRule(1.0 if method.gamma_in_message else gamma),
                                                init, seed)
        self.gamma = self.setting.gamma
        self.ops = backend_for(objective, method, self.setting.rule, np.asarray(x0).dtype)
        self.state: Any = method.worker_init(objective.d) if state is None else method.resume_state(state)
        if self.ops is not NUMPY and self.state is not None:
            self.state = self.ops.from_numpy(self.state)  # an ops-aware method's state is one vector, or None
        self.est_state: Any = None
        self.replica = Replica.start(x0, self.setting.rule, buffers, self.ops)
        self.replica.scratch = self.ops.empty_like(self.replica.x)  # x −= s·g's product, kept: see Replica.scratch
        if extra_state is not None:
            self.replica.set_extra_state(extra_state)
        self.replica.set_vectors(g=g, v=v)
        self.round = round_
        self.x_prev: np.ndarray | None = None
        self._pending: Any = None
        self._pending_est: Any = None
        # The method step's two d-long buffers (residual, Top-k's magnitudes), kept across rounds.
        self._scratch: tuple[Any, Any, np.ndarray] | None = None
        self._x64: np.ndarray | None = None  # a float32 run's x, widened for the objective (``_point``)

    def participates(self, round_: int | None = None) -> bool:
        s = self.setting
        chosen = participants(s.seed, self.round if round_ is None else round_, s.n, s.participation)
        return chosen is None or self.rank in chosen

    def step(self, *, evaluate: bool = True) -> WorkerReport:
        """Round ``self.round``: evaluate at the replica's x what the round needs and produce the message (round 0:
        the initialization), or none when sampled participation leaves this worker out.

        The new method state is held back until ``apply`` says whether the master included the message.
        """
        s, t, x = self.setting, self.round, self._point()
        begin = getattr(self.objective, "begin_round", None)
        if begin is not None:  # seeds the round's draws (dropout, augmentation); the model's buffers b^t
            begin((s.seed, self.rank, t), self.replica.buffers)
        participate = self.participates()
        ectx = EstimateContext(t, self.rank, s.seed, s.tau, s.page_p)
        f = full = None
        if evaluate:
            f, full = self.objective.value_and_grad(x)
        elif participate and s.estimator.needs_full(self.est_state, ectx):
            full = gradient(self.objective, x)
        full = self._cast(full)
        metrics = self._metrics(x) if evaluate else None
        if not participate:
            self._pending, self._pending_est = self.state, self.est_state
            dist = None
            if evaluate:
                assert full is not None
                state = None if self.state is None else self.ops.to_numpy(self.state)  # numpy's: the state as is
                dist = self.method.stale_distortion(state, self.ops.to_numpy(self._scaled(full)))
            return WorkerReport(t, None, f, self._host(full), dist, metrics)
        est, self._pending_est = s.estimator.estimate(self.est_state, self.objective, x, self.x_prev, full, ectx)
        est = self._scaled(self._cast(est))
        # G measures the new estimate against ∇f_i(x) (EF21-W: ∇f_i/(n·w_i), what the worker tracks). With full
        # gradients that is the vector being compressed, which lets the method reuse its residual.
        reference = None
        if evaluate:
            assert full is not None
            reference = est if not s.estimator.stochastic else self._scaled(full)
        rng = round_rng(s.seed, self.rank, t) if self.compressor.randomized else None
        if self._scratch is None:
            k = getattr(self.compressor, "k", 0)
            # Top-k's fused path keeps its candidates (about 2k + 32) here; more sends it down the numpy path.
            like = self.replica.x  # the buffers take its backend and dtype (a float32 run's float32)
            self._scratch = (self.ops.empty_like(like), self.ops.empty_like(like),
                             np.empty(min(like.shape[0], 8 * k + 4096), dtype=np.int64))
        ctx = WorkerContext(self.compressor, self.gamma, s.init, rng, t, scratch=self._scratch[0],
                            mag=self._scratch[1], cand=self._scratch[2], ops=self.ops)
        msg, self._pending, dist = self.method.worker_step(self.state, est, ctx, reference)
        if self.replica.buffers is not None:
            new = getattr(self.objective, "round_buffers", lambda: None)()
            msg = dataclasses.replace(msg, buffers=buffer_delta(new, self.replica.buffers))
        if not evaluate:  # a gradient computed for the estimator (round 0, PAGE's coin) is not an evaluation
            return WorkerReport(t, msg, None, None, None, None)
        return WorkerReport(t, msg, f, self._host(full), dist, metrics)

    def _host(self, v: Any) -> np.ndarray | None:
        """An evaluation's gradient as numpy, what the log and the wire take (a view on CPU)."""
        return None if v is None else self.ops.to_numpy(v)

    def _point(self) -> np.ndarray:
        """x as the objective takes it. A float32 run casts at the boundary: the built-in and plugin objectives
        see x widened to float64 (exactly; into a kept buffer) and compute in float64, as their data are, and the
        gradient is rounded to float32 once (``_cast``), so none of their sums runs half in float32. An objective
        with ``accepts_float32`` (a PyTorch model, float32 already; the separable quadratic, which widens and
        rounds inside its own two operations with the same bits) takes the float32 x itself and returns a float32
        gradient: no float64 round trip."""
        x = self.replica.x
        if self.ops is not NUMPY or x.dtype == np.float64 or getattr(self.objective, "accepts_float32", False):
            return x
        if self._x64 is None:
            self._x64 = np.empty(x.shape[0])
        np.copyto(self._x64, x)
        return self._x64

    def _cast(self, v: np.ndarray | None) -> np.ndarray | None:
        """A gradient in the replica's dtype (see ``_point``): one rounding of a float64 gradient, no copy of a
        float32 one."""
        dtype = self.replica.x.dtype
        return v if v is None or v.dtype == dtype else v.astype(dtype)

    def _scaled(self, v: np.ndarray) -> np.ndarray:
        scale = float(self.setting.grad_scale)  # a Python float keeps a float32 vector float32
        return v if scale == 1.0 else v * scale

    def _metrics(self, x: np.ndarray) -> dict[str, float] | None:
        fn = getattr(self.objective, "metrics", None)
        return None if fn is None else fn(x)

    def apply(self, down: Downlink, included: bool = True) -> None:
        """Apply the round's downlink; a worker left out of the round keeps its previous state."""
        if included:
            self.state = committed(self._pending)
            self.est_state = self._pending_est
        elif isinstance(self._pending, InPlace):
            self._pending.undo()  # the step moved g_i in place; the round did not take it
        self._pending = self._pending_est = None
        if self.setting.estimator.name == "page":
            # PAGE evaluates its minibatch at x^{t+1} and x^t: keep the point this round started from.
            if self.x_prev is None:
                self.x_prev = self.ops.copy(self.replica.x)
            else:
                self.x_prev[:] = self.replica.x
        self.replica.apply(down)
        self.round += 1


class MasterNode:
    """The master's state: its replica of (x, g), the method's per-worker rows (EF21's g_i), EF21-W's weights and
    EF21-BC's broadcast compressor, or EF21-P's copy of the workers' point w."""

    def __init__(self, method: Method, n: int, x0: np.ndarray, *, gamma: float, rule: StepRule | None = None,
                 weights: np.ndarray | None = None, downlink: BroadcastCompressor | None = None,
                 rows_dtype: Any = np.float64, buffers: np.ndarray | None = None,
                 primal: PrimalBroadcast | None = None) -> None:
        self.method = method
        self.n = n
        self.d = x0.shape[0]
        self.rows: np.ndarray | None = method.master_init(n, self.d, rows_dtype)
        self.replica = Replica.start(x0, rule or StepRule(1.0 if method.gamma_in_message else gamma), buffers)
        self.weights = weights
        self.downlink = downlink
        self.primal = primal
        self.round = 0

    @property
    def x(self) -> np.ndarray:
        return self.replica.x

    @property
    def shared(self) -> Replica:
        """The replica every worker holds a copy of: the master's own, or with EF21-P the point w."""
        return self.replica if self.primal is None else self.primal.shared

    def aggregate(self, messages: Sequence[Message | None]) -> Downlink:
        """Fold one round's messages, in rank order (None: left out), and move (x, g); returns the downlink."""
        down = self.fold(messages)
        self.apply(down)
        return down

    def fold(self, messages: Sequence[Message | None]) -> Downlink:
        """The round's downlink and the method's per-worker state: O(n·k) for sparse messages (EF21-BC adds an
        O(d) pass: its compressor looks at the whole g̃ − g; EF21-P moves the model here, O(d), and compresses
        x^{t+1} − w).

        Split from ``apply`` so that a networked master can send the downlink before it spends O(d) on its own
        replica, which then overlaps with the workers' next gradient.
        """
        if len(messages) != self.n:
            raise ValueError(f"expected {self.n} messages, got {len(messages)}")
        down = self.method.master_aggregate(self.rows, messages, self.d, self.weights, round_=self.round)
        if self.primal is not None:
            # EF21-P's broadcast is of the model the uplink has just moved: the model's O(d) step comes first.
            self.replica.apply(down)
            return self.primal.transform(self.replica.x, self.round)
        if self.downlink is not None:
            down = self.downlink.transform(down, self.replica.g, self.round)
        b = self.replica.buffers
        if b is not None:
            empty = SparseVector.zeros(b.shape[0])
            deltas = [empty if m.buffers is None else m.buffers for m in messages if m is not None]
            down = dataclasses.replace(down, buffers=mean_delta(deltas, b.shape[0]))
        return down

    def apply(self, down: Downlink) -> None:
        """Apply the round's broadcast: to the master's replica, or with EF21-P to its copy of w."""
        self.shared.apply(down)
        self.round += 1

    def worker_state(self, rank: int) -> Any:
        return self.method.master_worker_state(self.rows, rank)
