"""A bundle scored exactly as serving scores it: the ``Predictor`` (temperature, prior
correction, binary threshold) on one split; metrics, ``metrics.json`` and
``predictions.parquet``; the evaluate job's config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgpipe.bundle import BundleMeta, DeploymentPrior, update_bundle_meta
from imgpipe.calibrate import nll_at_temperature
from imgpipe.config.specs import parse_prior
from imgpipe.console import write_json
from imgpipe.constants import BRIER, ECE, ID, LABEL, LABEL_NAME, NLL, RELIABILITY, SHOT_CLASSES, TEST, VAL
from imgpipe.data.manifest import load_manifest
from imgpipe.errors import DataSourceError
from imgpipe.evaluate.predictions import SplitPredictions, predict_split
from imgpipe.inference import Predictor, adjusted_probabilities, prior_shift
from imgpipe.metrics import (
    brier_score,
    calibration,
    classification_metrics,
    confusion_extras,
    confusion_matrix,
    negative_log_likelihood,
    probabilistic_metrics,
    shot_accuracy,
)

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.parquet"
# Result keys local to evaluation (metric names proper live in constants.py / metrics.py).
CONFUSION_MATRIX = "confusion_matrix"
CONFUSION_MATRIX_NORMALIZED = "confusion_matrix_normalized"
BEFORE_TEMPERATURE = "before_temperature"
# Calibration with the prior corrected to the split's own class mix (on val: T's objective).
SPLIT_PRIOR_CALIBRATION = "calibration_at_split_prior"
PREDICTION = "prediction"
PROBABILITIES = "probabilities"
LOGITS = "logits"
TOP_K = (1, 3, 5)
# Too big for bundle.json; they stay in metrics.json.
_NOT_IN_BUNDLE = (CONFUSION_MATRIX, CONFUSION_MATRIX_NORMALIZED, RELIABILITY, SHOT_CLASSES)


class ShotThresholds(NamedTuple):
    """Many-shot: training count > many; few-shot: < few; medium: the rest (Liu et al. 2019)."""

    many: int = 100
    few: int = 20


@dataclass
class BundleEvaluation:
    """One split scored exactly as serving would score it."""

    meta: BundleMeta  # as evaluated: the deployment prior actually applied
    split: str
    preds: SplitPredictions
    probs: np.ndarray  # (N, C) float64: temperature, prior correction, softmax (the Predictor)
    probs_t1: np.ndarray  # (N, C) the same with temperature 1: "before temperature scaling"
    y_pred: np.ndarray  # (N,) the Predictor's labels (argmax, or the binary threshold)
    metrics: dict[str, Any]


def load_predictor(bundle_dir: str | Path, prior: DeploymentPrior | None = None) -> Predictor:
    """The serving Predictor of a bundle, with its deployment prior optionally overridden."""
    predictor = Predictor.load(bundle_dir)
    if prior is not None:
        predictor.set_adjustment(deployment_prior=prior)
    return predictor


def _with_temperature(meta: BundleMeta, temperature: float) -> BundleMeta:
    return meta.model_copy(update={"temperature": float(temperature)})


def _confusion_blocks(labels: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, Any]:
    cm = confusion_matrix(labels, y_pred, num_classes)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    return {CONFUSION_MATRIX: cm.tolist(), CONFUSION_MATRIX_NORMALIZED: norm.tolist()}


def compute_metrics(labels: np.ndarray, probs: np.ndarray, y_pred: np.ndarray,
                    train_counts: list[int], shots: ShotThresholds = ShotThresholds()
                    ) -> dict[str, Any]:
    """Every report metric of one split, plus the confusion matrix (counts and row-normalised).

    Count-based metrics use ``y_pred`` (which differs from the argmax when a binary decision
    threshold is set); ranking, top-k, NLL, Brier and ECE use ``probs``.
    """
    c = probs.shape[1]
    top_k = tuple(k for k in TOP_K if k == 1 or k < c)
    out = probabilistic_metrics(labels, probs, train_counts, top_k=top_k,
                                many_shot=shots.many, few_shot=shots.few)
    if not np.array_equal(y_pred, probs.argmax(axis=1)):
        cm = confusion_matrix(labels, y_pred, c)
        out.update(classification_metrics(cm))
        out.update(confusion_extras(cm))
        out.update(shot_accuracy(cm, train_counts, shots.many, shots.few))
    out.update(_confusion_blocks(labels, y_pred, c))
    return out


def _calibration_summary(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    return {NLL: negative_log_likelihood(labels, probs), BRIER: brier_score(labels, probs),
            **calibration(labels, probs)}


def run_evaluation(bundle_dir: str | Path, data_root: str, split: str,
                   prior: DeploymentPrior | None = None,
                   shots: ShotThresholds = ShotThresholds()) -> BundleEvaluation:
    """Score ``split`` with the bundle's Predictor (temperature, prior, threshold as served).

    Raises:
        BundleError: unreadable bundle or an invalid prior; ManifestError: unknown split;
        ValueError: the split holds no decodable image or does not match the bundle's classes.
    """
    predictor = load_predictor(bundle_dir, prior)
    meta = predictor.meta
    manifest_names = load_manifest(data_root).class_names
    if manifest_names != meta.class_names:
        raise DataSourceError(f"{data_root}: class names {manifest_names} differ from the bundle's "
                         f"{meta.class_names}")
    preds = predict_split(predictor.model, meta.preprocess, data_root, split)
    if preds.labels.size == 0:
        raise DataSourceError(f"{data_root}: split {split!r} has no decodable image to evaluate")
    probs = predictor.probabilities(preds.logits)
    probs_t1 = adjusted_probabilities(preds.logits, _with_temperature(meta, 1.0))
    y_pred = predictor.predict_labels(probs)
    metrics = compute_metrics(preds.labels, probs, y_pred, meta.train_class_counts, shots)
    metrics[BEFORE_TEMPERATURE] = _calibration_summary(preds.labels, probs_t1)
    metrics[SPLIT_PRIOR_CALIBRATION] = calibration_at_split_prior(preds.logits, preds.labels, meta)
    return BundleEvaluation(meta, split, preds, probs, probs_t1, y_pred, metrics)


def _predictions_table(ev: BundleEvaluation) -> pa.Table:
    """One row per image: id, label, prediction, probabilities (as scored) and raw logits."""
    n, c = ev.probs.shape
    names = ev.meta.class_names
    schema_meta = {"imgpipe": json.dumps({
        "class_names": names, "split": ev.split, "temperature": ev.meta.temperature,
        "deployment_prior": ev.meta.deployment_prior,
        "decision_threshold": ev.meta.decision_threshold,
    })}
    table = pa.table({
        ID: pa.array(ev.preds.ids, pa.string()),
        LABEL: pa.array(ev.preds.labels, pa.int64()),
        LABEL_NAME: pa.array([names[i] for i in ev.preds.labels], pa.string()),
        PREDICTION: pa.array(ev.y_pred, pa.int64()),
        PROBABILITIES: pa.FixedSizeListArray.from_arrays(pa.array(ev.probs.ravel()), c),
        LOGITS: pa.FixedSizeListArray.from_arrays(
            pa.array(ev.preds.logits.astype(np.float32).ravel()), c),
    })
    assert table.num_rows == n
    return table.replace_schema_metadata(schema_meta)


def evaluation_payload(ev: BundleEvaluation, bundle_dir: str | Path, data_root: str,
                       shots: ShotThresholds) -> dict[str, Any]:
    """The ``metrics.json`` document: what was evaluated, how, and every metric."""
    meta = ev.meta
    return {
        "bundle": str(bundle_dir), "name": meta.name, "version": meta.version,
        "data": str(data_root), "split": ev.split,
        "num_rows": int(ev.preds.labels.size), "skipped_corrupt": ev.preds.skipped,
        "class_names": meta.class_names, "train_class_counts": meta.train_class_counts,
        "temperature": meta.temperature, "deployment_prior": meta.deployment_prior,
        "model_prior": meta.model_prior, "decision_threshold": meta.decision_threshold,
        "shot_thresholds": shots._asdict(),
        "metrics": ev.metrics,
    }


def write_evaluation(ev: BundleEvaluation, payload: dict[str, Any], out_dir: str | Path
                     ) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``predictions.parquet`` into ``out_dir``; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(_predictions_table(ev), out / PREDICTIONS_FILE)
    return write_json(out / METRICS_FILE, payload), out / PREDICTIONS_FILE


def bundle_block(metrics: dict[str, Any]) -> dict[str, Any]:
    """The part of a split's metrics stored in ``bundle.json`` (no matrices or bin tables)."""
    return {k: bundle_block(v) if isinstance(v, dict) else v for k, v in metrics.items()
            if k not in _NOT_IN_BUNDLE and not k.startswith(RELIABILITY)}


