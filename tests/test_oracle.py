"""``simulate`` against the independent oracle (``tests/oracle.py``): every update rule, on small problems.

The run == simulate tests elsewhere prove the transport; they cannot see a wrong update rule, since both sides
call the same method objects. Here the iterates must agree with a plain dense implementation written from the
method doc to 1e-12 relative, and the log (f, ‖∇f‖², G, ‖g‖², both bit counts) with what the oracle logs.

The problems are chosen so that the code's special paths run: integer data and dyadic steps, where the first
rounds are exact in float64 and Top-k meets exact ties (the tie rule decides); d = 2000 with n·k ≪ d (the sparse
aggregation that sorts indices); d = 112 with n·k·64 ≥ d (the one that scatters into a dense buffer); a round with
a single participant (EF21-PP).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ef21.compression.compressors import TopK as TopKCompressor
from ef21.engine.config import RunConfig
from ef21.engine.nodes import MasterNode, WorkerNode
from ef21.engine.simulate import RunResult, simulate
from ef21.methods import EF21, EF21Plus, WorkerContext
from ef21.problems.objectives import LeastSquares as LsqObjective
from ef21.problems.problem import Problem, build_problem

from . import oracle

RTOL = 1e-12


@dataclass
class Case:
    """One small problem, seen by the project (``problem``) and by the oracle (``ref``), with its x⁰ and γ."""

    name: str
    cfg: RunConfig
    problem: Problem
    ref: oracle.Problem
    x0: np.ndarray
    gamma: float
    rounds: int


def lsq_problem(A: list[np.ndarray], b: list[np.ndarray]) -> Problem:
    objs = [LsqObjective(a, v) for a, v in zip(A, b)]
    # γ is given explicitly in every case below, so L only feeds the printed constants.
    return Problem(objs, L=1.0, L_i=[1.0] * len(objs), f_lower=0.0)


@functools.cache  # read-only once built; mushrooms is parsed once for the whole file
def make_case(name: str) -> Case:
    if name == "mushrooms":
        # Real data, d = 112, n = 4: n·k·64 ≥ d, the dense-buffer aggregation.
        cfg = RunConfig(data="mushrooms", problem="logreg", workers=4)
        p = build_problem(cfg)
        ref = oracle.LogReg([o.A for o in p.objectives], [o.y for o in p.objectives], cfg.lam)
        x0 = np.random.default_rng(0).standard_normal(p.d)
        return Case(name, cfg, p, ref, x0, gamma=0.05, rounds=80)
    if name == "integer-lsq":
        # Small integers, N_i = 4 rows (2/N_i exact), a duplicated column, x⁰ = 0 and γ = 1/64: the first
        # rounds are exact in float64 on both sides, and the duplicated column gives exact Top-k ties.
        rng = np.random.default_rng(7)
        A = [rng.integers(-2, 3, size=(4, 6)).astype(float) for _ in range(3)]
        for a in A:
            a[:, 4] = a[:, 1]
        b = [rng.integers(-3, 4, size=4).astype(float) for _ in range(3)]
        cfg = RunConfig(data="integer-lsq", problem="lsq", workers=3)
        return Case(name, cfg, lsq_problem(A, b), oracle.LeastSquares(A, b), np.zeros(6), gamma=1 / 64, rounds=100)
    if name == "counterexample":
        # Method doc §3.2: f_i = ⟨a_i, x⟩² + ¼‖x‖², as least squares for the project (A_i = 2·[a_iᵀ; ½I], b_i = 0)
        # and by its own formula for the oracle. From x⁰ = (1, 1, 1), ∇f_1 = (−5.5, 4.5, 4.5): Top-2 ties.
        a = [np.array(v, dtype=float) for v in ([-3, 2, 2], [2, -3, 2], [2, 2, -3])]
        A = [2.0 * np.vstack([v, 0.5 * np.eye(3)]) for v in a]
        cfg = RunConfig(data="counterexample", problem="lsq", workers=3)
        return Case(name, cfg, lsq_problem(A, [np.zeros(4)] * 3), oracle.RankOne(a), np.ones(3), gamma=1 / 128,
                    rounds=100)
    if name == "quadratic":
        # d = 2000, n = 3, k = 1: n·k·64 < d, the aggregation that sorts the union of indices.
        cfg = RunConfig(problem="quadratic", dim=2000, workers=3, seed=4)
        p = build_problem(cfg)
        ref = oracle.Quadratic([o.h for o in p.objectives], [o.c for o in p.objectives])
        return Case(name, cfg, p, ref, np.random.default_rng(1).standard_normal(2000), gamma=0.4, rounds=60)
    raise ValueError(name)


@dataclass(frozen=True)
class Variant:
    method: str
    compressor: str = "topk"
    k: int | None = 2
    init: str = "full"
    pattern: bool = False  # EF21-PP: leave workers out of some rounds
    encoding: str = "plain"


VARIANTS = {
    "gd": Variant("gd", "identity", None),
    "dcgd-topk": Variant("dcgd"),
    "dcgd-randk": Variant("dcgd", "randk"),
    "ef-topk": Variant("ef"),
    "ef-randk": Variant("ef", "randk"),
    "ef21-full": Variant("ef21"),
    "ef21-compressed": Variant("ef21", init="compressed"),
    "ef21-randk": Variant("ef21", "randk", init="compressed"),
    "ef21plus-full": Variant("ef21plus"),
    "ef21plus-compressed": Variant("ef21plus", init="compressed"),
    "ef21-pp": Variant("ef21", pattern=True),
    "ef21plus-pp": Variant("ef21plus", pattern=True),
    "ef21-compact": Variant("ef21", encoding="compact"),
    "ef21plus-compact": Variant("ef21plus", init="compressed", encoding="compact"),
}


def participation(n: int, rounds: int) -> dict[int, list[int]]:
    """A fixed pattern: rank (t mod n) left out in every third round, and all but rank 0 in every seventh."""
    out: dict[int, list[int]] = {}
    for t in range(1, rounds + 1):
        if t % 7 == 0:
            out[t] = list(range(1, n))  # a round with one participant: the single-message path
        elif t % 3 == 0:
            out[t] = [t % n]
    return out


def run_both(case: Case, v: Variant, tmp: Path, seed: int = 3) -> tuple[RunResult, oracle.Trace, object]:
    np.save(tmp / "x0.npy", case.x0)
    cfg = RunConfig(**(case.cfg.to_dict() | dict(
        method=v.method, compressor=v.compressor, k=v.k, init=v.init, stepsize=case.gamma, rounds=case.rounds,
        x0=str(tmp / "x0.npy"), seed=seed, encoding=v.encoding)))
    missing = participation(case.ref.n, case.rounds) if v.pattern else None
    sim = simulate(cfg, case.problem, keep_iterates=True, missing=missing)
    assert sim.stop_reason == "rounds", sim.message
    comp = {"topk": lambda: oracle.TopK(v.k), "randk": lambda: oracle.RandK(v.k),
            "identity": lambda: oracle.Identity()}[v.compressor]()
    if v.encoding == "compact":
        comp = oracle.Float32Rounded(comp)
    p, x0, gamma, T = case.ref, case.x0, case.gamma, case.rounds
    if v.method == "gd":
        ref = oracle.gd(p, x0, gamma, T)
    elif v.method == "dcgd":
        ref = oracle.dcgd(p, x0, gamma, T, comp, seed=seed)
    elif v.method == "ef":
        ref = oracle.ef(p, x0, gamma, T, comp, seed=seed)
    elif v.method == "ef21":
        ref = oracle.ef21(p, x0, gamma, T, comp, init=v.init, seed=seed, missing=missing)
    else:
        ref = oracle.ef21_plus(p, x0, gamma, T, comp, init=v.init, missing=missing)
    return sim, ref, comp


def assert_matches_oracle(sim: RunResult, ref: oracle.Trace) -> None:
    """Iterates to 1e-12 relative; the logged figures to the precision float64 can resolve them; bits exactly."""
    assert len(sim.records) == len(ref.x) == len(sim.xs)
    for t, (rec, x) in enumerate(zip(sim.records, sim.xs)):
        scale = ref.grad_scale[t]
        assert np.linalg.norm(x - ref.x[t]) <= RTOL * np.linalg.norm(ref.x[t]), f"x^{t}"
        assert rec.f == pytest.approx(ref.f[t], rel=RTOL, abs=RTOL * scale), f"f at round {t}"
        # ‖∇f‖² and G are squared norms of differences of O(‖∇f_i‖) vectors: float64 resolves them to about
        # 1e-16·(1/n)Σ‖∇f_i‖², whatever their own size.
        assert rec.grad_norm_sq == pytest.approx(ref.grad_norm_sq[t], rel=1e-9, abs=RTOL * scale), f"|grad f|^2 at {t}"
        if rec.G is None:  # a dropped worker keeps its old estimate, which its report does not give: unknown
            assert rec.missing
        else:
            assert rec.G == pytest.approx(ref.G[t], rel=1e-9, abs=RTOL * scale), f"G at round {t}"
        if ref.g_norm_sq[t] is None:
            assert rec.g_norm_sq is None
        else:
            assert rec.g_norm_sq == pytest.approx(ref.g_norm_sq[t], rel=1e-9, abs=RTOL * scale), f"|g|^2 at {t}"
        assert rec.bits_per_worker == ref.bits_per_worker[t], f"paper bits at round {t}"
        assert rec.payload_bits_per_worker == ref.payload_bits_per_worker[t], f"payload bits at round {t}"
        assert rec.bits_down_per_worker == ref.bits_down_per_worker[t], f"downlink bits at round {t}"
        if ref.grad_map_norm_sq[t] is None:
            assert rec.grad_map_norm_sq is None
        else:
            assert rec.grad_map_norm_sq == pytest.approx(ref.grad_map_norm_sq[t], rel=1e-9, abs=RTOL * scale)


CASES = ["mushrooms", "integer-lsq", "counterexample", "quadratic"]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", CASES)
def test_simulate_equals_the_oracle(case, variant, tmp_path):
    c = make_case(case)
    sim, ref, _ = run_both(c, VARIANTS[variant], tmp_path)
    assert_matches_oracle(sim, ref)
    if VARIANTS[variant].pattern:
        assert any(r.missing for r in sim.records)


def test_the_cases_exercise_top_k_ties(tmp_path):
    """The tie rule (lower index wins) decided real choices in these runs, so the comparison above covers it."""
    for case in ("integer-lsq", "counterexample"):
        c = make_case(case)
        for v in ("ef21-full", "ef21plus-compressed", "dcgd-topk"):
            _, _, comp = run_both(c, VARIANTS[v], tmp_path)
            assert comp.ties > 0, (case, v)


def test_ef21plus_keeps_each_candidate_somewhere(tmp_path):
    """Both branches of EF21+'s choice are taken in the compared runs (else the comparison could not see a
    flipped comparison)."""
    c = make_case("quadratic")
    for v in ("ef21plus-full", "ef21plus-compressed"):
        _, ref, _ = run_both(c, VARIANTS[v], tmp_path)
        choices = [f for row in ref.kept_fresh[1:] for f in row]
        assert any(choices) and not all(choices), v


def test_oracle_top_k_and_bits_by_hand():
    """The oracle's own pieces against values worked out by hand."""
    top = oracle.TopK(2)
    s = top(np.array([1.0, -3.0, 3.0, 0.5]))  # |−3| = |3|: both kept; the tie at the k-th is not reached
    np.testing.assert_array_equal(s.value, [0.0, -3.0, 3.0, 0.0])
    s = top(np.array([2.0, -1.0, 1.0, 1.0]))  # 2, then three 1s: the lowest index among them (1) wins
    np.testing.assert_array_equal(s.value, [2.0, -1.0, 0.0, 0.0])
    assert top.ties == 1
    assert [oracle.index_bits(d) for d in (2, 3, 4, 5, 112, 1024, 1025)] == [1, 2, 2, 3, 7, 10, 11]


