"""What a master holds at once, over real sockets: a storm of streams that never say Hello is refused past the
stream limit with RESOURCE_EXHAUSTED (named in the log), the rest are cut at the handshake timeout, and the honest
run that follows is the simulator's to the bit; a worker whose Join gets the answers gRPC itself gives under a storm
of joins (CANCELLED, INTERNAL, UNKNOWN) tries again and takes its part in the run."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np

from ef21.engine.config import RunConfig
from ef21_server.coordinator import MasterOptions
from ef21_server.service import stream_limit
from ef21_wire.protocol import SERVICE, TRAIN_METHOD

from .helpers import ef21_cli, eventually, finish, one_error_line, running_master, spawn_worker
from .storm_client import silent_stream
from .test_service import assert_same_as_simulation

STORM = 100
ROOT = Path(__file__).resolve().parents[1]


async def test_a_storm_of_silent_streams_is_refused_and_the_honest_run_is_exact(tmp_path, caplog):
    cfg = RunConfig(workers=2, method="ef21", compressor="topk", k=3, stepsize_mult=64, rounds=40, x0="normal:0")
    opts = MasterOptions(cfg, log=tmp_path / "l.jsonl", save_iterates=tmp_path / "xs.npy")
    limit = stream_limit(2)
    assert STORM > limit
    caplog.set_level(logging.WARNING, logger="ef21.master")
    async with running_master(opts) as master:
        master.service.handshake_timeout = 3.0  # the storm's survivors are cut soon, so the test stays short
        async with grpc.aio.insecure_channel(master.address) as ch:
            storm = [asyncio.create_task(silent_stream(ch)) for _ in range(STORM)]
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


async def test_a_join_storm_past_grpcs_own_queue_reaches_the_master():
    """2 400 streams at once, from another process, against a master for 2 500 workers: every one reaches the
    master's handler and ends as the master decides (here: no Hello within the handshake timeout). With gRPC's
    default queue of calls not yet taken (1 000, hard limit 3 000) core dropped 116–329 of them as CANCELLED in
    three tries on this machine, before the master saw them: what kept n = 4 096 from starting
    (``grpc_server.pending_calls``)."""
    storm = 2_400
    cfg = RunConfig(workers=2_500, problem="quadratic", dim=10, method="ef21", k=1, rounds=5)
    async with running_master(MasterOptions(cfg), status=False) as master:
        master.service.handshake_timeout = 3.0
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.storm_client", master.address, str(storm), "16",
            stdout=asyncio.subprocess.PIPE, cwd=ROOT)
        out, _ = await asyncio.wait_for(client.communicate(), 60)
        assert client.returncode == 0
        assert json.loads(out) == {"DEADLINE_EXCEEDED": storm}
        assert master.coord.refused.get("DEADLINE_EXCEEDED") == storm  # each one counted where it was refused


def test_a_run_past_the_open_files_limit_is_refused_with_one_line():
    """One socket per worker: a master whose hard RLIMIT_NOFILE cannot hold them says so at once (exit 2), rather
    than fail to accept connections and wait for --join-timeout."""
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    r = ef21_cli("master", "--workers", "1000", "--problem", "quadratic", "--dim", "10", "--port", "0",
                 preexec_fn=low_limit, timeout=60)
    line = one_error_line(r)
    assert "--workers 1000 needs about 1064 open files" in line and "may open 256" in line


class FlakyFront:
    """A gRPC server in front of the real master, on its own port, that answers the first Joins itself with the
    codes of ``fail`` (what gRPC answers a master's thousandth join with) and forwards every other call — Join, and
    Train's byte streams both ways — to the master unchanged."""

    def __init__(self, master: str, fail: list[grpc.StatusCode]) -> None:
        self.fail = list(fail)
        self.joins = 0
        self.channel = grpc.aio.insecure_channel(master)
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "Join": grpc.unary_unary_rpc_method_handler(self._join),
            "Train": grpc.stream_stream_rpc_method_handler(self._train),
        }),))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    async def _join(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.joins += 1
        if self.fail:
            await context.abort(self.fail.pop(0), "front: the join did not get through")
        return await self.channel.unary_unary(f"/{SERVICE}/Join")(request, timeout=10)

    async def _train(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        call = self.channel.stream_stream(TRAIN_METHOD)()

        async def uplink() -> None:
            async for raw in requests:
                await call.write(raw)
            await call.done_writing()

        up = asyncio.create_task(uplink())
        try:
            async for raw in call:
                yield raw
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        finally:
            up.cancel()
            call.cancel()


async def test_a_worker_tries_again_after_the_join_answers_of_a_storm(tmp_path):
    """ef21 worker's Join retries CANCELLED, INTERNAL and UNKNOWN (JOIN_RETRYABLE) rather than exit: two real
    workers reach a real master through a front that answers the first three Joins with those codes; both finish,
    and the run is the simulator's to the bit."""
    cfg = RunConfig(workers=2, method="ef21", compressor="topk", k=3, stepsize_mult=64, rounds=20, x0="normal:0")
    opts = MasterOptions(cfg, log=tmp_path / "l.jsonl", save_iterates=tmp_path / "xs.npy")
    codes = [grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN]
    async with running_master(opts) as master:
        front = FlakyFront(master.address, codes)
        await front.server.start()
        try:
            results = await finish([await spawn_worker(front.address, "--connect-timeout", "20") for _ in range(2)],
                                   timeout=40)
            assert [code for code, _ in results] == [0, 0], results
            await asyncio.wait_for(master.wait(), 10)
        finally:
            await front.server.stop(None)
            await front.channel.close()
    assert front.joins >= len(codes) + 2 and not front.fail
    rows = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert_same_as_simulation(cfg, np.load(tmp_path / "xs.npy"), rows)
