"""What a master holds at once, over real sockets: a storm of streams that never say Hello is refused past the
stream limit with RESOURCE_EXHAUSTED (named in the log), the rest are cut at the handshake timeout, and the honest
run that follows is the simulator's to the bit."""

from __future__ import annotations

import asyncio
import json
import logging
import resource

import grpc
import numpy as np

from ef21.engine.config import RunConfig
from ef21_server.coordinator import MasterOptions
from ef21_server.service import stream_limit
from ef21_wire.protocol import TRAIN_METHOD

from .helpers import ef21_cli, eventually, finish, one_error_line, running_master, spawn_worker
from .test_service import assert_same_as_simulation

STORM = 100


async def _silent_stream(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """A Train stream that sends nothing: its status once the master ends it."""
    call = channel.stream_stream(TRAIN_METHOD)()
    try:
        await call.read()
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return await call.code()


async def test_a_storm_of_silent_streams_is_refused_and_the_honest_run_is_exact(tmp_path, caplog):
    cfg = RunConfig(workers=2, method="ef21", compressor="topk", k=3, stepsize_mult=64, rounds=40, x0="normal:0")
    opts = MasterOptions(cfg, log=tmp_path / "l.jsonl", save_iterates=tmp_path / "xs.npy")
    limit = stream_limit(2)
    assert STORM > limit
    caplog.set_level(logging.WARNING, logger="ef21.master")
    async with running_master(opts) as master:
        master.service.handshake_timeout = 3.0  # the storm's survivors are cut soon, so the test stays short
        async with grpc.aio.insecure_channel(master.address) as ch:
            storm = [asyncio.create_task(_silent_stream(ch)) for _ in range(STORM)]
            await eventually(lambda: master.service.over_limit == STORM - limit, 20, "the excess refused")
            codes = await asyncio.wait_for(asyncio.gather(*storm), 30)
        # The excess at once, the rest when the handshake timeout cut them: each stream ended with a code.
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == STORM - limit
        assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) == limit
        assert master.coord.members.refused["RESOURCE_EXHAUSTED"] == STORM - limit
        refusals = [r.getMessage() for r in caplog.records if "limit for 2 workers is" in r.getMessage()]
        assert refusals and len(refusals) < STORM - limit  # named, not a line per stream
        assert not master.coord.members.live
        results = await finish([await spawn_worker(master.address) for _ in range(2)])
        assert [code for code, _ in results] == [0, 0], results
        await asyncio.wait_for(master.wait(), 10)
    rows = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert_same_as_simulation(cfg, np.load(tmp_path / "xs.npy"), rows)


def test_a_run_past_the_open_files_limit_is_refused_with_one_line():
    """One socket per worker: a master whose hard RLIMIT_NOFILE cannot hold them says so at once (exit 2), rather
    than fail to accept connections and wait for --join-timeout."""
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    r = ef21_cli("master", "--workers", "1000", "--problem", "quadratic", "--dim", "10", "--port", "0",
                 preexec_fn=low_limit, timeout=60)
    line = one_error_line(r)
    assert "--workers 1000 needs about 1064 open files" in line and "may open 256" in line
