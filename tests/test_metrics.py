"""Metrics checked number by number against scikit-learn and imbalanced-learn."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from imblearn import metrics as imb
from sklearn import metrics as skm

from imgpipe.constants import (
    ACCURACY,
    BALANCED_ACCURACY,
    BRIER,
    ECE,
    FEW_SHOT_ACCURACY,
    GEOMETRIC_MEAN,
    INDEX_BALANCED_ACCURACY,
    MACRO_AVERAGE_PRECISION,
    MACRO_F1,
    MACRO_PRECISION,
    MACRO_RECALL,
    MACRO_ROC_AUC,
    MANY_SHOT_ACCURACY,
    MCC,
    MEDIUM_SHOT_ACCURACY,
    NLL,
    PER_CLASS_AVERAGE_PRECISION,
    PER_CLASS_F1,
    PER_CLASS_PRECISION,
    PER_CLASS_RECALL,
    PER_CLASS_ROC_AUC,
    PER_CLASS_SPECIFICITY,
    RELIABILITY,
    SHOT_CLASSES,
    SUPPORT,
    WEIGHTED_F1,
    WEIGHTED_PRECISION,
    WEIGHTED_RECALL,
)
from imgpipe.metrics import (
    classification_metrics,
    confusion_matrix,
    probabilistic_metrics,
    top_k_key,
)

APPROX = {"rel": 1e-9, "abs": 1e-12}


def _random_case(seed: int, n: int = 300, num_classes: int = 5):
    rng = np.random.default_rng(seed)
    prior = np.geomspace(1.0, 0.05, num_classes)
    y = rng.choice(num_classes, size=n, p=prior / prior.sum())
    logits = rng.normal(size=(n, num_classes)) + 1.5 * np.eye(num_classes)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


def _never_predicted(seed=0):
    y, probs = _random_case(seed)
    probs[:, 2] = 0.0  # class 2 can never be the argmax
    return y, probs / probs.sum(axis=1, keepdims=True)


def _absent_from_truth(seed=1):
    y, probs = _random_case(seed)
    keep = y != 3
    return y[keep], probs[keep]


def _two_classes(seed=2):
    return _random_case(seed, n=120, num_classes=2)


def _perfect(seed=3):
    y, _ = _random_case(seed, n=60, num_classes=4)
    probs = np.full((y.size, 4), 0.02)
    probs[np.arange(y.size), y] = 0.94
    return y, probs


def _tied_scores(seed=4):
    # Rows drawn from 4 fixed vectors: many equal scores per column, like a quantised model.
    rng = np.random.default_rng(seed)
    table = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.4, 0.4, 0.2]])
    y = rng.integers(0, 3, size=150)
    return y, table[rng.integers(0, 4, size=150)]


CASES = {
    "seed0": lambda: _random_case(0),
    "seed1": lambda: _random_case(1),
    "seed2": lambda: _random_case(2, n=80, num_classes=7),
    "seed3": lambda: _random_case(3, n=500, num_classes=10),
    "never_predicted": _never_predicted,
    "absent_from_truth": _absent_from_truth,
    "two_classes": _two_classes,
    "perfect": _perfect,
    "tied_scores": _tied_scores,
}


@pytest.fixture(params=list(CASES))
def case(request):
    y, probs = CASES[request.param]()
    return y, probs, probs.argmax(axis=1), list(range(probs.shape[1]))


def _sk(fn, *args, **kwargs):
    with warnings.catch_warnings():  # sklearn warns on the degenerate cases we test on purpose
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_confusion_matrix_matches_sklearn(case):
    y, probs, pred, labels = case
    cm = confusion_matrix(y, pred, len(labels))
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y, pred, labels=labels))


def test_summed_worker_matrices_equal_whole(case):
    y, _, pred, labels = case
    parts = [confusion_matrix(y[i::3], pred[i::3], len(labels)) for i in range(3)]
    np.testing.assert_array_equal(sum(parts), confusion_matrix(y, pred, len(labels)))


def test_classification_metrics_match_sklearn(case):
    y, _, pred, labels = case
    got = classification_metrics(confusion_matrix(y, pred, len(labels)))
    p, r, f, s = _sk(skm.precision_recall_fscore_support, y, pred, labels=labels,
                     zero_division=0)
    assert got[ACCURACY] == pytest.approx(skm.accuracy_score(y, pred), **APPROX)
    assert got[BALANCED_ACCURACY] == pytest.approx(
        _sk(skm.balanced_accuracy_score, y, pred), **APPROX)
    for key, fn in [(MACRO_F1, skm.f1_score), (MACRO_PRECISION, skm.precision_score),
                    (MACRO_RECALL, skm.recall_score)]:
        want = fn(y, pred, labels=labels, average="macro", zero_division=0)
        assert got[key] == pytest.approx(want, **APPROX), key
    np.testing.assert_allclose(got[PER_CLASS_PRECISION], p, rtol=1e-12)
    np.testing.assert_allclose(got[PER_CLASS_RECALL], r, rtol=1e-12)
    np.testing.assert_allclose(got[PER_CLASS_F1], f, rtol=1e-12)
    assert got[SUPPORT] == s.tolist()


def test_confusion_extras_match_sklearn_and_imblearn(case):
    y, probs, pred, labels = case
    got = probabilistic_metrics(y, probs)
    np.testing.assert_allclose(
        got[PER_CLASS_SPECIFICITY],
        _sk(imb.specificity_score, y, pred, labels=labels, average=None), rtol=1e-12)
    assert got[GEOMETRIC_MEAN] == pytest.approx(
        _sk(imb.geometric_mean_score, y, pred, labels=labels), **APPROX)
    iba = imb.make_index_balanced_accuracy(alpha=0.1, squared=True)(imb.geometric_mean_score)
    assert got[INDEX_BALANCED_ACCURACY] == pytest.approx(_sk(iba, y, pred, labels=labels),
                                                         **APPROX)
    assert got[MCC] == pytest.approx(skm.matthews_corrcoef(y, pred), **APPROX)
    for key, fn in [(WEIGHTED_F1, skm.f1_score), (WEIGHTED_PRECISION, skm.precision_score),
                    (WEIGHTED_RECALL, skm.recall_score)]:
        want = _sk(fn, y, pred, labels=labels, average="weighted", zero_division=0)
        assert got[key] == pytest.approx(want, **APPROX), key


def test_ranking_metrics_match_sklearn(case):
    y, probs, _, labels = case
    got = probabilistic_metrics(y, probs)
    defined_auc, defined_ap = [], []
    for c in labels:
        positive = y == c
        if not positive.any():  # absent from y_true: undefined, excluded from macro
            assert got[PER_CLASS_ROC_AUC][c] is None
            assert got[PER_CLASS_AVERAGE_PRECISION][c] is None
            continue
        auc = skm.roc_auc_score(positive, probs[:, c])
        ap = skm.average_precision_score(positive, probs[:, c])
        assert got[PER_CLASS_ROC_AUC][c] == pytest.approx(auc, **APPROX)
        assert got[PER_CLASS_AVERAGE_PRECISION][c] == pytest.approx(ap, **APPROX)
        defined_auc.append(auc)
        defined_ap.append(ap)
    assert got[MACRO_ROC_AUC] == pytest.approx(np.mean(defined_auc), **APPROX)
    assert got[MACRO_AVERAGE_PRECISION] == pytest.approx(np.mean(defined_ap), **APPROX)
    if len(defined_auc) == len(labels) > 2:
        want = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=labels)
        assert got[MACRO_ROC_AUC] == pytest.approx(want, **APPROX)


def test_probability_metrics_match_sklearn(case):
    y, probs, _, labels = case
    ks = [k for k in (1, 2, 3) if k < len(labels)]
    got = probabilistic_metrics(y, probs, top_k=ks)
    assert got[NLL] == pytest.approx(skm.log_loss(y, probs, labels=labels), **APPROX)
    assert got[BRIER] == pytest.approx(
        skm.brier_score_loss(y, probs, labels=labels, scale_by_half=False), **APPROX)
    for k in ks:
        if len(labels) > 2:  # sklearn's binary top-k reads one score column
            want = skm.top_k_accuracy_score(y, probs, k=k, labels=labels)
            assert got[top_k_key(k)] == pytest.approx(want, **APPROX)


def test_results_are_strict_json(case):
    y, probs, _, labels = case
    got = probabilistic_metrics(y, probs, train_counts=np.arange(len(labels)) * 40)
    json.dumps(got, allow_nan=False)


def test_absent_class_conventions():
    y, probs = _absent_from_truth()
    got = probabilistic_metrics(y, probs)
    assert got[SUPPORT][3] == 0
    # G-mean counts the absent class as recall 0 (imblearn with labels=range(C)).
    assert got[GEOMETRIC_MEAN] == 0.0
    # Balanced accuracy averages over present classes only (sklearn).
    recalls = [r for c, r in enumerate(got[PER_CLASS_RECALL]) if c != 3]
    assert got[BALANCED_ACCURACY] == pytest.approx(np.mean(recalls))


def test_perfect_predictions():
    y, probs = _perfect()
    got = probabilistic_metrics(y, probs)
    for key in (ACCURACY, BALANCED_ACCURACY, MACRO_F1, GEOMETRIC_MEAN, MCC, MACRO_ROC_AUC,
                MACRO_AVERAGE_PRECISION):
        assert got[key] == pytest.approx(1.0), key


def test_ece_by_hand():
    y = np.array([0, 1, 1, 0, 1])
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6]])
    got = probabilistic_metrics(y, probs, n_bins=5)
    # Confidences 0.95, 0.9 → bin (0.8,1]: acc 1/2, conf 0.925. 0.7, 0.6, 0.6 → bin (0.4,0.6]
    # holds 0.6, 0.6 (acc 2/2, conf 0.6) and bin (0.6,0.8] holds 0.7 (acc 1, conf 0.7).
    want = (2 / 5) * abs(0.5 - 0.925) + (2 / 5) * abs(1.0 - 0.6) + (1 / 5) * abs(1.0 - 0.7)
    assert got[ECE] == pytest.approx(want)
    rel = got[RELIABILITY]
    assert rel["count"] == [0, 0, 2, 1, 2]
    assert rel["accuracy"][:2] == [None, None]
    assert rel["confidence"][4] == pytest.approx(0.925)
    assert len(rel["bin_edges"]) == 6


def test_ece_default_bins_and_perfect_calibration():
    got = probabilistic_metrics(*_random_case(0))
    assert len(got[RELIABILITY]["count"]) == 15
    assert sum(got[RELIABILITY]["count"]) == 300
    y = np.array([0, 0, 0, 1])  # confidence 0.75 everywhere, 3 of 4 right
    probs = np.tile([0.75, 0.25], (4, 1))
    assert probabilistic_metrics(y, probs)[ECE] == pytest.approx(0.0, abs=1e-12)


def test_shot_accuracy_groups():
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    pred = np.array([0, 0, 1, 0, 0, 0, 3, 3])
    probs = np.eye(4)[pred] * 0.96 + 0.01
    got = probabilistic_metrics(y, probs, train_counts=[500, 100, 20, 19])
    assert got[SHOT_CLASSES] == {"many": [0], "medium": [1, 2], "few": [3]}
    assert got[MANY_SHOT_ACCURACY] == 1.0
    assert got[MEDIUM_SHOT_ACCURACY] == pytest.approx((0.5 + 0.0) / 2)
    assert got[FEW_SHOT_ACCURACY] == 1.0
    custom = probabilistic_metrics(y, probs, train_counts=[500, 100, 20, 19], many_shot=10,
                                   few_shot=5)
    assert custom[MEDIUM_SHOT_ACCURACY] is None and custom[FEW_SHOT_ACCURACY] is None
    assert MANY_SHOT_ACCURACY not in probabilistic_metrics(y, probs)


def test_input_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="empty"):
        classification_metrics(np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="sum to 1"):
        probabilistic_metrics([0, 1], np.array([[2.0, -1.0], [0.3, 0.3]]).clip(0, 1))
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix([0.0, 1.0], [0, 1], 2)


def test_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    y, pred = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0])
    np.testing.assert_array_equal(confusion_matrix(y, pred, 2), [[1, 0], [1, 1]])