def evaluate_bundle(bundle_dir: str | Path, data_root: str, split: str, out_dir: str | Path,
                    prior: DeploymentPrior | str | None = None,
                    shot_thresholds: ShotThresholds | tuple[int, int] = ShotThresholds(),
                    record: bool = False) -> dict[str, Any]:
    """Evaluate a bundle on one split; write ``metrics.json`` and ``predictions.parquet``.

    Args:
        prior: deployment prior for this evaluation (``model`` | ``balanced`` | ``train`` |
            vector | ``"p1,p2,..."``); None = the bundle's own, i.e. what serving applies.
        shot_thresholds: ``(many, few)`` training-count cut-offs for many/medium/few-shot.
        record: also store the metrics as the bundle's ``val``/``test`` block (only allowed
            with the bundle's own prior, so the bundle never records someone else's numbers).
    Returns:
        The ``metrics.json`` document (see ``evaluation_payload``).
    Raises:
        ValueError: ``record`` with a prior override or on a split other than val/test, and
            everything ``run_evaluation`` raises.
    """
    shots = ShotThresholds(*shot_thresholds)
    prior = parse_prior(prior)
    if record and (prior is not None or split not in (VAL, TEST)):
        raise ValueError("record=True needs the bundle's own prior (prior=None) and split "
                         f"val or test; got prior={prior!r}, split={split!r}")
    ev = run_evaluation(bundle_dir, data_root, split, prior, shots)
    payload = evaluation_payload(ev, bundle_dir, data_root, shots)
    write_evaluation(ev, payload, out_dir)
    if record:
        update_bundle_meta(bundle_dir, metrics={split: bundle_block(ev.metrics)})
    return payload


