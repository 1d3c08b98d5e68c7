"""The stream state machine under random use: Hypothesis drives several raw clients against a real master (port 0)
with random sequences of Hello (any rank, or one another stream holds), Setup, Update, Eval, Leave, reconnects
and messages their state does not allow, and checks after every step that

- a rank is bound to at most one live stream (and to the stream the clients' own bookkeeping expects),
- nothing is ever sent to a stream that has ended,
- every refused message ends its stream with the expected code, every Leave with CANCELLED,

and at the end of every example that the run, finished by honest clients, ends with ``ef21 simulate``'s x, bit
for bit: nothing a hostile or ended stream sent was ever applied.

The clients compute their honest messages with the worker's own code (``worker.client``), from the state the
master sends them, so a client that takes a rank over mid-run continues the run exactly as a real worker would.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ef21.compression.codec import decode
from ef21.engine.config import RunConfig
from ef21.engine.simulate import simulate
from ef21.methods import Downlink
from ef21.problems.problem import local_objective
from ef21_server.coordinator import MasterOptions
from ef21_server.master import ListenOptions, Master
from ef21_server.streams import StreamState
from ef21_wire.protocol import TRAIN_METHOD, is_eval_round
from ef21_wire.serde import read_round_result_fast, round_result_from_proto
from ef21_wire.v1 import ef21_pb2 as pb
from ef21_worker.client import _node_from_start, eval_message, load_worker_data, setup_message, update_message

from .rawclient import Ended, garbage_update

# The quadratic problem: a master starts in no time (mushrooms would cost 0.4 s an example to fingerprint), and
# its objectives are the ones every worker builds (``worker.client``), Setup included.
CFG = RunConfig(workers=2, method="ef21", k=2, problem="quadratic", dim=20, x0="normal:0", rounds=5)
DATA = load_worker_data(CFG)
D = DATA.d
OBJS = {r: local_objective(CFG, r, DATA.ds, None, DATA.info) for r in range(CFG.workers)}
SIM_X = simulate(CFG).x
WAIT_S = 5.0
AGENTS = 3


class Loop:
    """One event loop in a thread of its own for the whole module: the master and the clients live on it, the
    (synchronous) Hypothesis rules hand it coroutines."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="machine-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Bugs(logging.Handler):
    """The master logs a message it would have sent to an ended stream as a bug; count them."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("bug:") or "stream of" in record.getMessage():
            self.records.append(record.getMessage())


async def until(pred: Any, what: str, timeout: float = WAIT_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


class Agent:
    """A client with at most one stream at a time; honest unless a rule makes it send something else."""

    def __init__(self, name: str, channel: grpc.aio.Channel, master: Master) -> None:
        self.name, self.channel, self.master = name, channel, master
        self.call: Any = None
        self.reader: asyncio.Task | None = None
        self.inbox: deque[bytes] = deque()
        self.end: Ended | None = None
        self.phase = "none"  # none | connected | welcomed | set_up | running | ended
        self.rank: int | None = None
        self.node: Any = None
        self.report: Any = None  # the Update of the round in progress, until its result comes
        self.eval_every = 1

    # -- the stream ---------------------------------------------------------------------------------------------

    async def open(self) -> None:
        self.call = self.channel.stream_stream(TRAIN_METHOD)()
        self.inbox.clear()
        self.end, self.rank, self.node, self.report = None, None, None, None
        self.reader = asyncio.create_task(self._pump())
        self.phase = "connected"

    async def _pump(self) -> None:
        try:
            while True:
                raw = await self.call.read()
                if raw is grpc.aio.EOF:
                    self.end = Ended(await self.call.code(), await self.call.details() or "")
                    return
                self.inbox.append(raw)
        except grpc.aio.AioRpcError as exc:
            self.end = Ended(exc.code(), exc.details() or "")

    async def send(self, raw: bytes) -> None:
        try:
            await self.call.write(raw)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the stream is over; its end says why

    async def drop(self) -> None:
        """The client goes away (a crash, a broken connection): the master must see the stream lost."""
        self.call.cancel()
        if self.reader is not None:
            await asyncio.wait([self.reader])
        self.phase = "none"

    @property
    def live(self) -> bool:
        return self.phase in ("welcomed", "set_up", "running")

    # -- honest messages -------------------------------------------------------------------------------------------

    def sync(self) -> None:
        """Take in what the master sent: Start, RoundResults, Stop. A stream that has ended has nothing to take in:
        what came before its end (a Start racing a refused message, say) went to a stream that was live then."""
        if self.phase in ("none", "ended", "stopped"):
            self.inbox.clear()
            return
        while self.inbox:
            raw = self.inbox.popleft()
            rr = read_round_result_fast(raw)
            if rr is None:
                msg = pb.MasterMessage.FromString(raw)
                kind = msg.WhichOneof("kind")
                if kind == "start":
                    assert self.phase == "set_up", f"{self.name}: Start while {self.phase}"
                    self.node = _node_from_start(msg.start, CFG, OBJS[self.rank], self.rank, D)
                    self.eval_every = max(1, msg.start.eval_every)
                    self.phase = "running"
                    continue
                if kind == "stop":
                    self.phase = "stopped"
                    continue
                assert kind == "round_result", f"{self.name}: unexpected {kind}"
                rr = round_result_from_proto(msg.round_result)
            assert self.phase == "running" and self.report is not None and rr.round == self.node.round, \
                f"{self.name}: RoundResult {rr.round} while {self.phase}"
            included = self.report.message is not None and self.rank not in rr.missing
            agg = decode(rr.aggregate, expected_dim=D)
            self.node.apply(Downlink(agg, "replace" if rr.replace else "add", rr.scale), included=included)
            self.report = None

    async def step(self) -> None:
        """This worker's messages of the round in progress."""
        evaluate = is_eval_round(self.node.round, self.eval_every, CFG.rounds)
        self.report = self.node.step(evaluate=evaluate)
        if self.report.message is not None:
            await self.send(update_message(self.report))
        if evaluate:
            await self.send(eval_message(self.report))

    def hello(self, rank: int) -> bytes:
        return pb.WorkerMessage(hello=pb.Hello(
            run_id=self.master.coord.run_id, requested_rank=rank, hostname=self.name,
            data_fingerprint=DATA.fingerprint, dim=D, n_rows=DATA.n_rows)).SerializeToString()

    def setup(self, rank: int) -> bytes:
        return setup_message(OBJS[rank], rank).SerializeToString()


