"""L of the whole problem at set-up, from what the workers report: their diagonals or Grams (summed in rank
order), a power iteration whose products they compute (``PowerStep``/``PowerReply``: the master sends v, each
worker returns A_iᵀA_i v), or for a user objective mean L_i. The same computations as ``ef21.problems.problem`` in one
process, so the master and the simulator get the same L to the last bit."""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from ef21.engine.config import RunConfig
from ef21.problems.problem import (
    global_power_iteration,
    global_smoothness_from_diagonals,
    global_smoothness_from_grams,
    smoothness_from_lambda,
    sum_in_rank_order,
)
from ef21_wire.serde import dense_to_proto
from ef21_wire.v1 import ef21_pb2 as pb

from .session import Refusal, SetupInfo
from .streams import StreamState, WorkerStream

log = logging.getLogger("ef21.master")


class SetupInterrupted(Exception):
    """A worker left while the start-up computation needed every worker; wait for n workers again."""


class PowerRun:
    """One power iteration with the workers, product by product; a lost worker interrupts it."""

    def __init__(self, d: int, sessions: dict[int, WorkerStream], ready: asyncio.Event, wake: asyncio.Event) -> None:
        self.pi = global_power_iteration(d)
        self.sessions, self.ready, self.wake = sessions, ready, wake
        self.replies: dict[int, np.ndarray] = {}

    async def run(self) -> float:
        n = len(self.sessions)
        while not self.pi.done:
            self.replies = {}
            step = pb.MasterMessage(power_step=pb.PowerStep(iteration=self.pi.iterations,
                                                            v=dense_to_proto(self.pi.vector)))
            data = step.SerializeToString()
            for r in range(n):
                self.sessions[r].send(data)
            while len(self.replies) < n:
                if not self.ready.is_set():
                    raise SetupInterrupted
                self.wake.clear()
                await self.wake.wait()
            self.pi.feed(sum_in_rank_order([self.replies[r] for r in range(n)]))
        log.info("L: power iteration converged to %.12g in %d products", self.pi.value, self.pi.iterations)
        return self.pi.value

    def reply(self, s: WorkerStream, iteration: int, w: np.ndarray) -> None:
        if s.state is not StreamState.SET_UP or iteration != self.pi.iterations or s.rank in self.replies:
            raise Refusal("FAILED_PRECONDITION", f"unexpected PowerReply {iteration} from rank {s.rank}")
        self.replies[s.rank] = w
        self.wake.set()


async def smoothness(cfg: RunConfig, infos: list[SetupInfo], power: PowerRun | None) -> float | None:
    """L of the whole problem (see the module docstring); ``power`` runs when neither diagonals nor Grams came.
    None when a user objective gives no L_i."""
    n = len(infos)
    if all(i.diagonal is not None for i in infos):
        return global_smoothness_from_diagonals(sum_in_rank_order([i.diagonal for i in infos]), n)  # type: ignore
    if all(i.gram is not None for i in infos):
        grams = sum_in_rank_order([i.gram for i in infos])  # type: ignore[misc]
        if cfg.objective is not None:
            return float(np.linalg.eigvalsh(grams)[-1]) / n
        return global_smoothness_from_grams(cfg, grams, sum(i.shard_rows for i in infos))
    if cfg.objective is None and all(i.power_iteration for i in infos) and power is not None:
        return smoothness_from_lambda(cfg, await power.run(), sum(i.shard_rows for i in infos))
    if any(i.smoothness is None for i in infos):
        return None
    return sum(i.smoothness for i in infos) / n  # type: ignore[misc]


def needs_power_iteration(cfg: RunConfig, infos: list[SetupInfo]) -> bool:
    return (not all(i.diagonal is not None for i in infos) and not all(i.gram is not None for i in infos)
            and cfg.objective is None and all(i.power_iteration for i in infos))
