"""The aggregator tier's order of sums (``ef21.engine.tree``): ``simulate --aggregators F``.

F = 1 is the flat run bit for bit; F > 1 differs from it only in the last bits (1e-12 relative). The order itself
is checked against ``oracle.tree_sum``, a plain dense loop, to the last bit, and on messages whose sum depends on
the order (so a wrong order fails); a whole run against the oracle's EF21 summed in that order.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from ef21.compression.sparse import SparseVector
from ef21.engine.config import RunConfig
from ef21.engine.simulate import simulate
from ef21.engine.tree import Tree
from ef21.errors import UserError
from ef21.methods import EF21, Message

from . import oracle
from .test_oracle import make_case, participation

CFG = RunConfig(problem="quadratic", dim=60, workers=7, k=3, rounds=25, data=None)


def xs_rel(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-300)) for x, y in zip(a, b))


@pytest.mark.parametrize("method", ["ef21", "gd", "dcgd", "ef"])
def test_one_aggregator_is_flat_and_several_are_close(method: str) -> None:
    cfg = dataclasses.replace(CFG, method=method, compressor="identity" if method == "gd" else "topk")
    flat = simulate(cfg, keep_iterates=True)
    one = simulate(dataclasses.replace(cfg, aggregators=1), keep_iterates=True)
    three = simulate(dataclasses.replace(cfg, aggregators=3), keep_iterates=True)
    assert all(np.array_equal(a, b) for a, b in zip(flat.xs, one.xs))
    assert [r.grad_norm_sq for r in flat.records] == [r.grad_norm_sq for r in one.records]
    assert xs_rel(three.xs, flat.xs) <= 1e-12
    assert [r.grad_norm_sq for r in three.records] == pytest.approx([r.grad_norm_sq for r in flat.records], rel=1e-9)


@pytest.mark.parametrize("d", [40, 5000])  # n·k·64 ≥ d (dense buffer) and < d (sorted union)
def test_tree_order_is_the_oracles_to_the_last_bit(d: int) -> None:
    rng = np.random.default_rng(d)
    n, k = 11, 6
    msgs: list[Message | None] = []
    for r in range(n):
        idx = np.sort(rng.choice(d if d < 100 else 60, size=k, replace=False)).astype(np.uint32)
        msgs.append(None if r == 4 else Message(SparseVector(d, idx, rng.standard_normal(k) * 10.0 ** rng.integers(
            -8, 8, size=k))))
    dense = [None if m is None else m.vector.to_dense() for m in msgs]
    orders_differ = False
    for F in (1, 2, 3, 5, 11):
        tree = Tree(n, F)
        got = EF21().master_aggregate(None, tree.fold(msgs, d), d).vector.to_dense()
        want = oracle.tree_sum(dense, F)
        assert np.array_equal(got, want), F
        orders_differ |= not np.array_equal(want, oracle.tree_sum(dense, 1))
    assert orders_differ  # the messages are such that a wrong order would be seen


def test_blocks_cover_every_rank_once() -> None:
    for n in (1, 5, 16, 17):
        for F in range(1, n + 1):
            tree = Tree(n, F)
            ranks = [r for b in tree.blocks() for r in b]
            assert ranks == list(range(n)) and all(len(b) > 0 for b in tree.blocks())
            assert all(tree.block_of(r) == j for j, b in enumerate(tree.blocks()) for r in b)


@pytest.mark.parametrize("case,pattern", [("quadratic", False), ("mushrooms", True)])
def test_run_matches_the_oracle_in_tree_order(case: str, pattern: bool, tmp_path) -> None:
    c = make_case(case)
    np.save(tmp_path / "x0.npy", c.x0)
    F = 2
    cfg = RunConfig(**(c.cfg.to_dict() | dict(stepsize=c.gamma, rounds=30, x0=str(tmp_path / "x0.npy"), seed=3,
                                               k=2, aggregators=F)))
    missing = participation(c.ref.n, 30) if pattern else None
    sim = simulate(cfg, c.problem, keep_iterates=True, missing=missing)
    ref = oracle.ef21(c.ref, c.x0, c.gamma, 30, oracle.TopK(2), seed=3, missing=missing, aggregators=F)
    assert xs_rel(sim.xs, ref.x) <= 1e-12


@pytest.mark.parametrize("flags,said", [
    (["--method", "ef21plus"], "ef21plus cannot be summed before the master"),
    (["--method", "diana", "--compressor", "urandk"], "diana cannot be summed"),
    (["--weights", "smoothness"], "EF21-W weighs each worker's message"),
    (["--aggregators", "9"], "--aggregators must lie in 0..4"),
])
def test_what_cannot_be_summed_is_refused_in_one_line(flags: list[str], said: str) -> None:
    args = ["--problem", "quadratic", "--dim", "20", "--workers", "4", "--rounds", "2", "--aggregators", "2", *flags]
    p = subprocess.run([sys.executable, "-m", "ef21", "simulate", *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert said in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    with pytest.raises(UserError):
        RunConfig(workers=4, aggregators=5)
