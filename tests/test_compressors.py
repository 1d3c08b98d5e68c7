from __future__ import annotations

import numpy as np
import pytest

from ef21.compression.compressors import (
    ContractiveUnbiased,
    Identity,
    LayerwiseTopK,
    Natural,
    RandK,
    ScaledRandK,
    ScaledSign,
    TopK,
    layerwise_topk,
    make_compressor,
    max_entries,
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


TENSORS = [("conv.weight", 288), ("conv.bias", 8), ("bn.weight", 8), ("fc.weight", 640), ("fc.bias", 10)]


def test_layerwise_topk_is_topk_within_each_tensor(rng):
    c = layerwise_topk("0.05", 2, TENSORS, 954)
    assert c.ks == (15, 2, 2, 32, 2) and c.k == 53 and max_entries(c, 954) == 53
    x = rng.standard_normal(954)
    out = c(x)
    assert out.nnz == 53 and np.all(np.diff(out.indices.astype(int)) > 0)  # one ascending support over x
    offset = 0
    for (_, n), k in zip(TENSORS, c.ks):
        part = out.indices[(out.indices >= offset) & (out.indices < offset + n)] - offset
        assert np.array_equal(part, reference_top_k(x[offset:offset + n], k))  # each tensor's own Top-k
        offset += n
    np.testing.assert_array_equal(out.values, x[out.indices])


@pytest.mark.parametrize("spec,floor", [("0.05", 1), ("0.3", 3), ("2", 1), ("8", 1)])
def test_layerwise_topk_contraction_holds_and_alpha_is_attained(rng, spec, floor):
    """‖C(x) − x‖² ≤ (1 − α)‖x‖² with α = min_j k_j/d_j, over random vectors of every scale and vectors that
    pile their mass into one tensor; an x spread evenly over the tensor with the smallest k_j/d_j attains it
    (closed form: that tensor keeps k_j of its d_j equal entries)."""
    c = layerwise_topk(spec, floor, TENSORS, 954)
    alpha = c.alpha(954)
    assert alpha == min(k / n for k, (_, n) in zip(c.ks, TENSORS))
    sizes = np.array([n for _, n in TENSORS])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for trial in range(300):
        x = rng.standard_normal(954) * rng.uniform(0.01, 100)
        if trial % 3 == 1:  # all the mass in one tensor
            j = trial % len(TENSORS)
            mask = np.zeros(954, bool)
            mask[starts[j]:starts[j] + sizes[j]] = True
            x[~mask] *= 1e-6
        err = np.sum((c(x).to_dense() - x) ** 2)
        assert err <= (1 - alpha) * np.sum(x**2) * (1 + 1e-12)
    worst = int(np.argmin([k / n for k, n in zip(c.ks, sizes)]))
    x = np.zeros(954)
    x[starts[worst]:starts[worst] + sizes[worst]] = rng.choice([-1.0, 1.0], sizes[worst])
    err = np.sum((c(x).to_dense() - x) ** 2)
    assert err == pytest.approx((1 - alpha) * np.sum(x**2), rel=1e-12)
    assert theory_alpha(c, 954) == alpha


def test_layerwise_topk_a_global_k_starves_small_tensors_and_layerwise_does_not(rng):
    """Why it exists: with the big tensors' entries larger, a global Top-k of the same total budget leaves the
    biases out, round after round; layer-wise keeps some of every tensor."""
    x = rng.standard_normal(954)
    x[288:296] *= 0.01  # conv.bias: small gradients
    c = layerwise_topk("0.05", 1, TENSORS, 954)
    glob = TopK(c.k)(x).indices
    assert not np.any((glob >= 288) & (glob < 296))
    lw = c(x).indices
    assert np.count_nonzero((lw >= 288) & (lw < 296)) == c.ks[1]


def test_layerwise_topk_bad_input():
    with pytest.raises(UserError, match=r"--k-per-tensor 16 is larger than tensor 'conv.bias' \(8 entries\)"):
        layerwise_topk("16", 1, TENSORS, 954)
    with pytest.raises(UserError, match="needs an objective that reports its parameter tensors"):
        layerwise_topk("0.1", 1, [], 954)
    for bad in ("0", "1.5", "-3", "abc", "0.0"):
        with pytest.raises(UserError, match="a count >= 1 or a fraction in"):
            layerwise_topk(bad, 1, TENSORS, 954)
    assert LayerwiseTopK((3, 2), (3, 2)).alpha(5) == 1.0  # every entry kept: the identity