def hostile(agent: Agent, choice: int) -> tuple[bytes, str]:
    """A message its state does not allow (or a lie), with the code that must end the stream."""
    t = agent.master.coord.round
    msg = lambda **kind: pb.WorkerMessage(**kind).SerializeToString()  # noqa: E731
    other = 1 - (agent.rank or 0)
    by_phase = {
        "connected": [(msg(update=garbage_update(t, D)), "FAILED_PRECONDITION"),
                      (msg(setup=pb.Setup(rank=0)), "FAILED_PRECONDITION"),
                      (msg(eval=pb.Eval(round=t)), "FAILED_PRECONDITION"),
                      (msg(leave=pb.Leave(reason="x")), "FAILED_PRECONDITION"),
                      (b"", "INVALID_ARGUMENT")],
        "welcomed": [(agent.hello(-1), "FAILED_PRECONDITION"),
                     (msg(update=garbage_update(t, D)), "FAILED_PRECONDITION"),
                     (agent.setup(other), "FAILED_PRECONDITION"),  # a lie about its rank
                     (msg(power_reply=pb.PowerReply(iteration=0)), "FAILED_PRECONDITION"),
                     (msg(resync_request=pb.ResyncRequest(round=t)), "FAILED_PRECONDITION")],
        "set_up": [(agent.hello(-1), "FAILED_PRECONDITION"),
                   (agent.setup(agent.rank or 0), "FAILED_PRECONDITION")],
        "running": [(agent.hello(-1), "FAILED_PRECONDITION"),
                    (agent.setup(agent.rank or 0), "FAILED_PRECONDITION"),
                    (msg(update=garbage_update(t + 3, D)), "FAILED_PRECONDITION"),
                    (msg(power_reply=pb.PowerReply(iteration=0)), "FAILED_PRECONDITION")],
    }
    options = by_phase[agent.phase]
    return options[choice % len(options)]