def engine(case: Case, method: object, k: int, init: str = "full") -> tuple[list[WorkerNode], MasterNode]:
    comp = TopKCompressor(k)
    workers = [WorkerNode(method, comp, obj, i, gamma=case.gamma, x0=case.x0, init=init)  # type: ignore[arg-type]
               for i, obj in enumerate(case.problem.objectives)]
    return workers, MasterNode(method, len(workers), case.x0, gamma=case.gamma)  # type: ignore[arg-type]


@pytest.mark.parametrize("init", ["full", "compressed"])
def test_ef21plus_keeps_the_candidate_closer_to_the_gradient(init, tmp_path):
    """Each round, each worker's new g_i is whichever of b = C(∇f_i) and m = g_i + C(∇f_i − g_i) (the oracle's
    Top-k) is closer to ∇f_i, and the master's copy is that same vector."""
    c = make_case("quadratic")
    k = 2
    workers, master = engine(c, EF21Plus(), k, init)
    taken = {"fresh": 0, "markov": 0}
    for t in range(c.rounds):
        before = [w.state for w in workers]
        reports = [w.step() for w in workers]
        down = master.aggregate([r.message for r in reports])
        for w in workers:
            w.apply(down)
        if t == 0:
            continue
        for w, g_old, rep in zip(workers, before, reports):
            grad = rep.grad
            b = oracle.TopK(k)(grad).value
            m = g_old + oracle.TopK(k)(grad - g_old).value
            db, dm = float(np.sum((b - grad) ** 2)), float(np.sum((m - grad) ** 2))
            assert abs(db - dm) > 1e-9 * dm, "a near-tie: the rounding of the distances would decide"
            closer = "fresh" if db < dm else "markov"
            taken[closer] += 1
            np.testing.assert_array_equal(w.state, b if closer == "fresh" else m)
            assert rep.message.replace == (closer == "fresh")
        np.testing.assert_array_equal(master.rows, np.array([w.state for w in workers]))
    assert taken["fresh"] > 0 and taken["markov"] > 0, taken


