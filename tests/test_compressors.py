from __future__ import annotations

import numpy as np
import pytest

from ef21.compression.compressors import (
    ContractiveUnbiased,
    Identity,
    Natural,
    RandK,
    ScaledRandK,
    ScaledSign,
    TopK,
    make_compressor,
    theory_alpha,
    top_k_indices,
)
from ef21.errors import UserError


def reference_top_k(x: np.ndarray, k: int) -> np.ndarray:
    # Stable sort on −|x| keeps the lower index first among equal magnitudes.
    return np.sort(np.argsort(-np.abs(x), kind="stable")[:k])


@pytest.mark.parametrize("d,k", [(1, 1), (5, 1), (5, 5), (50, 7), (112, 2), (1000, 10)])
def test_topk_contraction_is_exact_worst_case(rng, d, k):
    c = TopK(k)
    for _ in range(50):
        x = rng.standard_normal(d) * rng.uniform(0.1, 10)
        out = c(x)
        assert out.nnz == k
        err = np.sum((out.to_dense() - x) ** 2)
        assert err <= (1 - k / d) * np.sum(x**2) * (1 + 1e-12)
    assert c.alpha(d) == k / d


def test_topk_tie_rule_lower_index_wins():
    assert list(top_k_indices(np.ones(4), 2)) == [0, 1]
    assert list(top_k_indices(np.array([3.0, 1.0, -3.0, 2.0, 3.0]), 2)) == [0, 2]
    assert list(top_k_indices(np.array([0.5, -2.0, 2.0, 2.0, 1.0]), 2)) == [1, 2]
    assert list(top_k_indices(np.array([0.0, 0.0, 0.0]), 1)) == [0]


def test_topk_matches_stable_sort_reference_with_many_ties(rng):
    for _ in range(200):
        d = int(rng.integers(1, 60))
        k = int(rng.integers(1, d + 1))
        x = rng.integers(-3, 4, size=d).astype(float)
        assert np.array_equal(top_k_indices(x, k), reference_top_k(x, k))


def test_topk_large_d_matches_reference(rng):
    x = np.round(rng.standard_normal(1_000_000), 2)  # rounding makes ties at the threshold likely
    k = 10_000
    assert np.array_equal(top_k_indices(x, k), reference_top_k(x, k))


@pytest.mark.parametrize("d", [16_384, 40_000])
@pytest.mark.parametrize("k", [1, 3, 100, 1_000])
def test_topk_sampled_threshold_path_is_exact(rng, d, k):
    """Patterns that mislead a strided sample (sorted, periodic spikes between sample points, plateaus,
    all-equal) must still give exactly the reference selection, through the fallback when needed."""
    ramp = np.arange(d, dtype=float)
    stride = d // 2048  # the sample's stride
    spikes = np.where(np.arange(d) % stride == 3, 9.0, 0.5)  # the sample sees none of them
    decoy = np.where(np.arange(d) % stride == 0, 9.0 + ramp / d, 0.5)  # the sample sees only these: fallback
    patterns = [
        rng.standard_normal(d), ramp, ramp[::-1].copy(), spikes, decoy, np.ones(d), np.zeros(d),
        np.round(rng.standard_normal(d), 1), rng.integers(0, 3, d).astype(float), -np.abs(rng.standard_normal(d)),
    ]
    for x in patterns:
        assert np.array_equal(top_k_indices(x, k), reference_top_k(x, k))


def test_randk_contraction_in_expectation(rng):
    d, k = 40, 5
    x = rng.standard_normal(d)
    c = RandK(k)
    errs = [np.sum((c(x, rng).to_dense() - x) ** 2) for _ in range(20000)]
    assert np.mean(errs) == pytest.approx((1 - k / d) * np.sum(x**2), rel=0.02)
    assert c.alpha(d) == k / d


