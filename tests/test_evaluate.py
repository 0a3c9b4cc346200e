"""Bundle evaluation on real tiny shards: files written, numbers recomputable with scikit-learn,
and the probabilities exactly those of the serving Predictor."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import make_test_bundle
from sklearn import metrics as skm

from imgpipe.bundle import BundleError, load_bundle_meta
from imgpipe.config.specs import parse_prior
from imgpipe.constants import (
    ACCURACY,
    BALANCED_ACCURACY,
    MACRO_F1,
    MACRO_ROC_AUC,
    MANY_SHOT_ACCURACY,
    NLL,
    PER_CLASS_RECALL,
    PER_CLASS_ROC_AUC,
    TEST,
    VAL,
    WEIGHTED_F1,
)
from imgpipe.data.datasets import encode_png, make_record
from imgpipe.data.shards import write_shards
from imgpipe.evaluate import (
    BEFORE_TEMPERATURE,
    CONFUSION_MATRIX,
    CONFUSION_MATRIX_NORMALIZED,
    LOGITS,
    METRICS_FILE,
    PREDICTION,
    PREDICTIONS_FILE,
    PROBABILITIES,
    SPLIT_PRIOR_CALIBRATION,
    calibrate_bundle,
    evaluate_bundle,
    run_evaluation,
)
from imgpipe.inference import adjusted_probabilities
from imgpipe.metrics import (
    top_k_key,
)

# Per split, per class: the test split leaves class 3 out on purpose (a class absent from it).
SPLIT_COUNTS = {"train": [6, 4, 3, 2], "val": [8, 8, 8, 8], "test": [10, 10, 10, 0]}


def write_tiny_shards(root: Path, split_counts: dict[str, list[int]] = SPLIT_COUNTS,
                      size: int = 16, seed: int = 0, names: list[str] | None = None) -> str:
    """Grey images whose brightness and texture depend on the class, written as shards."""
    rng = np.random.default_rng(seed)
    names = names or [f"class_{i}" for i in range(len(next(iter(split_counts.values()))))]
    records: dict[str, list[dict]] = {}
    for split, counts in split_counts.items():
        records[split] = []
        for label, n in enumerate(counts):
            for i in range(n):
                base = 40 + 50 * label
                pixels = np.clip(rng.normal(base, 30, (size, size)), 0, 255).astype(np.uint8)
                records[split].append(
                    make_record(encode_png(pixels), label, names, f"{split}-{label}-{i}"))
    write_shards(str(root), records, names, {"source": "tiny-test", "seed": seed})
    return str(root)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("tiny")
    data = write_tiny_shards(root / "data")
    bundle = make_test_bundle(root / "bundles", num_classes=4, train_class_counts=[600, 60, 25, 3],
                              seed=3)
    return bundle, data


def _read_predictions(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    table = pq.read_table(out / PREDICTIONS_FILE)
    y = table["label"].to_numpy()
    pred = table[PREDICTION].to_numpy()
    probs = np.stack(table[PROBABILITIES].to_pylist())
    logits = np.stack(table[LOGITS].to_pylist())
    return y, pred, probs, logits


def test_metrics_recompute_from_parquet_with_sklearn(tiny, tmp_path):
    bundle, data = tiny
    payload = evaluate_bundle(bundle, data, TEST, tmp_path)
    on_disk = json.loads((tmp_path / METRICS_FILE).read_text())
    assert on_disk == json.loads(json.dumps(payload))
    m = on_disk["metrics"]
    y, pred, probs, logits = _read_predictions(tmp_path)
    assert len(y) == on_disk["num_rows"] == 30
    labels = list(range(4))
    assert m[ACCURACY] == pytest.approx(skm.accuracy_score(y, pred))
    with warnings.catch_warnings():  # sklearn warns when a predicted class is never true
        warnings.simplefilter("ignore", UserWarning)
        assert m[BALANCED_ACCURACY] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m[MACRO_F1] == pytest.approx(
        skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0))
    assert m[WEIGHTED_F1] == pytest.approx(
        skm.f1_score(y, pred, labels=labels, average="weighted", zero_division=0))
    assert m[PER_CLASS_RECALL] == pytest.approx(
        skm.recall_score(y, pred, labels=labels, average=None, zero_division=0))
    assert m[CONFUSION_MATRIX] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    cm_norm = np.nan_to_num(skm.confusion_matrix(y, pred, labels=labels, normalize="true"))
    np.testing.assert_allclose(m[CONFUSION_MATRIX_NORMALIZED], cm_norm)
    assert m[NLL] == pytest.approx(skm.log_loss(y, probs, labels=labels))
    assert m[top_k_key(3)] == pytest.approx(skm.top_k_accuracy_score(y, probs, k=3,
                                                                     labels=labels))
    for c in range(3):
        assert m[PER_CLASS_ROC_AUC][c] == pytest.approx(skm.roc_auc_score(y == c, probs[:, c]))
    assert m[PER_CLASS_ROC_AUC][3] is None  # absent from the test split
    assert m[MACRO_ROC_AUC] == pytest.approx(np.mean(m[PER_CLASS_ROC_AUC][:3]))
    assert m[MANY_SHOT_ACCURACY] == pytest.approx(m[PER_CLASS_RECALL][0])  # 600 > 100
    # The stored probabilities are the Predictor's on the stored raw logits.
    meta = load_bundle_meta(bundle)
    np.testing.assert_allclose(probs, adjusted_probabilities(logits, meta), rtol=1e-6)
    assert np.array_equal(pred, probs.argmax(1))


def test_prior_override_changes_probabilities_like_the_predictor(tiny, tmp_path):
    bundle, data = tiny
    as_model = run_evaluation(bundle, data, TEST)
    balanced = run_evaluation(bundle, data, TEST, prior="balanced")
    assert balanced.meta.deployment_prior == "balanced"
    assert not np.allclose(as_model.probs, balanced.probs)
    np.testing.assert_allclose(balanced.probs,
                               adjusted_probabilities(balanced.preds.logits, balanced.meta))
    payload = evaluate_bundle(bundle, data, TEST, tmp_path, prior="0.1,0.2,0.3,0.4")
    assert payload["deployment_prior"] == [0.1, 0.2, 0.3, 0.4]
    with pytest.raises(ValueError, match="record"):
        evaluate_bundle(bundle, data, TEST, tmp_path, prior="balanced", record=True)
    with pytest.raises(BundleError):
        evaluate_bundle(bundle, data, TEST, tmp_path, prior="0.5,0.5")  # 2 values, 4 classes


def test_parse_prior():
    assert parse_prior(None) is None
    assert parse_prior("balanced") == "balanced"
    assert parse_prior("1, 3") == [1.0, 3.0]
    with pytest.raises(ValueError, match="prior"):
        parse_prior("uniform")


def test_calibrate_bundle_lowers_val_nll_and_keeps_accuracy(tiny, tmp_path):
    _, data = tiny
    bundle = make_test_bundle(tmp_path, num_classes=4, train_class_counts=[600, 60, 25, 3],
                              seed=3)
    before = run_evaluation(bundle, data, VAL)
    result = calibrate_bundle(bundle, data)
    meta = load_bundle_meta(bundle)
    assert meta.temperature == result["temperature"] != 1.0
    assert meta.decision_threshold is None  # 4 classes
    assert result["nll_after"] < result["nll_before"]
    after = run_evaluation(bundle, data, VAL)
    assert after.metrics[SPLIT_PRIOR_CALIBRATION]["nll_after"] == pytest.approx(result["nll_after"])
    assert after.metrics[ACCURACY] == before.metrics[ACCURACY]
    assert np.array_equal(after.y_pred, before.y_pred)
    assert after.metrics[BEFORE_TEMPERATURE][NLL] == pytest.approx(before.metrics[NLL])
    assert calibrate_bundle(bundle, data)["temperature"] == result["temperature"]  # idempotent


def test_binary_threshold_is_stored_and_applied(tmp_path):
    data = write_tiny_shards(tmp_path / "data", {"train": [20, 4], "val": [12, 6],
                                                 "test": [15, 5]})
    bundle = make_test_bundle(tmp_path / "b", num_classes=2, train_class_counts=[20, 4], seed=1)
    result = calibrate_bundle(bundle, data, threshold_mode="recall", target_recall=1.0)
    t = load_bundle_meta(bundle).decision_threshold
    assert t == result["decision_threshold"] and 0 < t < 1
    val = run_evaluation(bundle, data, VAL)
    assert skm.recall_score(val.preds.labels, val.y_pred) == 1.0
    test = run_evaluation(bundle, data, TEST)
    assert np.array_equal(test.y_pred, (test.probs[:, 1] >= t).astype(int))
    cm = skm.confusion_matrix(test.preds.labels, test.y_pred, labels=[0, 1])
    assert test.metrics[CONFUSION_MATRIX] == cm.tolist()
    assert test.metrics[ACCURACY] == pytest.approx(
        skm.accuracy_score(test.preds.labels, test.y_pred))