def test_ef21plus_tie_keeps_the_markov_candidate():
    """Method doc §3.5: equal distances keep m (the EF21 step), as the official code does. Worked by hand with
    Top-1, ∇f_i = (3, 2): b = (3, 0) is at distance 4; the three g_i below give m at distance 4 (tie), 9, 1."""
    grad = np.array([3.0, 2.0])
    ctx = WorkerContext(TopKCompressor(1), gamma=1.0, init="full", rng=None)
    for g_i, expected, replace in (([0.0, 4.0], [3.0, 4.0], False),   # grad − g_i = (3, −2): m = (3, 4), tie
                                   ([0.0, 5.0], [3.0, 0.0], True),    # m = (3, 5) at 9: b is closer
                                   ([0.0, 3.0], [3.0, 3.0], False)):  # m = (3, 3) at 1: m is closer
        msg, g_new, dist = EF21Plus().worker_step(np.array(g_i), grad, ctx, grad)
        np.testing.assert_array_equal(g_new, expected)
        assert msg.replace == replace and dist == float(np.sum((np.array(expected) - grad) ** 2))


def test_ef21_pp_g_is_the_mean_of_all_n_estimates_stale_ones_included(tmp_path):
    """Method doc §3.8: after a round that leaves workers out, the master's g is (1/n) Σ_i g_i over all n workers,
    the left-out workers' stale g_i included — not the mean over the participants."""
    c = make_case("mushrooms")
    workers, master = engine(c, EF21(), 2)
    pattern = participation(len(workers), c.rounds)
    partial = 0
    for t in range(c.rounds):
        out = set(pattern.get(t, ()))
        reports = [w.step() for w in workers]
        down = master.aggregate([None if i in out else r.message for i, r in enumerate(reports)])
        for i, w in enumerate(workers):
            w.apply(down, included=i not in out)
        if out:
            partial += 1
            estimates = np.array([w.state for w in workers])
            np.testing.assert_allclose(master.replica.g, estimates.mean(axis=0), rtol=0,
                                       atol=1e-12 * np.abs(estimates).max())
            assert np.abs(master.replica.g - estimates[sorted(set(range(len(workers))) - out)].mean(axis=0)).max() \
                > 1e-6  # the participants' mean is another vector: the test can tell them apart
            for w in workers:
                np.testing.assert_array_equal(w.replica.g, master.replica.g)
    assert partial > 10