def test_scaled_randk_unbiased_and_variance(rng):
    d, k = 50, 5
    x = rng.standard_normal(d)
    c = ScaledRandK(k)
    samples = np.array([c(x, rng).to_dense() for _ in range(40000)])
    assert np.abs(samples.mean(axis=0) - x).max() < 0.1
    var = np.mean(np.sum((samples - x) ** 2, axis=1))
    assert c.omega(d) == d / k - 1
    assert var == pytest.approx(c.omega(d) * np.sum(x**2), rel=0.03)


def test_natural_compression_unbiased_powers_of_two(rng):
    d = 30
    x = rng.standard_normal(d) * 5
    x[3] = 0.0
    c = Natural()
    samples = np.array([c(x, rng).to_dense() for _ in range(40000)])
    nz = samples[:, np.arange(d) != 3]
    assert np.all(np.log2(np.abs(nz)) == np.round(np.log2(np.abs(nz))))
    assert np.all(np.sign(nz) == np.sign(x[np.arange(d) != 3]))
    assert np.all(samples[:, 3] == 0.0)
    assert np.abs(samples.mean(axis=0) - x).max() < 0.05 * np.abs(x).max()
    var = np.mean(np.sum((samples - x) ** 2, axis=1))
    assert var <= c.omega(d) * np.sum(x**2) * 1.02


def test_scaled_sign_identity(rng):
    d = 25
    c = ScaledSign()
    for _ in range(20):
        x = rng.standard_normal(d)
        err = np.sum((c(x).to_dense() - x) ** 2)
        assert err == pytest.approx(np.sum(x**2) - np.sum(np.abs(x)) ** 2 / d, rel=1e-10)
        assert err <= (1 - c.alpha(d)) * np.sum(x**2) * (1 + 1e-12)


@pytest.mark.parametrize("inner", [ScaledRandK(4), Natural()])
def test_unbiased_made_contractive(rng, inner):
    d = 20
    c = ContractiveUnbiased(inner)
    assert c.alpha(d) == pytest.approx(1 / (inner.omega(d) + 1))
    x = rng.standard_normal(d)
    errs = [np.sum((c(x, rng).to_dense() - x) ** 2) for _ in range(20000)]
    assert np.mean(errs) <= (1 - c.alpha(d)) * np.sum(x**2) * 1.02


def test_identity_and_constants():
    assert Identity().alpha(10) == 1.0
    assert theory_alpha(ScaledRandK(5), 50) == pytest.approx(0.1)  # method doc §2: ω = d/k − 1 = 9, α = 1/(ω + 1)
    assert theory_alpha(TopK(2), 112) == 2 / 112


def test_randomized_compressors_are_reproducible_from_their_generator(rng):
    x = rng.standard_normal(100)
    for c in (RandK(7), ScaledRandK(7), Natural()):
        a = c(x, np.random.default_rng([1, 2, 3])).to_dense()
        b = c(x, np.random.default_rng([1, 2, 3])).to_dense()
        other = c(x, np.random.default_rng([1, 2, 4])).to_dense()
        assert np.array_equal(a, b)
        assert not np.array_equal(a, other)


def test_make_compressor_checks_k():
    with pytest.raises(UserError, match="0 < k <= d"):
        make_compressor("topk", 0, 10)
    with pytest.raises(UserError, match="0 < k <= d"):
        make_compressor("randk", 11, 10)
    with pytest.raises(UserError, match="unknown compressor"):
        make_compressor("zip", 1, 10)


@pytest.mark.parametrize("name", ["identity", "topk", "randk", "urandk", "natural", "sign", "crandk", "cnatural"])
@pytest.mark.parametrize("k", [1, 40])  # k = d: Top-k and Rand-k keep everything
def test_output_never_aliases_the_input(rng, name, k):
    """EF21 reuses its input as scratch after compressing it; an aliased output would corrupt the message."""
    x = rng.standard_normal(40)
    c = make_compressor(name, k, 40)(x, rng)
    assert not np.shares_memory(c.values, x)
    before = c.values.copy()
    x[:] = 123.0
    np.testing.assert_array_equal(c.values, before)
