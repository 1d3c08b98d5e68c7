"""The aggregator tier through real processes: ``ef21 run --aggregators F`` equals ``ef21 simulate --aggregators F``
bit for bit, and a lying aggregator is refused with a code, named in the master's log, while the run stays exact.

About 35 s on the 2-core machine at load ~10, 70 s at load 40 (each ``ef21 run`` starts a master, F aggregators
and n workers); the slow ones (dcgd through uneven blocks, the aggregator that dies) about 60 s more.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from ef21.engine.config import RunConfig
from ef21.engine.simulate import simulate
from ef21_server.coordinator import MasterOptions
from ef21_wire.v1 import ef21_pb2 as pb

from .helpers import ef21_cli, eventually, finish, one_error_line, running_master, spawn_worker
from .rawclient import Ended, RawClient

SMALL = ["--problem", "quadratic", "--dim", "60", "--k", "3", "--rounds", "12", "-q"]


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("flags", [
    ["--workers", "4", "--aggregators", "2", "--method", "ef21", "--participation", "0.5"],
    # Blocks of 1, 2 and 2 ranks; slow: another ~20 s of process starts for a second method that sums.
    pytest.param(["--workers", "5", "--aggregators", "3", "--method", "dcgd"], marks=pytest.mark.slow),
    # float32 sums in float32 at the aggregators and the master (a float64 zero once widened the master's sum).
    pytest.param(["--workers", "4", "--aggregators", "2", "--method", "ef21", "--dtype", "float32"],
                 marks=pytest.mark.slow),
], ids=["ef21-pp", "dcgd", "ef21-float32"])
def test_run_through_aggregators_is_its_simulation(flags: list[str], tmp_path: Path) -> None:
    run = ef21_cli("run", *SMALL, *flags, "--out", str(tmp_path / "run.npy"), "--log", str(tmp_path / "run.jsonl"),
                   timeout=90)
    assert run.returncode == 0, run.stderr
    sim = ef21_cli("simulate", *SMALL, *flags, "--out", str(tmp_path / "sim.npy"), "--log", str(tmp_path / "sim.jsonl"))
    assert sim.returncode == 0, sim.stderr
    flat_flags = [f for f in flags]
    flat_flags[flat_flags.index("--aggregators") + 1] = "0"
    flat = ef21_cli("simulate", *SMALL, *flat_flags, "--out", str(tmp_path / "flat.npy"))
    assert flat.returncode == 0, flat.stderr
    x_run, x_sim, x_flat = (np.load(tmp_path / f"{k}.npy") for k in ("run", "sim", "flat"))
    assert np.array_equal(x_run, x_sim) and x_run.dtype == x_sim.dtype == x_flat.dtype
    # Another order of float additions: a few roundings of the run's dtype apart from the flat sum.
    rel = 1e-12 if x_run.dtype == np.float64 else 1e-5
    assert np.linalg.norm(x_run - x_flat) <= rel * np.linalg.norm(x_flat)
    keys = ("round", "f", "grad_norm_sq", "G", "bits_per_worker", "payload_bits_per_worker", "missing")
    got, want = read_log(tmp_path / "run.jsonl"), read_log(tmp_path / "sim.jsonl")
    assert [{k: r.get(k) for k in keys} for r in got] == [{k: r.get(k) for k in keys} for r in want]


def test_run_refuses_what_cannot_be_summed() -> None:
    r = ef21_cli("run", *SMALL, "--workers", "4", "--aggregators", "2", "--method", "ef21plus")
    assert "ef21plus cannot be summed before the master" in one_error_line(r)


async def start_aggregator(master: str, block: int, port: int = 0, *,
                           linger: bool = False) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ef21", "aggregator", "--master", master, "--block", str(block), "--port", str(port),
        *(["--linger"] if linger else []), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    return proc, line.split(" listening on ", 1)[1].split(",", 1)[0]


async def end_aggregator(proc: asyncio.subprocess.Process) -> None:
    """An aggregator leaves by itself once the run's Stop passed through; one still serving is ended."""
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()


async def until_start(c: RawClient) -> pb.Start:
    """Answer the master's set-up requests (Grams) until this stream's Start."""
    while True:
        m = await c.recv(60)
        assert isinstance(m, pb.MasterMessage), m
        kind = m.WhichOneof("kind")
        if kind == "gram_request":
            await c.write(c.gram_reply(m.gram_request.attempt))
        elif kind == "start":
            return m.start


def covers_update(round_: int, d: int, covers: list[int], value: float = 0.5) -> bytes:
    """A well-formed sum of small messages, claiming ``covers``: ``value`` at one coordinate."""
    up = pb.Update(round=round_)
    up.message.dim, up.message.indices = d, np.array([1], "<u4").tobytes()
    up.message.values = np.array([value]).tobytes()
    for r in covers:
        up.covers.add(rank=r, entries=1)
    return pb.WorkerMessage(update=up).SerializeToString()