def split_class_mix(labels: np.ndarray, num_classes: int) -> list[float]:
    """The validation split's class frequencies; an absent class counts as half an example so
    that it stays possible (its log prior is finite)."""
    counts = np.maximum(np.bincount(labels, minlength=num_classes), 0.5)
    return (counts / counts.sum()).tolist()


def calibration_at_split_prior(logits: np.ndarray, labels: np.ndarray, meta: BundleMeta
                               ) -> dict[str, Any]:
    """NLL, ECE and reliability bins at T = 1 and at ``meta.temperature`` with the prior
    corrected to the split's own class mix: calibration alone, without prior mismatch.

    On val this is exactly the objective ``calibrate_bundle`` minimises. (As-served numbers
    use the deployment prior instead; on a split whose class mix differs from it they also
    measure that mismatch.)
    """
    c = meta.architecture.num_classes
    fit_prior = split_class_mix(labels, c)
    fit_meta = meta.model_copy(update={"deployment_prior": fit_prior})
    shift = prior_shift(fit_meta)
    before = calibration(labels, adjusted_probabilities(logits, _with_temperature(fit_meta, 1.0)))
    after = calibration(labels, adjusted_probabilities(logits, fit_meta))
    return {
        "temperature": meta.temperature, "num_rows": int(labels.size), "class_prior": fit_prior,
        "nll_before": nll_at_temperature(logits, labels, 1.0, shift),
        "nll_after": nll_at_temperature(logits, labels, meta.temperature, shift),
        "ece_before": before[ECE], "ece_after": after[ECE],
        "reliability_before": before[RELIABILITY], "reliability_after": after[RELIABILITY],
    }
