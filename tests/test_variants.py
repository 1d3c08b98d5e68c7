"""EF21's extensions (BC, PP, HB, Prox, W) and the stochastic estimators (SGD, PAGE, SGDM): each one's own
property in the simulator, the service equal to the simulator for each, and their bad flags."""

from __future__ import annotations

import numpy as np
import pytest

from ef21.engine.config import RunConfig
from ef21.engine.simulate import simulate
from ef21.methods.participation import participants, participation_count

BASE = dict(workers=4, k=2, x0="normal:0")


def xs(cfg: RunConfig, **kw) -> np.ndarray:
    return np.array(simulate(cfg, keep_iterates=True, **kw).xs)


# -- EF21-BC ---------------------------------------------------------------------------------------------------

def test_bc_broadcast_carries_exactly_K_entries_and_converges():
    cfg = RunConfig(**BASE, downlink_k=5, stepsize_mult=64, rounds=300)
    r = simulate(cfg)
    # 32 bits per broadcast value, round 0 (g⁰ whole) excluded: exactly K values a round after that.
    assert [rec.bits_down_per_worker for rec in r.records[1:]] == [32.0 * 5 * t for t in range(0, 300)]
    # Plain EF21 broadcasts the union of the 4 workers' supports: up to 4k = 8 values.
    plain = simulate(RunConfig(**BASE, stepsize_mult=64, rounds=300))
    assert plain.records[-1].bits_down_per_worker > r.records[-1].bits_down_per_worker
    assert r.records[-1].grad_norm_sq < 1e-2 * r.records[0].grad_norm_sq


def test_bc_with_K_equal_d_is_plain_ef21():
    # C_M = identity: b = g̃ − g exactly, so g = g̃ every round, as without BC (up to rounding of g + (g̃ − g)).
    a = xs(RunConfig(**BASE, downlink_k=112, stepsize_mult=16, rounds=100))
    b = xs(RunConfig(**BASE, stepsize_mult=16, rounds=100))
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


# -- EF21-PP by sampling -----------------------------------------------------------------------------------------

def test_pp_samples_by_seed_and_round_and_replays_from_its_log():
    cfg = RunConfig(**BASE, participation="0.5", stepsize=0.01, rounds=120)
    r = simulate(cfg, keep_iterates=True)
    assert participation_count("0.5", 4) == 2
    for rec in r.records[1:]:
        sampled = participants(cfg.seed, rec.round, 4, 2)
        assert sampled is not None and len(sampled) == 2
        assert rec.missing == sorted(set(range(4)) - sampled)
        assert rec.bits_per_worker == 32 * 2 * 2 * rec.round / 4  # only the sampled send, k = 2 values each
    assert r.records[0].missing is None  # round 0 (g_i⁰) has everyone
    # The log's `missing` is enough to replay the run without sampling (same stepsize).
    replay = simulate(RunConfig(**BASE, stepsize=0.01, rounds=120), keep_iterates=True,
                      missing={rec.round: rec.missing for rec in r.records if rec.missing})
    np.testing.assert_array_equal(np.array(replay.xs), np.array(r.xs))
    # Another seed draws other participants.
    other = simulate(RunConfig(**BASE, participation="0.5", stepsize=0.01, rounds=5, seed=1))
    assert [rec.missing for rec in other.records] != [rec.missing for rec in r.records[:6]]


def test_pp_theory_stepsize_shrinks_with_participation():
    g = [simulate(RunConfig(**BASE, participation=p, rounds=0)).constants.gamma for p in ("1.0", "0.5", "0.25")]
    assert g[0] > g[1] > g[2]
    full = simulate(RunConfig(**BASE, rounds=0)).constants
    assert g[0] == pytest.approx(full.gamma, rel=1e-12)  # p = 1 is EF21's Theorem 2


# -- EF21-HB -----------------------------------------------------------------------------------------------------

def test_hb_follows_its_recursion_and_eta_zero_is_ef21():
    cfg = RunConfig(**BASE, momentum=0.5, stepsize_mult=16, rounds=40)
    hb = xs(cfg)
    plain = xs(RunConfig(**BASE, stepsize_mult=16, rounds=40))
    assert np.abs(hb[-1] - plain[-1]).max() > 1e-6
    np.testing.assert_array_equal(xs(RunConfig(**BASE, momentum=0.0, stepsize_mult=16, rounds=40)), plain)
    # x^{t+1} − x^t = −γ v^t and v^{t+1} = η v^t + g^{t+1}: successive steps obey s^{t+1} = η s^t − γ g^{t+1}.
    r = simulate(cfg, keep_iterates=True)
    steps = np.diff(np.array(r.xs), axis=0)
    gamma = r.constants.gamma
    # g^{t+1} = −(s^{t+1} − η s^t)/γ must be EF21's aggregate, which moves x by −γ g without momentum; check
    # the recursion's consistency on the direction implied by two consecutive steps.
    g_implied = -(steps[1:] - 0.5 * steps[:-1]) / gamma
    assert np.all(np.isfinite(g_implied)) and np.linalg.norm(g_implied[-1]) < np.linalg.norm(g_implied[0])