# -- the extensions: each rule against its plain dense twin ------------------------------------------------------

SEED = 3


def batch_sequence(case: Case, tau: int, rounds: int) -> oracle.Batches:
    """The documented minibatch convention (docs/methods.md, "Stochastic gradients"): worker i's rows in round t are
    ``default_rng([seed, i, t, 1]).choice(N_i, τ, replace=False)``, ascending."""
    sizes = [o.n_samples for o in case.problem.objectives]
    return {t: [np.sort(np.random.default_rng([SEED, i, t, 1]).choice(m, size=tau, replace=False))
                for i, m in enumerate(sizes)] for t in range(1, rounds + 1)}


def coin_sequence(p: float, rounds: int) -> dict[int, bool]:
    """PAGE's coin of round t, one for all workers: ``default_rng([seed, t, 2]).random() < p``."""
    return {t: bool(np.random.default_rng([SEED, t, 2]).random() < p) for t in range(1, rounds + 1)}


def sampled_pattern(n: int, count: int, rounds: int) -> dict[int, list[int]]:
    """EF21-PP's nice sampling: round t's participants ``default_rng([seed, t, 3]).choice(n, count, replace=False)``
    (everyone in round 0): the ranks it leaves out."""
    out = {}
    for t in range(1, rounds + 1):
        chosen = set(int(r) for r in np.random.default_rng([SEED, t, 3]).choice(n, size=count, replace=False))
        out[t] = sorted(set(range(n)) - chosen)
    return out


