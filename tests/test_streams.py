"""One state machine per stream: a stream that left, was refused or lost can never act as its rank again, and
every message a state does not allow is refused with a code. Raw protocol clients beside honest worker
processes; the honest run's x must equal the simulation's."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from ef21.engine.config import RunConfig
from ef21.engine.simulate import simulate
from ef21_server.coordinator import MasterOptions
from ef21_wire.v1 import ef21_pb2 as pb

from .helpers import eventually, finish, running_master, spawn_worker
from .rawclient import Ended, RawClient, garbage_update

CFG = RunConfig(workers=4, method="ef21", k=2, stepsize_mult=64, x0="normal:0", rounds=60)


async def test_a_stream_that_left_before_the_start_cannot_take_its_rank_back(tmp_path):
    """Issue 21's first reproduction: join as rank 1, Leave before the run starts; an honest worker takes rank 1
    and the run goes; the old stream then sends Setup. It must be refused, and the run stay exact."""
    async with running_master(MasterOptions(CFG, out=tmp_path / "x.npy")) as master:
        async with grpc.aio.insecure_channel(master.address) as ch:
            rogue = RawClient(ch, CFG)
            welcome = await rogue.hello(1)
            assert isinstance(welcome, pb.MasterMessage) and welcome.welcome.rank == 1
            await rogue.send(leave=pb.Leave(reason="rank 1: going away"))
            await eventually(lambda: 1 in master.coord.free_ranks(), what="rank 1 free again")
            honest = [await spawn_worker(master.address, "--rank", str(r), "--delay", "0.005") for r in range(4)]
            await eventually(lambda: master.coord.round >= 5, what="round 5")
            await rogue.setup(1)
            reply = await rogue.recv(timeout=10.0)
            # Today: a Start with x, g and rank 1's g_i, after which the rogue's Updates count as rank 1's.
            assert isinstance(reply, Ended), (f"the stream that left got a {reply.WhichOneof('kind')}"
                                              + (f" of round {reply.start.round}" if reply.HasField("start") else "")
                                              if isinstance(reply, pb.MasterMessage) else f"{reply}")
            await rogue.send(update=garbage_update(master.coord.round))
            results = await finish(honest, timeout=120)
        assert [c for c, _ in results] == [0, 0, 0, 0], results
        await asyncio.wait_for(master.wait(), 10)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), simulate(CFG).x)


async def test_setup_after_leave_gets_an_answer_never_a_hang():
    """Issue 21's second reproduction: Leave before Setup, then Setup. Today the stream hangs open."""
    cfg = RunConfig(workers=2, rounds=10, k=2)
    async with running_master(MasterOptions(cfg)) as master:
        async with grpc.aio.insecure_channel(master.address) as ch:
            c = RawClient(ch, cfg)
            assert isinstance(await c.hello(0), pb.MasterMessage)
            await c.send(leave=pb.Leave(reason="rank 0: going away"))
            await c.setup(0)
            end = await c.recv(timeout=5.0)
            assert isinstance(end, Ended), f"expected the stream's end, got {end!r}"
            assert end.code == grpc.StatusCode.CANCELLED and "rank 0 left the run: rank 0: going away" in end.details
        assert master.coord.free_ranks() == [0, 1] and master.coord.state == "waiting"