@dataclass(frozen=True)
class Lie:
    """Block 1's sums, sent in this order by the streams of its ranks 2 and 3, and the refusals they earn."""

    sums: tuple[tuple[int, list[int]], ...]
    """(the stream's rank, the ranks its sum covers)."""
    refused: dict[int, tuple[grpc.StatusCode, str]]
    """The stream's rank → the code that ends it and what the refusal says. A sum on another stream is taken: it
    adds exact zeros, so ranks 2 and 3 count as left out of round 0 although no log line says so."""
    one_connection: bool = False
    """Both streams on one connection, as one aggregator relays them (else two: two aggregators' worth)."""


INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
LIES = {
    "unrelayed-and-twice": Lie(((2, [2, 3]), (3, [3, 3])), {2: (INVALID, "whose worker it does not relay"),
                                                           3: (INVALID, "covers rank 3 twice")}),
    "wrong-stream-and-order": Lie(((2, [3]), (3, [3, 2])), {2: (INVALID, "must come on the stream of its first rank"),
                                                            3: (INVALID, "covers rank 2 out of order")}),
    "outside-the-block": Lie(((2, [2, 5]), (3, [3, 3])), {2: (INVALID, "rank 5 is not in block 1"),
                                                          3: (INVALID, "covers rank 3 twice")}),
    # One aggregator for both ranks: its first sum is taken, its second claims again what the first summed.
    "rank-summed-twice": Lie(((2, [2, 3]), (3, [3])), {3: (PRECONDITION, "covers rank 3, which round 0 has summed "
                                                                         "already")}, one_connection=True),
    "block-summed-twice": Lie(((2, [2]), (3, [3])), {3: (PRECONDITION, "a second sum for block 1")},
                              one_connection=True),
}


@pytest.mark.parametrize("lie", sorted(LIES))
@pytest.mark.asyncio(loop_scope="function")
async def test_lying_aggregators_are_refused_and_the_run_stays_exact(lie: str, tmp_path: Path, caplog) -> None:
    """Block 0 is a real aggregator with two real workers; block 1's ranks 2 and 3 are held by hand-written
    "aggregators": two on two connections, whose sums claim a rank the sender does not relay, cover a rank twice
    or out of order, come on the wrong stream or reach outside the block; or one, whose second sum covers a rank
    or block its first has summed this round. Each lie is refused with its code, named in the master's log, and
    the run goes on without ranks 2 and 3 under the partial-round rules: equal, bit for bit, to the simulation
    that leaves them out."""
    spec = LIES[lie]
    cfg = RunConfig(data="mushrooms", problem="logreg", workers=4, aggregators=2, k=2, rounds=6)
    caplog.set_level(logging.WARNING, logger="ef21.master")
    opts = MasterOptions(cfg, out=tmp_path / "x.npy", log=tmp_path / "l.jsonl", round_timeout=5.0)
    async with running_master(opts) as master:
        target = f"127.0.0.1:{master.port}"
        agg, address = await start_aggregator(target, 0)
        workers = [await spawn_worker(address, "--rank", str(r)) for r in (0, 1)]
        # Two connections, as two aggregator processes have (gRPC would otherwise share one between channels).
        own = [("grpc.use_local_subchannel_pool", 1)]
        ch_a = grpc.aio.insecure_channel(target, options=own)
        ch_b = ch_a if spec.one_connection else grpc.aio.insecure_channel(target, options=own)
        try:
            streams = {2: RawClient(ch_a, cfg), 3: RawClient(ch_b, cfg)}
            for r, c in streams.items():
                welcome = await c.hello(r)
                assert isinstance(welcome, pb.MasterMessage) and welcome.welcome.rank == r
                await c.setup()
            await asyncio.gather(*(until_start(c) for c in streams.values()))
            book = master.coord.book
            for r, covers in spec.sums:
                taken = r not in spec.refused
                await streams[r].write(covers_update(0, 112, covers, 0.0 if taken else 0.5))
                if taken:  # the next sum must find this one summed (the streams are not ordered between them)
                    await eventually(lambda: all(c in book.sizes for c in covers), 30, f"rank {r}'s sum taken")
            ends = {r: await streams[r].recv(30) for r in spec.refused}
            assert all(isinstance(e, Ended) for e in ends.values()), ends  # refused: the stream ended
            assert {r: e.code for r, e in ends.items()} == {  # type: ignore[union-attr]
                r: code for r, (code, _) in spec.refused.items()}, ends
            assert all(said in ends[r].details for r, (_, said) in spec.refused.items()), ends  # type: ignore
            await ch_a.close()  # ranks 2 and 3 are lost; the run goes on without them
            codes = await finish(workers, 120)
            assert [c for c, _ in codes] == [0, 0], codes
            # The run's Stop went through the aggregator, which then left by itself (compose waits for that).
            assert await asyncio.wait_for(agg.wait(), 10) == 0
        finally:
            await ch_a.close()
            await ch_b.close()
            await end_aggregator(agg)
        await asyncio.wait_for(master.coord.done.wait(), 30)
    logged = caplog.text
    assert all(said in logged for _, said in spec.refused.values()), logged[-3000:]
    log = read_log(tmp_path / "l.jsonl")
    missing = {r["round"]: r["missing"] for r in log if r.get("missing")}
    # A rank a taken sum covered counts in round 0 (with its zeros); the simulation leaves it out all the same.
    taken = {c for r, covers in spec.sums if r not in spec.refused for c in covers}
    assert missing.pop(0, []) == sorted({2, 3} - taken), log[0]
    assert all(m == [2, 3] for m in missing.values()) and len(log) == cfg.rounds + 1
    missing[0] = [2, 3]
    sim = simulate(cfg, missing=missing)
    assert np.array_equal(np.load(tmp_path / "x.npy"), sim.x), missing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="function")