def smoothness_of(case: Case) -> list[float]:
    """Each worker's L_i computed here (method doc §5), for EF21-W's weights."""
    ref = case.ref
    if isinstance(ref, oracle.LogReg):
        return [oracle.logreg_smoothness(a, ref.lam) for a in ref.A]
    if isinstance(ref, oracle.Quadratic):
        return [float(h.max()) for h in ref.h]
    return [float(np.linalg.eigvalsh(2.0 * a.T @ a / a.shape[0])[-1]) for a in ref.A]  # type: ignore[attr-defined]


EXTENSIONS = {
    "sgd": dict(estimator="sgd"),
    "page": dict(estimator="page", page_p=0.3),
    "sgdm": dict(estimator="sgdm", sgdm_eta=0.3),
    "bc": dict(downlink_k=3),
    "hb": dict(momentum=0.5),
    "prox-box": dict(prox="box:-0.3:0.2"),
    "prox-l1": dict(prox="l1:0.02"),
    "w": dict(weights="smoothness"),
    "pp-sampled": dict(participation="2"),
}
STOCHASTIC = {"sgd", "page", "sgdm"}


@pytest.mark.parametrize("ext", list(EXTENSIONS))
@pytest.mark.parametrize("case", ["mushrooms", "integer-lsq", "quadratic"])
def test_extensions_equal_the_oracle(case, ext, tmp_path):
    c = make_case(case)
    if ext in STOCHASTIC and case != "mushrooms":
        # The quadratic has no rows to draw from; integer-lsq's exact Top-k ties (a duplicated column) would be
        # decided by last-bit rounding once minibatch means leave the dyadic numbers, on either side.
        pytest.skip("minibatch rules are compared on mushrooms")
    tau = 40
    kw = dict(EXTENSIONS[ext])
    if ext in STOCHASTIC:
        kw["batch_size"] = tau
    np.save(tmp_path / "x0.npy", c.x0)
    cfg = RunConfig(**(c.cfg.to_dict() | dict(method="ef21", compressor="topk", k=2, stepsize=c.gamma,
                                              rounds=c.rounds, x0=str(tmp_path / "x0.npy"), seed=SEED) | kw))
    problem = c.problem
    if ext == "w":  # the project's weights come from the objectives' L_i: give it the same, computed here
        problem = Problem(c.problem.objectives, c.problem.L, smoothness_of(c), c.problem.f_lower)
    sim = simulate(cfg, problem, keep_iterates=True)
    p, x0, gamma, T, top = c.ref, c.x0, c.gamma, c.rounds, oracle.TopK(2)
    if ext == "sgd":
        ref = oracle.ef21_sgd(p, x0, gamma, T, top, batch_sequence(c, tau, T), seed=SEED)
    elif ext == "page":
        ref = oracle.ef21_page(p, x0, gamma, T, top, batch_sequence(c, tau, T), coin_sequence(0.3, T), seed=SEED)
    elif ext == "sgdm":
        ref = oracle.ef21_sgdm(p, x0, gamma, T, top, batch_sequence(c, tau, T), 0.3, seed=SEED)
    elif ext == "bc":
        ref = oracle.ef21_bc(p, x0, gamma, T, top, oracle.TopK(3), seed=SEED)
    elif ext == "hb":
        ref = oracle.ef21_hb(p, x0, gamma, T, top, 0.5, seed=SEED)
    elif ext == "prox-box":
        ref = oracle.ef21_prox(p, x0, gamma, T, top, oracle.prox_box(-0.3, 0.2), seed=SEED)
    elif ext == "prox-l1":
        ref = oracle.ef21_prox(p, x0, gamma, T, top, oracle.prox_l1(0.02), seed=SEED)
    elif ext == "w":
        L = smoothness_of(c)
        ref = oracle.ef21_w(p, x0, gamma, T, top, [v / sum(L) for v in L], seed=SEED)
    else:
        ref = oracle.ef21(p, x0, gamma, T, top, seed=SEED, missing=sampled_pattern(p.n, 2, T))
    assert_matches_oracle(sim, ref)
    if ext == "page":
        coins = coin_sequence(0.3, T)
        assert any(coins.values()) and not all(coins.values())  # both branches of PAGE are compared