# -- EF21-Prox ---------------------------------------------------------------------------------------------------

def test_prox_box_keeps_every_iterate_inside_and_stops_on_the_gradient_mapping():
    cfg = RunConfig(**BASE, prox="box:-0.2:0.3", stepsize_mult=64, rounds=3000, tol=1e-10)
    r = simulate(cfg, keep_iterates=True)
    inside = np.array(r.xs[1:])
    assert inside.min() >= -0.2 and inside.max() <= 0.3
    assert r.stop_reason == "tol" and r.records[-1].grad_map_norm_sq < 1e-10
    assert r.records[-1].grad_norm_sq > 1e-6  # the constraint binds: ∇f does not vanish, the mapping does


def test_prox_l1_soft_thresholds():
    r = simulate(RunConfig(**BASE, prox="l1:0.05", stepsize_mult=64, rounds=2000), keep_iterates=True)
    assert np.count_nonzero(r.x == 0.0) > 10  # the ℓ1 prox makes exact zeros
    assert r.records[-1].grad_map_norm_sq < 1e-3 * r.records[0].grad_map_norm_sq


# -- EF21-W ------------------------------------------------------------------------------------------------------

def test_w_is_ef21_under_its_change_of_variables():
    """For a positively homogeneous C (Top-k), ĝ_i = n·w_i·g_i turns EF21-W into EF21: same iterates."""
    w = xs(RunConfig(**BASE, weights="smoothness", stepsize=0.02, rounds=150))
    plain = xs(RunConfig(**BASE, stepsize=0.02, rounds=150))
    np.testing.assert_allclose(w, plain, rtol=1e-8, atol=1e-11)
    c = simulate(RunConfig(**BASE, weights="smoothness", rounds=0)).constants
    assert c.rule == "EF21-W" and c.gamma == pytest.approx(1 / (c.L + c.L_am * np.sqrt(c.beta / c.theta)))


# -- stochastic estimators -----------------------------------------------------------------------------------

def test_estimators_reduce_to_ef21_at_their_limits():
    full = xs(RunConfig(**BASE, stepsize_mult=16, rounds=60))
    # PAGE with p = 1 takes the full gradient every round.
    np.testing.assert_array_equal(xs(RunConfig(**BASE, stepsize_mult=16, rounds=60, estimator="page", page_p=1.0,
                                               batch_size=5)), full)
    # SGD with the whole shard as its batch is GD on the shard (rows in another order: equal to rounding).
    np.testing.assert_allclose(xs(RunConfig(**BASE, stepsize_mult=16, rounds=60, estimator="sgd",
                                            batch_fraction=1.0)), full, rtol=1e-9, atol=1e-12)
    # SGDM with η = 1 is SGD.
    sgd = xs(RunConfig(**BASE, stepsize_mult=16, rounds=60, estimator="sgd", batch_size=50))
    np.testing.assert_array_equal(xs(RunConfig(**BASE, stepsize_mult=16, rounds=60, estimator="sgdm", sgdm_eta=1.0,
                                               batch_size=50)), sgd)


def test_page_reaches_a_tolerance_where_sgd_stalls():
    """The bells-and-whistles paper's claim (method doc §6.2): with 5 % batches PAGE converges, SGD stalls."""
    common = dict(**BASE, stepsize_mult=256, rounds=1500, batch_fraction=0.05)
    page = simulate(RunConfig(**common, estimator="page"), eval_every=50)
    sgd = simulate(RunConfig(**common, estimator="sgd"), eval_every=50)
    assert page.records[-1].grad_norm_sq < 1e-12
    assert all(rec.grad_norm_sq is None for rec in page.records if rec.round % 50)  # evaluated every 50 only
    late = [rec.grad_norm_sq for rec in sgd.records[-500:] if rec.grad_norm_sq is not None]
    assert min(late) > 1e-4  # SGD's noise floor


def test_minibatches_replay_from_the_seed():
    cfg = RunConfig(**BASE, estimator="sgd", batch_size=30, stepsize_mult=16, rounds=30)
    np.testing.assert_array_equal(xs(cfg), xs(cfg))
    assert not np.array_equal(xs(cfg)[-1], xs(RunConfig(**{**cfg.to_dict(), "seed": 3, "objective_args": ()}))[-1])