async def test_an_aggregator_that_dies_is_its_workers_missing_and_its_replacement_resumes(tmp_path: Path) -> None:
    """Block 1's aggregator is killed mid-run: its two workers are missing from the next rounds (partial rounds,
    as for any missing worker) and join again through a replacement on the same port, keeping their own g_i
    (``Start.included_through``: the master holds none). The run finishes equal, bit for bit, to the simulation
    that leaves them out of the rounds the log says."""
    cfg = RunConfig(data="mushrooms", problem="logreg", workers=4, aggregators=2, k=2, rounds=40)
    opts = MasterOptions(cfg, out=tmp_path / "x.npy", log=tmp_path / "l.jsonl", round_timeout=5.0)
    async with running_master(opts) as master:
        target = f"127.0.0.1:{master.port}"
        port = free_port()
        agg0, address0 = await start_aggregator(target, 0)
        agg1, address1 = await start_aggregator(target, 1, port)
        workers = [await spawn_worker(address0 if r < 2 else address1, "--rank", str(r), "--delay", "1.0")
                   for r in range(4)]
        try:
            # Rounds of ~0.7 s (the workers' --delay): the replacement, a new process, is up well before the end.
            await eventually(lambda: master.coord.round >= 6, 60, "round 6")
            agg1.kill()
            await agg1.wait()
            await eventually(lambda: master.coord.round >= 8, 60, "rounds without block 1")
            agg1, _ = await start_aggregator(target, 1, port)
            codes = await finish(workers, 120)
            assert [c for c, _ in codes] == [0] * 4, codes
        finally:
            for a in (agg0, agg1):
                await end_aggregator(a)
        await asyncio.wait_for(master.coord.done.wait(), 30)
    log = read_log(tmp_path / "l.jsonl")
    missing = {r["round"]: r["missing"] for r in log if r.get("missing")}
    assert missing and all(set(m) <= {2, 3} for m in missing.values()), missing
    assert max(missing) < cfg.rounds  # block 1 came back before the end
    assert len(log) == cfg.rounds + 1
    sim = simulate(cfg, missing=missing)
    assert np.array_equal(np.load(tmp_path / "x.npy"), sim.x), missing


@pytest.mark.asyncio(loop_scope="function")
async def test_an_aggregator_leaves_after_the_run_unless_it_lingers(tmp_path: Path) -> None:
    """Compose waits for every container: an aggregator exits 0 once the master's Stop has passed through it, and
    one started after the end exits 0 at once. Under --linger (a StatefulSet restarts a pod that exits) it stays."""
    cfg = RunConfig(problem="quadratic", dim=20, workers=2, aggregators=2, k=2, rounds=3)
    async with running_master(MasterOptions(cfg, out=tmp_path / "x.npy")) as master:
        target = f"127.0.0.1:{master.port}"
        leaves, address = await start_aggregator(target, 0)
        lingers, address2 = await start_aggregator(target, 1, linger=True)
        workers = [await spawn_worker(address), await spawn_worker(address2)]
        try:
            codes = await finish(workers, 60)
            assert [c for c, _ in codes] == [0, 0], codes
            assert await asyncio.wait_for(leaves.wait(), 10) == 0
            await asyncio.sleep(1.0)
            assert lingers.returncode is None
            late = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ef21", "aggregator", "--master", target, "--block", "0", "--port", "0",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(late.communicate(), 30)
            assert late.returncode == 0 and "is over" in out.decode() and not err, (out, err)
        finally:
            lingers.terminate()
            for a in (leaves, lingers):
                await end_aggregator(a)
