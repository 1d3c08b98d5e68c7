"""One worker's connection as the master sees it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from ef21.problems.layout import ModelLayout
from ef21_wire.protocol import GRPC_FRAME_BYTES


@dataclass
class SetupInfo:
    smoothness: float | None
    """L_i; None when the objective gives none."""
    shard_rows: int
    gram: np.ndarray | None
    diagonal: np.ndarray | None
    n_samples: int | None = None
    x0: np.ndarray | None = None
    power_iteration: bool = False
    layout: ModelLayout | None = None
    """A model's tensors (the same for every worker: checked at set-up)."""
    buffers0: np.ndarray | None = None
    """A model's initial buffers b⁰."""


@dataclass(frozen=True)
class EvalInfo:
    """A worker's evaluation of one round: ∇f_i(x^t), f_i(x^t), its distortion and metrics, and the bytes."""

    grad: np.ndarray
    f: float
    distortion: float | None
    metrics: dict[str, float] | None
    nbytes: int


@dataclass(eq=False)
class WorkerSession:
    """A stream that owns a rank. ``outbox`` carries serialized MasterMessages to the stream's writer;
    None closes the stream."""

    rank: int
    peer: str
    hostname: str
    state: str = "joining"  # joining → ready → running → done | lost
    connected_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    rounds_done: int = 0
    late: int = 0
    """Messages that arrived after their round had closed without this worker."""
    bytes_up: int = 0
    """Everything this worker's stream carried up (Hello, Setup, Updates, Evals, …), each message as serialized plus
    gRPC's 5-byte prefix: its set-up and evaluations included, unlike the run's round traffic (``wire_bytes_up``)."""
    bytes_down: int = 0
    """Everything sent down this stream (Welcome, Start, RoundResults, …), counted the same way."""
    last_error: str = ""
    """Why the worker left, when it said so (its objective failed)."""
    setup: SetupInfo | None = None
    outbox: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)

    def send(self, raw: bytes) -> None:
        self.bytes_down += len(raw) + GRPC_FRAME_BYTES
        self.outbox.put_nowait(raw)

    def close(self) -> None:
        self.outbox.put_nowait(None)

    def received(self, raw: bytes) -> None:
        """A message of this stream arrived: count it and note the time."""
        self.bytes_up += len(raw) + GRPC_FRAME_BYTES
        self.last_seen = time.time()

    def seen(self) -> None:
        self.last_seen = time.time()

    def describe(self) -> dict:
        now = time.time()
        return {
            "rank": self.rank,
            "address": self.peer,
            "hostname": self.hostname,
            "state": self.state,
            "connected_at": self.connected_at,
            "last_seen": self.last_seen,
            "last_seen_ago_s": round(now - self.last_seen, 3),
            "rounds_done": self.rounds_done,
            "late_messages": self.late,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "last_error": self.last_error or None,
        }


class Refusal(Exception):
    """A peer's request is refused; the stream ends with this gRPC status code name and message. ``objective``: the
    worker's objective does not fit the run (another d, another model): the worker reports that itself, as bad
    input, so ``ef21 run`` does not say it twice."""

    def __init__(self, code: str, message: str, *, objective: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.objective = objective
