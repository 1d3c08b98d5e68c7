"""L of the whole problem at set-up, from what the workers report: their diagonals (summed in rank order), their
Grams (``GramRequest``/``GramReply``: asked of one rank at a time, in rank order, and folded into the sum as each
comes, so the master holds O(d²) whatever n), a power iteration whose products they compute (``PowerStep``/
``PowerReply``: the master sends v, each worker returns A_iᵀA_i v), or for a user objective mean L_i. The same
computations as ``ef21.problems.problem`` in one process, so the master and the simulator get the same L to the
last bit."""

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

from .heap import HeapTrimmer
from .session import Refusal, SetupInfo
from .streams import StreamState, WorkerStream

log = logging.getLogger("ef21.master")


class SetupInterrupted(Exception):
    """A worker left while the start-up computation needed every worker; wait for n workers again."""


class GramRun:
    """Σ_i A_iᵀA_i from the workers' Grams, asked for in rank order a few at a time (``WINDOW``: the next request
    overlaps the transfer of the one before) and added to the sum in rank order as they come: the sum starts from
    zeros and adds rank 0's, then rank 1's, … — ``sum_in_rank_order``'s bits — while the master holds the sum and
    at most ``WINDOW`` Grams. A lost worker interrupts it; the next try has a new ``attempt`` number, and a late answer
    to an earlier attempt is dropped (``stale_answer``: an honest worker that answered it answers the new request
    too)."""

    WINDOW = 2
    TRIM_EVERY = 4
    """Return the allocator's free memory to the system after every 4th Gram of 1 MB or more (``heap``)."""

    def __init__(self, d: int, sessions: dict[int, WorkerStream], ready: asyncio.Event, wake: asyncio.Event,
                 attempt: int) -> None:
        self.d, self.attempt = d, attempt
        self.sessions, self.ready, self.wake = sessions, ready, wake
        self.n = len(sessions)
        self.sum = np.zeros((d, d))
        self.asked = 0  # ranks asked so far (0 .. asked-1)
        self.folded = 0  # ranks added to the sum so far
        self.replies: dict[int, np.ndarray] = {}
        self._request = pb.MasterMessage(gram_request=pb.GramRequest(attempt=attempt)).SerializeToString()
        self.heap = HeapTrimmer(self.TRIM_EVERY) if 8 * d * d >= 2**20 else None

    async def run(self) -> np.ndarray:
        while self.folded < self.n:
            if self.folded in self.replies:
                self.sum += self.replies.pop(self.folded)
                self.folded += 1
                if self.heap is not None:
                    self.heap.tick()
            elif self.asked < min(self.n, self.folded + self.WINDOW):
                self.sessions[self.asked].send(self._request)
                self.asked += 1
            else:
                if not self.ready.is_set():
                    raise SetupInterrupted
                self.wake.clear()
                await self.wake.wait()
        log.info("L: the Grams of %d workers added in rank order", self.n)
        return self.sum

    def reply(self, s: WorkerStream, gram: bytes, attempt: int) -> None:
        rank = s.rank
        if (attempt != self.attempt or s.state is not StreamState.SET_UP or rank is None
                or not self.folded <= rank < self.asked or rank in self.replies):
            raise Refusal("FAILED_PRECONDITION", f"unexpected GramReply from rank {rank}")
        d = self.d
        if len(gram) != 8 * d * d:
            raise Refusal("INVALID_ARGUMENT", f"GramReply: {len(gram)} bytes, expected {8 * d * d} (d = {d})")
        g = np.frombuffer(gram, dtype="<f8").reshape(d, d)
        if not np.isfinite(g).all():
            raise Refusal("INVALID_ARGUMENT", "GramReply: non-finite curvature")
        self.replies[rank] = g
        self.wake.set()


class PowerRun:
    """One power iteration with the workers, product by product. A lost worker interrupts it; the next try starts
    again from iteration 0 with a new ``attempt`` number, which every step carries and every answer echoes, so a
    late answer to the interrupted attempt's step is dropped (``stale_answer``) rather than taken for the new one's
    (and the worker's real answer then refused as a second)."""

    def __init__(self, d: int, sessions: dict[int, WorkerStream], ready: asyncio.Event, wake: asyncio.Event,
                 attempt: int) -> None:
        self.pi = global_power_iteration(d)
        self.attempt = attempt
        self.sessions, self.ready, self.wake = sessions, ready, wake
        self.replies: dict[int, np.ndarray] = {}

    async def run(self) -> float:
        n = len(self.sessions)
        while not self.pi.done:
            self.replies = {}
            step = pb.MasterMessage(power_step=pb.PowerStep(iteration=self.pi.iterations,
                                                            v=dense_to_proto(self.pi.vector), attempt=self.attempt))
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

    def reply(self, s: WorkerStream, iteration: int, w: np.ndarray, attempt: int) -> None:
        if (attempt != self.attempt or s.state is not StreamState.SET_UP or iteration != self.pi.iterations
                or s.rank in self.replies):
            raise Refusal("FAILED_PRECONDITION", f"unexpected PowerReply {iteration} from rank {s.rank}")
        self.replies[s.rank] = w
        self.wake.set()


CurvatureRun = GramRun | PowerRun


def stale_answer(s: WorkerStream, attempt: int, current: CurvatureRun | None, attempts: int) -> bool:
    """Whether a GramReply/PowerReply answers a set-up attempt a lost worker interrupted (``attempts``: those begun;
    ``current``: the exchange running now, if any): it may arrive while the master waits for n workers again, or
    after the next attempt began, and is dropped — the worker answers the next attempt's request too. An attempt
    never begun (0: an answer to no request, or one from the future) is not stale: the exchange refuses it."""
    if s.state is not StreamState.SET_UP or not 1 <= attempt <= attempts:
        return False
    return current is None or attempt != current.attempt


def curvature_run(cfg: RunConfig, infos: list[SetupInfo], d: int, sessions: dict[int, WorkerStream],
                  ready: asyncio.Event, wake: asyncio.Event, attempt: int) -> CurvatureRun | None:
    """The exchange with the workers that L needs, if any: their Grams when all have one (and no diagonal),
    else a power iteration when all can compute products (built-in objectives only), else none."""
    if all(i.diagonal is not None for i in infos):
        return None
    if all(i.has_gram for i in infos):
        return GramRun(d, sessions, ready, wake, attempt)
    if cfg.objective is None and all(i.power_iteration for i in infos):
        return PowerRun(d, sessions, ready, wake, attempt)
    return None


async def smoothness(cfg: RunConfig, infos: list[SetupInfo], run: CurvatureRun | None) -> float | None:
    """L of the whole problem (see the module docstring), with ``run`` the exchange ``curvature_run`` chose.
    None when a user objective gives no L_i."""
    n = len(infos)
    if all(i.diagonal is not None for i in infos):
        return global_smoothness_from_diagonals(sum_in_rank_order([i.diagonal for i in infos]), n)  # type: ignore
    if isinstance(run, GramRun):
        grams = await run.run()
        if cfg.objective is not None:
            return float(np.linalg.eigvalsh(grams)[-1]) / n
        return global_smoothness_from_grams(cfg, grams, sum(i.shard_rows for i in infos))
    if isinstance(run, PowerRun):
        return smoothness_from_lambda(cfg, await run.run(), sum(i.shard_rows for i in infos))
    if any(i.smoothness is None for i in infos):
        return None
    return sum(i.smoothness for i in infos) / n  # type: ignore[misc]
