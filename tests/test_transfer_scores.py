"""Transferability scores against hand computations and against a second formulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import softmax
from scipy.stats import entropy, multivariate_normal
from sklearn.metrics import mutual_info_score

from imgpipe.transfer.hscore import between_class_covariance, hscore
from imgpipe.transfer.leep import leep, leep_from_probs
from imgpipe.transfer.logme import (
    _spectrum,
    class_balance_weights,
    log_evidence,
    logme,
    maximize_evidence,
)
from imgpipe.transfer.nce import nce, nce_from_labels
from imgpipe.transfer.probe import knn_accuracy, knn_predict, linear_probe_accuracy
from imgpipe.transfer.scores import compute_scores, score_names


def _toy(n=40, d=5, classes=3, seed=0, sep=2.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, d)) * sep
    return centres[y] + rng.normal(size=(n, d)), y


# ------------------------------------------------------------------ LogME


def _direct_log_marginal(f, y, alpha, beta, w=None):
    """y ~ N(0, FFᵀ/α + diag(1/(β w))): the evidence written as one Gaussian density."""
    w = np.ones(len(y)) if w is None else w
    cov = f @ f.T / alpha + np.diag(1.0 / (beta * w))
    return multivariate_normal(mean=np.zeros(len(y)), cov=cov).logpdf(y)


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.3, 4.0), (7.0, 0.2)])
def test_log_evidence_matches_direct_marginal_likelihood(alpha, beta):
    f, labels = _toy(n=12, d=4)
    y = (labels == 1).astype(float)
    assert log_evidence(f, y, alpha, beta) == pytest.approx(
        _direct_log_marginal(f, y, alpha, beta), rel=1e-9, abs=1e-9)
    w = class_balance_weights(labels)
    assert log_evidence(f, y, alpha, beta, sample_weight=w) == pytest.approx(
        _direct_log_marginal(f, y, alpha, beta, w), rel=1e-9, abs=1e-9)


def test_log_evidence_hand_computation_one_dimension():
    # N=2, D=1, F=[[1],[2]], y=[1, 0], α=β=1: cov = FFᵀ + I = [[2,2],[2,5]], det 6,
    # cov⁻¹ = [[5,-2],[-2,2]]/6 so yᵀcov⁻¹y = 5/6.
    f = np.array([[1.0], [2.0]])
    y = np.array([1.0, 0.0])
    hand = -math.log(2 * math.pi) - 0.5 * math.log(6.0) - 0.5 * 5 / 6
    assert log_evidence(f, y, 1.0, 1.0) == pytest.approx(hand, rel=1e-12)


def test_fixed_point_maximises_the_direct_marginal_likelihood():
    f, labels = _toy(n=30, d=6, seed=3)
    y = (labels == 0).astype(float)
    alpha, beta, ev = maximize_evidence(_spectrum(f), y)

    def neg(log_ab):
        return -_direct_log_marginal(f, y, *np.exp(log_ab))

    best = minimize(neg, x0=np.zeros(2), method="Nelder-Mead",
                    options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 4000})
    assert ev == pytest.approx(-best.fun, abs=1e-5)
    assert np.log([alpha, beta]) == pytest.approx(best.x, abs=1e-2)


def test_logme_is_mean_over_classes_of_evidence_per_row_and_balanced_weights():
    f, y = _toy(n=30, d=4, seed=1)
    sp = _spectrum(f)
    per_class = [maximize_evidence(sp, (y == c).astype(float))[2] for c in range(3)]
    assert logme(f, y) == pytest.approx(np.mean(per_class) / len(y))
    w = class_balance_weights(y)
    assert w.mean() == pytest.approx(1.0)
    assert [w[y == c].sum() for c in range(3)] == pytest.approx([10, 10, 10])


def test_logme_prefers_informative_features():
    f, y = _toy(n=60, d=4, seed=2, sep=3.0)
    noise = np.random.default_rng(9).normal(size=f.shape)
    assert logme(f, y) > logme(noise, y)
    assert logme(f, y, balanced=True) > logme(noise, y, balanced=True)


def test_balanced_logme_ranks_a_tail_separating_backbone_higher():
    """Head-only features separate the head perfectly but not the tail; balanced LogME sees it."""
    rng = np.random.default_rng(0)
    y = np.array([0] * 80 + [1] * 80 + [2] * 4 + [3] * 4)
    head_only = rng.normal(size=(len(y), 3)) * 0.3
    head_only[y == 0, 0] += 3  # head classes far apart, tail classes mixed together
    head_only[y == 1, 1] += 3
    both = rng.normal(size=(len(y), 3)) * 0.3
    both[:, 0] += np.where(y == 0, 3, 0)
    both[:, 1] += np.where(y == 1, 3, 0) + np.where(y == 2, 1.0, 0)
    both[:, 2] += np.where(y == 3, 1.0, 0)
    head_only[:, 0] *= 1.5  # crisper on the head
    assert logme(head_only, y, balanced=True) - logme(both, y, balanced=True) < (
        logme(head_only, y) - logme(both, y))


def test_logme_rejects_bad_input():
    with pytest.raises(ValueError, match="2 classes"):
        logme(np.ones((4, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="labels"):
        logme(np.ones((4, 2)), np.zeros(3))


# ------------------------------------------------------------------ LEEP / NCE

THETA = np.array([[0.7, 0.2, 0.1],
                  [0.1, 0.8, 0.1],
                  [0.2, 0.2, 0.6],
                  [0.6, 0.3, 0.1],
                  [0.3, 0.3, 0.4]])
Y3 = np.array([0, 1, 2, 0, 1])


def _leep_by_definition(theta, y, w):
    n, k = theta.shape
    classes = sorted(set(y))
    joint = {(c, z): sum(w[i] * theta[i, z] for i in range(n) if y[i] == c) / sum(w)
             for c in classes for z in range(k)}
    pz = {z: sum(joint[(c, z)] for c in classes) for z in range(k)}
    total = 0.0
    for i in range(n):
        total += w[i] * math.log(sum(joint[(y[i], z)] / pz[z] * theta[i, z] for z in range(k)))
    return total / sum(w)


def test_leep_matches_its_definition_on_a_three_class_toy():
    assert leep_from_probs(THETA, Y3) == pytest.approx(_leep_by_definition(THETA, Y3,
                                                                            np.ones(5)))
    w = np.array([1 / 2, 1 / 2, 1, 1 / 2, 1 / 2])  # 1/n_y
    assert leep_from_probs(THETA, Y3, balanced=True) == pytest.approx(
        _leep_by_definition(THETA, Y3, w))
    logits = np.log(THETA) + 3.0  # softmax is shift-invariant
    assert leep(logits, Y3) == pytest.approx(leep_from_probs(THETA, Y3))


def test_leep_with_one_hot_source_equals_nce():
    z = np.array([0, 1, 2, 0, 2, 1, 1])
    y = np.array([0, 1, 1, 0, 2, 1, 0])
    onehot = np.eye(3)[z]
    assert leep_from_probs(onehot, y) == pytest.approx(nce_from_labels(z, y))
    assert leep_from_probs(onehot, y, True) == pytest.approx(nce_from_labels(z, y, True))


def test_nce_hand_computation_and_mutual_information_form():
    # z=0 → y∈{0,0,1}; z=1 → y∈{1}: H(Y|Z) = 3/4 · H(2/3, 1/3).
    z = np.array([0, 0, 0, 1])
    y = np.array([0, 0, 1, 1])
    hand = -0.75 * -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert nce_from_labels(z, y) == pytest.approx(hand)
    rng = np.random.default_rng(0)
    z, y = rng.integers(0, 5, 200), rng.integers(0, 4, 200)
    # −H(Y|Z) = I(Y; Z) − H(Y)
    second = mutual_info_score(y, z) - entropy(np.bincount(y))
    assert nce_from_labels(z, y) == pytest.approx(second)
    logits = rng.normal(size=(200, 5))
    assert nce(logits, y) == pytest.approx(nce_from_labels(logits.argmax(1), y))


def test_leep_rejects_non_distributions():
    with pytest.raises(ValueError, match="distributions"):
        leep_from_probs(np.ones((5, 3)), Y3)


# ------------------------------------------------------------------ H-score


def test_hscore_hand_computation_one_dimension():
    # f = 0,2,4,6 with labels 0,0,1,1: var(f) = 5, class means 1, 5 → var = 4: H = 4/5.
    f = np.array([[0.0], [2.0], [4.0], [6.0]])
    y = np.array([0, 0, 1, 1])
    assert hscore(f, y, shrinkage=0.0) == pytest.approx(0.8)
    # Shrinkage toward μI is the identity in one dimension; only the (1 − α) factor remains.
    assert hscore(f, y, shrinkage=0.25) == pytest.approx(0.6)


def test_hscore_equals_the_mahalanobis_between_class_form():
    f, y = _toy(n=50, d=4, seed=5)
    fc = f - f.mean(0)
    cov = fc.T @ fc / len(f)
    inv = np.linalg.inv(cov)
    counts = np.bincount(y)
    second = sum(counts[c] / len(y) * (fc[y == c].mean(0) @ inv @ fc[y == c].mean(0))
                 for c in range(3))
    assert hscore(f, y, shrinkage=0.0) == pytest.approx(second)
    bal = np.mean([fc[y == c].mean(0) - np.mean([fc[y == k].mean(0) for k in range(3)], 0)
                   for c in range(3)], axis=0)
    assert np.allclose(bal, 0)
    assert np.trace(between_class_covariance(f, y, balanced=True)) > 0


def test_hscore_ledoit_wolf_matches_sklearn_shrinkage():
    from sklearn.covariance import LedoitWolf

    f, y = _toy(n=20, d=10, seed=6)
    alpha = LedoitWolf().fit(f).shrinkage_
    assert hscore(f, y) == pytest.approx(hscore(f, y, shrinkage=alpha))


# ------------------------------------------------------------------ probes


def test_knn_balanced_vote_hand_case():
    # Query at the origin; its 3 neighbours: two head rows (class 0, n=10) and one tail row
    # (class 1, n=1). Plain vote: class 0. Balanced: 2/10 < 1/1 → class 1.
    train = np.array([[1.0, 0.1], [1.0, 0.12], [1.0, 0.11]] + [[-1.0, 0.0]] * 8)
    labels = np.array([0, 0, 1] + [0] * 8)
    query = np.array([[1.0, 0.11]])
    assert knn_predict(train, labels, query, k=3)[0] == 0
    assert knn_predict(train, labels, query, k=3, balanced=True)[0] == 1


def test_probes_score_separable_features_perfectly_and_noise_near_chance():
    f, y = _toy(n=200, d=6, seed=7, sep=6.0)
    assert knn_accuracy(f[:150], y[:150], f[150:], y[150:], k=5) == 1.0
    assert linear_probe_accuracy(f[:150], y[:150], f[150:], y[150:]) == 1.0
    noise = np.random.default_rng(1).normal(size=f.shape)
    assert linear_probe_accuracy(noise[:150], y[:150], noise[150:], y[150:]) < 0.6


def test_compute_scores_names_and_missing_source_head():
    from imgpipe.transfer.features import Features

    f, y = _toy(n=60, d=4, seed=8)
    tr = Features(f[:40].astype(np.float32), y[:40], [str(i) for i in range(40)], None)
    va = Features(f[40:].astype(np.float32), y[40:], [str(i) for i in range(20)], None)
    scores, seconds = compute_scores(tr, va)
    assert list(scores) == score_names() and set(seconds) == set(scores)
    assert scores["leep"] is None and scores["nce_balanced"] is None
    assert all(isinstance(scores[n], float) for n in ("logme", "hscore_balanced", "knn"))
    tr.source_logits = np.log(softmax(np.random.default_rng(0).normal(size=(40, 3)), 1))
    assert compute_scores(tr, va, ["leep"])[0]["leep"] < 0
    with pytest.raises(ValueError, match="unknown score"):
        compute_scores(tr, va, ["logmee"])
