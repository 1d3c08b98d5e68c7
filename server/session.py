"""What a worker's stream brings the master: its set-up, its evaluations, and the refusal that ends a stream."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ef21.problems.layout import ModelLayout


@dataclass
class SetupInfo:
    smoothness: float | None
    """L_i; None when the objective gives none."""
    shard_rows: int
    has_gram: bool
    """The worker sends its shard's Gram when asked (``curvature.GramRun``)."""
    diagonal: np.ndarray | None
    n_samples: int | None = None
    x0: np.ndarray | None = None
    power_iteration: bool = False
    layout: ModelLayout | None = None
    """A model's tensors (the same for every worker: checked at set-up)."""
    buffers0: np.ndarray | None = None
    """A model's initial buffers b⁰."""
    x0_digest: bytes = b""
    """Digest of the x0 the worker computed itself (``ef21_wire.serde.vector_digest``); empty: it cannot."""


@dataclass(frozen=True)
class EvalInfo:
    """A worker's evaluation of one round: ∇f_i(x^t), f_i(x^t), its distortion and metrics, and the bytes."""

    grad: np.ndarray | None
    """None: left out (the objective reports metrics; ``ef21.engine.nodes.sends_eval_grad``)."""
    f: float
    distortion: float | None
    metrics: dict[str, float] | None
    nbytes: int


class Refusal(Exception):
    """A peer's request is refused; the stream ends with this gRPC status code name and message. ``objective``: the
    worker's objective does not fit the run (another d, another model): the worker reports that itself, as bad
    input, so ``ef21 run`` does not say it twice."""

    def __init__(self, code: str, message: str, *, objective: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.objective = objective
