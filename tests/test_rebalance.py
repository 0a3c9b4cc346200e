"""Class-weight schemes and resampling plans (pure numpy; the Ray stream is tested elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest

from imgpipe.config.specs import parse_class_weights, parse_sampler
from imgpipe.data.rebalance import (
    class_weights,
    effective_prior,
    id_hashes,
    repeat_counts,
    row_uniforms,
    sampling_rates,
)

COUNTS = np.array([500, 150, 45, 13, 4])


@pytest.mark.parametrize("spec", ["none", "power:0", "power:0.5", "power:1", "effective:0.9",
                                  "effective:0.999", "1,2,3,4,5"])
def test_weights_have_mean_one_and_favour_tail(spec):
    w = class_weights(COUNTS, spec)
    assert w.shape == (5,)
    assert w.mean() == pytest.approx(1.0)
    assert np.all(np.diff(w) >= -1e-12)  # never favours the head over the tail


def test_power_weights_by_hand():
    w = class_weights([100, 25], "power:0.5")
    raw = np.array([100 ** -0.5, 25 ** -0.5])  # 0.1, 0.2
    np.testing.assert_allclose(w, raw * 2 / raw.sum())


def test_effective_number_by_hand():
    beta = 0.99
    w = class_weights([100, 10], f"effective:{beta}")
    raw = np.array([(1 - beta) / (1 - beta**100), (1 - beta) / (1 - beta**10)])
    np.testing.assert_allclose(w, raw * 2 / raw.sum())


@pytest.mark.parametrize("bad", ["power", "power:x", "power:1.5", "effective:1", "1,-2", "0,0",
                                 "abc"])
def test_bad_weight_specs_name_the_field(bad):
    with pytest.raises(ValueError, match="class_weights"):
        parse_class_weights(bad)


def test_explicit_vector_length_checked():
    with pytest.raises(ValueError, match="3 values.*5 classes"):
        class_weights(COUNTS, "1,2,3")


def test_sampling_rates_reach_their_targets():
    n = COUNTS.astype(float)
    np.testing.assert_allclose(n * sampling_rates(n, "oversample"), n.max())
    np.testing.assert_allclose(n * sampling_rates(n, "undersample"), n.min())
    sq = n * sampling_rates(n, "sqrt")
    np.testing.assert_allclose(sq / sq.sum(), np.sqrt(n) / np.sqrt(n).sum())
    assert sq.sum() == pytest.approx(n.sum())
    target = np.array([0.1, 0.2, 0.3, 0.2, 0.2])
    ex = n * sampling_rates(n, ",".join(map(str, target)))
    np.testing.assert_allclose(ex / ex.sum(), target)
    np.testing.assert_allclose(sampling_rates(n, "none"), 1.0)


def test_bad_sampler_is_refused():
    with pytest.raises(ValueError, match="sampler: unknown strategy"):
        parse_sampler("balanced")
    # a negative entry is a bad vector, not an unknown strategy name
    with pytest.raises(ValueError, match=r"values must be finite, >= 0"):
        parse_sampler("-1,1,1")
    with pytest.raises(ValueError, match="no training rows"):
        sampling_rates([10, 0], "0.5,0.5")


def test_repeat_counts_match_plan_statistically():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=20_000)
    counts = np.bincount(labels, minlength=5)
    rates = np.array([0.3, 1.0, 2.5, 7.2, 0.05])
    hashes = id_hashes([f"row-{i}" for i in range(len(labels))])
    copies = repeat_counts(labels, hashes, rates, seed=1, epoch=0)
    got = np.bincount(labels, weights=copies, minlength=5)
    expected = counts * rates
    # floor(r)+Bernoulli(frac r): variance n·f(1-f) ≤ n/4 → 5 sigma bounds.
    sigma = np.sqrt(counts * (rates % 1) * (1 - rates % 1)) + 1e-9
    assert np.all(np.abs(got - expected) <= 5 * sigma + 1)
    # integer part is exact: every row of a class with r=2.5 appears 2 or 3 times
    assert set(np.unique(copies[labels == 2])) <= {2, 3}


def test_draws_depend_only_on_seed_epoch_and_id():
    hashes = id_hashes([f"x{i}" for i in range(1000)])
    a = row_uniforms(hashes, seed=3, epoch=4)
    np.testing.assert_array_equal(a, row_uniforms(hashes, seed=3, epoch=4))
    # order/batching independence: a permuted batch gives the permuted draws
    perm = np.random.default_rng(1).permutation(1000)
    np.testing.assert_array_equal(row_uniforms(hashes[perm], 3, 4), a[perm])
    assert np.mean(a != row_uniforms(hashes, seed=3, epoch=5)) > 0.99
    assert np.mean(a != row_uniforms(hashes, seed=4, epoch=4)) > 0.99
    assert 0.45 < a.mean() < 0.55


def test_effective_prior():
    n = np.array([90, 10])
    np.testing.assert_allclose(effective_prior(n), [0.9, 0.1])
    np.testing.assert_allclose(effective_prior(n, rates=sampling_rates(n, "oversample")),
                               [0.5, 0.5])
    np.testing.assert_allclose(effective_prior(n, tau=1.0), [0.5, 0.5])
