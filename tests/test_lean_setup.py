"""Lean set-up and evaluation (issue 22, point 2), against a real master: x⁰ that a worker computes itself is not
sent (its digest is), g = 0 at round 0 travels empty, an objective with metrics of its own sends no dense gradient
on evaluation rounds unless --eval-grad asks for ‖∇f‖², and every run still equals ``ef21 simulate`` bit for bit."""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest

from ef21.compression.sparse import SparseVector
from ef21.engine.config import RunConfig
from ef21.engine.simulate import simulate
from ef21.problems.problem import local_objective
from ef21_server.coordinator import MasterOptions
from ef21_wire.serde import lean_from_proto, lean_to_proto, vector_digest, vector_to_proto
from ef21_wire.v1 import ef21_pb2 as pb

from .helpers import ef21_cli as cli
from .helpers import running_master
from .rawclient import Ended, RawClient
from .test_plugins import write_plugin

D = 112  # mushrooms


def test_state_vectors_travel_sparse_when_smaller_with_their_exact_bits():
    x = np.zeros(50)
    x[[3, 7]] = [-0.0, 2.5]  # −0.0 is a nonzero bit pattern: the replica's checksum must agree
    m = lean_to_proto(x)
    assert not m.dense and len(m.values) == 16
    back = lean_from_proto(m, 50)
    assert back.tobytes() == x.tobytes()
    assert len(lean_to_proto(np.zeros(50)).values) == 0
    full = np.arange(1.0, 51.0)
    assert lean_to_proto(full).dense and lean_from_proto(lean_to_proto(full), 50).tobytes() == full.tobytes()


async def _start_of(client: RawClient, rank: int, digest: bytes) -> pb.MasterMessage | Ended | None:
    """Hello and a Setup with ``digest``, the Gram when the master asks for it; then the master's next message."""
    assert isinstance(await client.hello(rank), pb.MasterMessage)
    setup = client.setup_message(rank)
    setup.x0_digest = digest
    await client.send(setup=setup)
    while True:
        got = await client.recv()
        if not (isinstance(got, pb.MasterMessage) and got.WhichOneof("kind") == "gram_request"):
            return got
        await client.write(client.gram_reply(got.gram_request.attempt))


async def test_a_worker_with_the_runs_x0_is_sent_no_x_and_one_without_gets_it_whole():
    cfg = RunConfig(workers=2, rounds=5, k=2, x0="normal:3")
    x0 = np.random.default_rng(3).standard_normal(D)  # what --x0 normal:3 means, independently of make_x0
    async with running_master(MasterOptions(cfg)) as master:
        async with grpc.aio.insecure_channel(master.address) as ch:
            own, other = RawClient(ch, cfg), RawClient(ch, cfg)
            got_own, got_other = await asyncio.gather(_start_of(own, 0, vector_digest(x0)),
                                                      _start_of(other, 1, vector_digest(x0 + 1.0)))
            assert isinstance(got_own, pb.MasterMessage) and isinstance(got_other, pb.MasterMessage)
            s_own, s_other = got_own.start, got_other.start
            assert s_own.x_is_own_x0 and not s_own.HasField("x")
            assert not s_other.x_is_own_x0 and lean_from_proto(s_other.x, D).tobytes() == x0.tobytes()
            for s in (s_own, s_other):
                assert len(s.g.values) == 0 and lean_from_proto(s.g, D).tobytes() == np.zeros(D).tobytes()
            assert len(s_own.SerializeToString()) < 400 < 8 * D < len(s_other.SerializeToString())
            own.cancel()
            other.cancel()


async def test_a_malformed_x0_digest_is_refused():
    cfg = RunConfig(workers=1, rounds=5, k=2)
    async with running_master(MasterOptions(cfg)) as master:
        async with grpc.aio.insecure_channel(master.address) as ch:
            c = RawClient(ch, cfg)
            got = await _start_of(c, 0, b"12345")
            assert isinstance(got, Ended) and got.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "x0_digest has 5 bytes" in got.details
        assert master.coord.round == 0


async def test_an_eval_without_the_gradient_is_refused_for_an_objective_without_metrics():
    cfg = RunConfig(workers=1, rounds=5, k=2)
    async with running_master(MasterOptions(cfg)) as master:
        async with grpc.aio.insecure_channel(master.address) as ch:
            c = RawClient(ch, cfg)
            got = await _start_of(c, 0, vector_digest(np.zeros(D)))
            assert isinstance(got, pb.MasterMessage) and got.start.x_is_own_x0
            obj = local_objective(cfg, 0, c.ds)
            f, g0 = obj.value_and_grad(np.zeros(D))
            await c.send(update=pb.Update(round=0, message=vector_to_proto(SparseVector.dense(g0))))
            await c.send(eval=pb.Eval(round=0, f=f))
            ended = await c.recv()
            assert isinstance(ended, Ended) and ended.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "dense gradient is missing" in ended.details
        assert master.coord.master.round == 0  # nothing applied


RANK_X0 = "obj.x0 = (lambda: np.full(d, 0.5)) if ctx.rank != 1 else (lambda: np.full(d, -1.0))"


@pytest.mark.parametrize("eval_grad", [False, True])
def test_metrics_objective_runs_equal_simulate_and_send_gradients_only_when_asked(tmp_path, eval_grad):
    # Rank 1's objective starts elsewhere than rank 0's: the run's x⁰ is rank 0's, sent to rank 1 whole.
    spec = write_plugin(tmp_path, hook=RANK_X0)
    n, rounds, d = 3, 30, 200  # d large enough that a dense gradient outweighs f and the metrics
    cfg = RunConfig(objective=spec, objective_args=(("dim", str(d)),), workers=n, k=2, stepsize_mult=4, rounds=rounds, eval_grad=eval_grad)
    sim = simulate(cfg, keep_iterates=True, eval_every=10)
    log, xs = tmp_path / "l.jsonl", tmp_path / "xs.npy"
    r = cli("run", "--objective", spec, "--objective-arg", f"dim={d}", "--workers", str(n), "--k", "2", "--stepsize-mult", "4", "--rounds",
            str(rounds), "--eval-every", "10", "--log", str(log), "--save-iterates", str(xs), "-q",
            "--status-port", "-1", *(["--eval-grad"] if eval_grad else []))
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(xs), np.array(sim.xs))
    np.testing.assert_array_equal(sim.xs[0], np.full(d, 0.5))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [row["grad_norm_sq"] for row in rows] == [rec.grad_norm_sq for rec in sim.records]
    assert [row.get("grad_norm_skipped") for row in rows] == [rec.grad_norm_skipped for rec in sim.records]
    evals = [row for row in rows if row["f"] is not None]
    assert [row["round"] for row in evals] == [0, 10, 20, 30]
    assert all(row["metrics"]["rank_plus_one"] == 2.0 for row in evals)
    if eval_grad:
        assert all(row["grad_norm_sq"] is not None and row.get("grad_norm_skipped") is None for row in evals)
        assert rows[-1]["eval_bytes"] >= len(evals) * n * 8 * d  # every worker's dense gradient
    else:
        assert all(row["grad_norm_sq"] is None and row["grad_norm_skipped"] for row in evals)
        assert rows[-1]["eval_bytes"] < len(evals) * n * 100  # f, the distortion and two metrics
    # x⁰ went to rank 1 only: ranks 0 and 2 computed it themselves.
    assert "rank 1's own x0 differs" in r.stderr
    assert "rank 0's own x0" not in r.stderr and "rank 2's own x0" not in r.stderr
