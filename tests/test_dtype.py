"""``--dtype float32`` (issue 22, point 4): x, g and every g_i in float32 end to end. ``ef21 run`` (a real master,
real worker processes) equals ``ef21 simulate`` bit for bit, every saved iterate is float32, the simulator equals an
independent plain-numpy float32 loop (``tests/oracle.py``), and what cannot work is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ef21.compression.sparse import SparseVector, sparse_sum
from ef21.engine.config import RunConfig
from ef21.engine.simulate import simulate
from ef21.errors import UserError
from ef21.problems.problem import build_problem
from ef21_wire.serde import lean_from_proto, lean_to_proto

from . import oracle
from .helpers import ef21_cli as ef21
from .helpers import one_error_line
from .test_family import config_of

QUICK = ["--workers", "3", "--k", "2", "--stepsize-mult", "16", "--rounds", "40", "--x0", "normal:0"]


def run_and_compare(tmp_path, args: list[str], dtype: str, *, via_file: bool = False) -> None:
    """``ef21 run`` with ``args`` equals the simulator: every iterate (saved in ``dtype``), the final x and the log."""
    log, its, out = tmp_path / "l.jsonl", tmp_path / "xs.npy", tmp_path / "x.npy"
    flags = ["--dtype", dtype]
    if via_file:  # the configuration file's key, as the flag's
        (tmp_path / "run.toml").write_text(f'dtype = "{dtype}"\n')
        flags = ["--config", str(tmp_path / "run.toml")]
    r = ef21("run", *args, *flags, "--log", str(log), "--save-iterates", str(its), "--out", str(out), "-q",
             "--status-port", "-1", "--checksum-every", "5")
    assert r.returncode == 0, r.stderr
    sim = simulate(config_of([*args, "--dtype", dtype]), keep_iterates=True)
    xs, x = np.load(its), np.load(out)
    assert xs.dtype == x.dtype == sim.x.dtype == np.dtype(dtype)
    assert all(a.dtype == np.dtype(dtype) for a in sim.xs)
    np.testing.assert_array_equal(xs, np.array(sim.xs))
    assert x.tobytes() == sim.x.tobytes()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    for row, rec in zip(rows, sim.records, strict=True):
        assert (row["f"], row["grad_norm_sq"], row["G"], row["g_norm_sq"]) == (rec.f, rec.grad_norm_sq, rec.G,
                                                                               rec.g_norm_sq)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_run_equals_simulate_top_k(tmp_path, dtype):
    run_and_compare(tmp_path, QUICK, dtype, via_file=dtype == "float32")


def test_run_equals_simulate_float32_bc_pp(tmp_path):
    """EF21-BC (the master's own EF21 on g, its g̃ float32) with partial participation."""
    run_and_compare(tmp_path, [*QUICK, "--downlink-k", "5", "--participation", "2"], "float32")


@pytest.mark.slow
def test_run_equals_simulate_float32_hb(tmp_path):
    """EF21-HB: the heavy ball's v float32 on every replica."""
    run_and_compare(tmp_path, [*QUICK, "--momentum", "0.5"], "float32")


def test_every_method_vector_is_float32_and_half_the_bytes():
    cfg = RunConfig(workers=3, k=2, rounds=3, x0="normal:0", dtype="float32", downlink_k=4)
    from ef21.engine.nodes import MasterNode, WorkerNode
    from ef21.engine.simulate import plan_for

    p = build_problem(cfg)
    plan = plan_for(cfg, p)
    from ef21.engine.config import make_x0

    x0 = make_x0(cfg.x0, p.d, None, cfg.np_dtype)
    ws = [WorkerNode(plan.method, plan.compressor, o, i, gamma=plan.gamma, x0=x0, setting=plan.worker_setting(i))
          for i, o in enumerate(p.objectives)]
    m: MasterNode = plan.master_node(x0)
    for _ in range(3):
        msgs = [w.step().message for w in ws]
        assert all(msg is not None and msg.vector.values.dtype == np.float32 for msg in msgs)
        down = m.aggregate(msgs)
        assert down.vector.values.dtype == np.float32
        for w in ws:
            w.apply(down)
    assert m.rows is not None and m.rows.dtype == np.float32 and m.downlink is not None
    assert m.downlink.g_tilde.dtype == np.float32
    for r in [m.replica, *(w.replica for w in ws)]:
        assert r.x.dtype == r.g.dtype == np.float32
    assert all(w.state.dtype == np.float32 for w in ws)
    # Start/Resync's lean vectors: float32 on the wire (4 bytes a value), and back with their exact bits.
    g = ws[0].replica.g
    msg = lean_to_proto(g)
    assert len(msg.values) == 4 * g.shape[0]
    assert lean_from_proto(msg, g.shape[0], np.float32).tobytes() == g.tobytes()


def test_float32_sums_add_in_float32_in_rank_order():
    """The sparse sum of float32 vectors is the sequential float32 sum (np.bincount would add in float64)."""
    rng = np.random.default_rng(0)
    d = 10_000  # few entries for d: the unique/add.at path
    vs = [SparseVector(d, np.sort(rng.choice(d, 8, replace=False)).astype(np.uint32),
                       rng.standard_normal(8).astype(np.float32)) for _ in range(5)]
    vs.append(SparseVector(d, vs[0].indices, np.full(8, 1e-8, np.float32)))
    s = sparse_sum(vs, d)
    acc = np.zeros(d, np.float32)
    for v in vs:
        acc[v.indices] += v.values
    assert s.values.dtype == np.float32
    assert s.to_dense().tobytes() == acc.tobytes()


def test_simulator_equals_an_independent_float32_loop(tmp_path):
    """EF21 Top-k on mushrooms in float32 against ``oracle.ef21_float32``: bit for bit, and visibly not float64."""
    cfg = RunConfig(data="mushrooms", problem="logreg", workers=4)
    p = build_problem(cfg)
    ref = oracle.LogReg([o.A for o in p.objectives], [o.y for o in p.objectives], cfg.lam)
    x0 = np.random.default_rng(0).standard_normal(p.d)
    np.save(tmp_path / "x0.npy", x0)
    T, gamma, k = 60, 0.05, 3
    run = RunConfig(**(cfg.to_dict() | dict(k=k, stepsize=gamma, rounds=T, x0=str(tmp_path / "x0.npy"),
                                            dtype="float32")))
    sim = simulate(run, p, keep_iterates=True)
    xs = oracle.ef21_float32(ref, x0, gamma, T, k)
    assert len(sim.xs) == T + 1
    for t, (a, b) in enumerate(zip(sim.xs, xs)):
        assert a.dtype == b.dtype == np.float32
        assert a.tobytes() == b.tobytes(), f"x^{t} differs by {np.abs(a - b).max()}"
    assert sim.x.tobytes() == xs[T].tobytes()  # the last round logs x^T and stops
    wide = simulate(RunConfig(**(run.to_dict() | dict(dtype="float64"))), p)
    assert 1e-8 < np.linalg.norm(wide.x - sim.x) / np.linalg.norm(wide.x) < 1e-3


def test_the_quadratic_takes_float32_x_with_the_bits_of_the_float64_boundary(monkeypatch):
    """The separable quadratic computes a float32 run's gradient from the float32 x itself (``accepts_float32``):
    the bits of widening x, computing in float64 and rounding once, without those two passes — checked against
    that computation written out, and a whole run against the same run through the worker's widening boundary."""
    from ef21.problems.objectives import SeparableQuadratic

    rng = np.random.default_rng(4)
    d = 5000
    q = SeparableQuadratic(rng.uniform(0.5, 1.5, d), rng.standard_normal(d))
    x = (rng.standard_normal(d) * 3).astype(np.float32)
    want = (q.h * (x.astype(np.float64) - q.c)).astype(np.float32)
    f, g = q.value_and_grad(x)
    assert q.grad(x).dtype == g.dtype == np.float32
    assert q.grad(x).tobytes() == g.tobytes() == want.tobytes()
    assert f == q.value_and_grad(x.astype(np.float64))[0]
    cfg = RunConfig(problem="quadratic", dim=1 << 16, workers=3, k=600, rounds=8, dtype="float32", x0="normal:1")
    own = simulate(cfg, keep_iterates=True)
    monkeypatch.setattr(SeparableQuadratic, "accepts_float32", False)  # the worker widens x and rounds ∇ itself
    widened = simulate(cfg, keep_iterates=True)
    assert np.array(own.xs).tobytes() == np.array(widened.xs).tobytes()
    assert [(r.f, r.grad_norm_sq, r.G) for r in own.records] == [(r.f, r.grad_norm_sq, r.G) for r in widened.records]


@pytest.mark.parametrize("args,match", [
    (["--dtype", "float16"], "invalid choice"),
    (["--dtype", "float32", "--method", "diana", "--compressor", "urandk"], "--method diana keeps float64 state"),
    (["--dtype", "float32", "--optimizer", "adam", "--stepsize", "0.01"], "does not run with --optimizer"),
    (["--dtype", "float32", "--prox", "l1:0.1"], "does not run with --prox"),
])
def test_combinations_that_cannot_work_are_refused_in_one_line(args, match):
    r = ef21("simulate", *QUICK, *args)
    assert r.returncode == 2
    assert match in one_error_line(r)


def test_config_refuses_an_unknown_dtype():
    with pytest.raises(UserError, match="--dtype must be one of float64, float32"):
        RunConfig(dtype="float16")


def test_a_checkpoint_of_another_dtype_or_a_corrupt_one_is_refused(tmp_path):
    ck = tmp_path / "ck.npz"
    common = [*QUICK, "-q", "--status-port", "-1"]
    r = ef21("run", *common, "--dtype", "float32", "--checkpoint", str(ck), "--checkpoint-every", "10")
    assert r.returncode == 0, r.stderr
    with np.load(ck) as z:
        meta = json.loads(z["meta"].tobytes())
        assert z["x"].dtype == z["g"].dtype == z["rows"].dtype == np.float32
    assert meta["config"]["dtype"] == "float32"
    r = ef21("run", *common, "--dtype", "float64", "--resume", str(ck), "--checkpoint", str(ck))
    assert r.returncode == 2
    assert "--dtype float64 (checkpoint: float32)" in one_error_line(r)
    raw = bytearray(ck.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    ck.write_bytes(bytes(raw))
    ck.with_name(ck.name + ".prev").unlink(missing_ok=True)
    r = ef21("run", *common, "--dtype", "float32", "--resume", str(ck), "--checkpoint", str(ck))
    assert r.returncode == 2 and one_error_line(r).count("\n") == 0
    assert "checkpoint" in one_error_line(r)