@settings(max_examples=30, stateful_step_count=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
class StreamMachine(RuleBasedStateMachine):
    loop: Loop

    @initialize(warm=st.booleans())
    def start(self, warm: bool) -> None:
        """A fresh master; ``warm``: two honest agents have taken both ranks and the run has started, so that the
        random steps meet a running run as often as one still waiting for its workers."""
        self.bugs = Bugs()
        logging.getLogger("ef21.master").addHandler(self.bugs)

        async def start() -> tuple[Master, grpc.aio.Channel, list[Agent]]:
            master = Master(MasterOptions(CFG, max_faults=10**6), ListenOptions(port=0, status_port=None, drain_s=1.0))
            await master.start()
            ch = grpc.aio.insecure_channel(master.address)
            return master, ch, [Agent(f"agent-{i}", ch, master) for i in range(AGENTS)]

        self.master, self.channel, self.agents = self.loop.run(start())
        if warm:
            for r, a in enumerate(self.agents[:CFG.workers]):
                self.loop.run(a.open())
                self._hello(a, r)
                self.loop.run(a.send(a.setup(r)))
                a.phase = "set_up"

            async def started() -> None:
                await until(lambda: all(len(a.inbox) > 0 for a in self.agents[:CFG.workers]), "the Start")
                for a in self.agents[:CFG.workers]:
                    a.sync()
            self.loop.run(started())

    # -- the model's view ------------------------------------------------------------------------------------------

    def holder(self, rank: int) -> Agent | None:
        return next((a for a in self.agents if a.live and a.rank == rank), None)

    def free(self) -> list[int]:
        return [r for r in range(CFG.workers) if self.holder(r) is None]

    @property
    def ended(self) -> bool:
        return self.master.coord.state != "waiting" and self.master.coord.state != "running"

    def pick(self, i: int, *phases: str) -> Agent:
        """The i-th (modulo) agent in one of ``phases``; the rule's precondition says there is one."""
        eligible = [a for a in self.agents if a.phase in phases]
        return eligible[i % len(eligible)]

    def some(*phases: str, running: bool = False):  # type: ignore[no-untyped-def]  # noqa: N805
        """A precondition: some agent is in one of ``phases`` (and, with ``running``, the run has not ended)."""
        return precondition(lambda self: any(a.phase in phases for a in self.agents)
                            and not (running and self.ended))

    # -- rules -----------------------------------------------------------------------------------------------------

    @rule(i=st.integers(0, AGENTS - 1))
    def open_stream(self, i: int) -> None:
        a = self.agents[i]
        if a.phase in ("connected", "welcomed", "set_up", "running"):
            self.loop.run(a.drop())
            self._settle_lost(a)
        self.loop.run(a.open())

    @some("connected")
    @rule(i=st.integers(0, AGENTS - 1), ask=st.integers(-1, CFG.workers - 1))
    def hello(self, i: int, ask: int) -> None:
        self._hello(self.pick(i, "connected"), ask)

    def _hello(self, a: Agent, ask: int) -> None:
        free = self.free()
        expect_rank = (ask if ask in free else None) if ask >= 0 else (free[0] if free else None)
        ended = self.ended

        async def go() -> None:
            await a.send(a.hello(ask))
            await until(lambda: a.inbox or a.end is not None, f"{a.name}'s answer to Hello")

        self.loop.run(go())
        if ended:
            return self._expect_end(a, "OK")  # a Stop, then the end: the run is over
        if expect_rank is None:
            return self._expect_end(a, "RESOURCE_EXHAUSTED" if ask < 0 else "ALREADY_EXISTS")
        reply = pb.MasterMessage.FromString(a.inbox.popleft())
        assert reply.welcome.rank == expect_rank, (reply, expect_rank)
        a.rank, a.phase = expect_rank, "welcomed"

    @some("welcomed", running=True)
    @rule(i=st.integers(0, AGENTS - 1))
    def setup(self, i: int) -> None:
        a = self.pick(i, "welcomed")
        self.loop.run(a.send(a.setup(a.rank)))
        a.phase = "set_up"
        s = self.master.coord.sessions[a.rank]
        self.loop.run(until(lambda: s.state in (StreamState.SET_UP, StreamState.RUNNING), "Setup taken"))

    @some("set_up", "running")
    @rule()
    def work(self) -> None:
        """Every honest worker's next move: read what came, and send the round's messages if it is due to."""
        async def go() -> None:
            await asyncio.sleep(0.005)
            for a in self.agents:
                if a.phase not in ("set_up", "running"):
                    continue
                a.sync()
                if a.phase == "running" and a.report is None and a.node.round <= CFG.rounds:
                    await a.step()
                    t = a.node.round
                    await until(lambda: a.rank in self.master.coord.book.updates or self.master.coord.round > t
                                or self.ended, f"{a.name}'s Update of round {t}")

        self.loop.run(go())

    @some("welcomed", "set_up", "running", running=True)
    @rule(i=st.integers(0, AGENTS - 1))
    def leave(self, i: int) -> None:
        a = self.pick(i, "welcomed", "set_up", "running")
        self.loop.run(a.send(pb.WorkerMessage(leave=pb.Leave(reason=f"{a.name} leaves")).SerializeToString()))
        self._expect_end(a, "CANCELLED", "left the run")

    @some("connected", "welcomed", "set_up", "running", running=True)
    @rule(i=st.integers(0, AGENTS - 1), choice=st.integers(0, 4))
    def misbehave(self, i: int, choice: int) -> None:
        a = self.pick(i, "connected", "welcomed", "set_up", "running")
        if a.phase == "set_up":
            a.sync()  # a Start may have come: then it is running
        raw, code = hostile(a, choice)
        self.loop.run(a.send(raw))
        self._expect_end(a, code)

    @some("welcomed", "set_up", "running", running=True)
    @rule(i=st.integers(0, AGENTS - 1))
    def reconnect(self, i: int) -> None:
        """The client's connection breaks and it comes back at once, asking for its old rank."""
        a = self.pick(i, "welcomed", "set_up", "running")
        rank = a.rank
        self.loop.run(a.drop())
        self._settle_lost(a)
        self.loop.run(a.open())
        self._hello(a, rank)  # type: ignore[arg-type]

    # -- expectations ----------------------------------------------------------------------------------------------

    def _expect_end(self, a: Agent, code: str, details: str = "") -> None:
        self.loop.run(until(lambda: a.end is not None, f"{a.name}'s stream to end with {code}"))
        assert a.end is not None and a.end.code.name == code and details in a.end.details, (a.name, a.end, code)
        rank = a.rank
        a.phase, a.rank = "ended", None
        if rank is not None:  # its rank is free at once, for a new stream
            s = self.master.coord.sessions[rank]
            assert s.ended and rank in self.master.coord.free_ranks(), (rank, s.state)

    def _settle_lost(self, a: Agent) -> None:
        if a.rank is None:
            return
        s = self.master.coord.sessions[a.rank]
        self.loop.run(until(lambda: s.ended, f"the master to see {a.name}'s stream gone"))
        a.rank = None

    # -- invariants ------------------------------------------------------------------------------------------------

    @invariant()
    def one_live_stream_per_rank(self) -> None:
        if not hasattr(self, "master"):
            return
        m = self.master.coord.members
        ranks = [s.rank for s in m.live if s.rank is not None]
        assert len(ranks) == len(set(ranks)), f"a rank bound twice: {ranks}"
        for r in range(CFG.workers):
            bound = m.bound(r)
            assert bound is None or bound in m.live
            held = self.holder(r)
            if not self.ended:
                assert (bound is None) == (held is None), (r, bound, held and held.name)

    @invariant()
    def nothing_sent_after_an_end(self) -> None:
        if not hasattr(self, "master"):
            return
        assert not self.bugs.records, self.bugs.records
        assert all(s.sends_after_end == 0 for s in self.master.coord.sessions.values())

    def teardown(self) -> None:
        if not hasattr(self, "master"):
            return
        try:
            self.loop.run(self._finish_honestly(), timeout=60)
            np.testing.assert_array_equal(self.master.coord.x_final, SIM_X)
        finally:
            logging.getLogger("ef21.master").removeHandler(self.bugs)
            self.loop.run(self._close())

    async def _finish_honestly(self) -> None:
        """Every rank gets an honest client (a new one where none holds it) and they run to the end."""
        coord = self.master.coord
        for a in self.agents:
            if a.phase == "connected":
                await a.drop()
        spare = 0
        for r in range(CFG.workers):
            if self.holder(r) is None and not self.ended:
                a = Agent(f"finisher-{r}", self.channel, self.master)
                self.agents.append(a)
                spare += 1
                await a.open()
                await a.send(a.hello(r))
                await until(lambda: a.inbox or a.end is not None, "the finisher's Welcome")
                assert a.end is None, a.end
                a.inbox.popleft()
                a.rank, a.phase = r, "welcomed"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not self.ended:
            assert loop.time() < deadline, f"the run did not finish: {coord.state}, round {coord.round}"
            for a in self.agents:
                if a.phase == "welcomed":
                    await a.send(a.setup(a.rank))  # type: ignore[arg-type]
                    a.phase = "set_up"
                a.sync()
                if a.phase == "running" and a.report is None:
                    await a.step()
            await asyncio.sleep(0.002)
        await asyncio.wait_for(coord.done.wait(), 10)
        assert coord.state == "done", coord.stop_message

    async def _close(self) -> None:
        for a in self.agents:
            if a.call is not None:
                a.call.cancel()
        await self.channel.close()
        await self.master.shutdown()


@pytest.fixture(scope="module")
def loop():
    lo = Loop()
    yield lo
    lo.close()


def test_stream_state_machine(loop):
    StreamMachine.loop = loop
    StreamMachine.TestCase().runTest()
