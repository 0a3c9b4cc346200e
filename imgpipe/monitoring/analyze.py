"""One monitor pass over a log window: label shift, drift, performance estimate, alarm.

``analyze`` returns the ``monitor.json`` payload (plain JSON types). The alarm is a Bonferroni
combination of the two tests (prior unchanged; no embedding drift), each at ``alpha / 2``, so
the false-alarm rate of a pass under no shift stays at or below ``alpha``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgpipe.bundle import BundleMeta
from imgpipe.errors import DataSourceError
from imgpipe.monitoring.drift import mmd_permutation_test
from imgpipe.monitoring.label_shift import (
    bbse_prior,
    bootstrap_priors,
    confusion_given_label,
    em_prior,
    prior_unchanged_test,
    recalibrate,
    reference_temperature,
    total_variation,
)
from imgpipe.monitoring.log_reader import LogWindow
from imgpipe.monitoring.performance import (
    decisions,
    expected_metrics,
    low_confidence_share,
    per_class_recall,
)
from imgpipe.monitoring.reference import Reference, stratified_sample
from imgpipe.prediction_log_format import DEPLOYMENT_PRIOR


@dataclass(frozen=True)
class AnalysisSettings:
    alpha: float = 0.05  # false-alarm budget of one pass (both tests together)
    n_bootstrap: int = 200
    n_permutations: int = 500
    seed: int = 0
    low_confidence: float = 0.5  # served probability below this counts as low confidence
    max_drift_rows: int = 1000  # per sample; the kernel matrix is (n + m)²
    time_bins: int = 20


def training_prior(meta: BundleMeta) -> np.ndarray:
    counts = np.asarray(meta.train_class_counts, dtype=np.float64)
    if counts.sum() <= 0:
        counts = np.asarray(meta.model_prior, dtype=np.float64)
    return counts / counts.sum()


def deployment_target(meta: BundleMeta, choice: Any) -> np.ndarray | None:
    """The normalised target prior of a deployment-prior choice (None for "model")."""
    if choice in (None, "model"):
        return None
    if choice == "balanced":
        return np.full(meta.architecture.num_classes, 1.0 / meta.architecture.num_classes)
    if choice == "train":
        return training_prior(meta)
    v = np.asarray(choice, dtype=np.float64)
    return v / v.sum()


def _named(names: list[str], values: np.ndarray) -> dict[str, float | None]:
    return {n: (None if np.isnan(v) else round(float(v), 6)) for n, v in zip(names, values, strict=True)}


@dataclass(frozen=True)
class _Temperatures:
    """Which temperature each set of probabilities is at, and the calibrated one.

    The reference was scored once, at the bundle's T then (``reference``); each logged row
    carries the T it was served at (``rows``), which ``--apply-prior`` may have changed. A T
    refitted on the reference (``fit``) makes ``reference · fit`` the calibrated temperature.
    """

    reference: float
    rows: np.ndarray  # (N,)
    fit: float

    @property
    def calibrated(self) -> float:
        return self.reference * self.fit

    @property
    def served(self) -> float:
        return float(self.rows[-1])

    def summary(self) -> dict[str, Any]:
        return {"temperature": round(self.fit, 6), "reference_temperature": self.reference,
                "served_temperature": round(self.served, 6),
                "calibrated_temperature": round(self.calibrated, 6),
                "why": "temperature refitted on the labelled reference before EM (EM needs "
                       "calibrated probabilities); 1 = already calibrated"}


def _temperatures(meta: BundleMeta, ref: Reference, win: LogWindow) -> _Temperatures:
    model_prior = np.asarray(meta.model_prior) / np.sum(meta.model_prior)
    t_ref = float(ref.info.get("temperature", meta.temperature))
    rows = win.temperatures if win.temperatures is not None else np.full(len(win), t_ref)
    return _Temperatures(t_ref, rows, reference_temperature(ref.probabilities, ref.labels,
                                                            model_prior))


def _label_shift(meta: BundleMeta, ref: Reference, win: LogWindow, ref_idx: np.ndarray,
                 temps: _Temperatures, s: AnalysisSettings) -> tuple[dict[str, Any], np.ndarray]:
    names, c = meta.class_names, meta.architecture.num_classes
    model_prior = np.asarray(meta.model_prior) / np.sum(meta.model_prior)
    train = training_prior(meta)
    win_pred = win.probabilities.argmax(axis=1)  # the model-prior rule, as on the reference
    m = confusion_given_label(ref.labels, ref.probabilities.argmax(axis=1), c)
    # EM needs calibrated posteriors: every row goes from the T it was logged at to the
    # calibrated T (a row at T_a reaches T_b with factor T_b / T_a).
    win_probs = recalibrate(win.probabilities, temps.calibrated / temps.rows)
    est = {"bbse": bbse_prior(m, win_pred), "em": em_prior(win_probs, model_prior)}
    boot = bootstrap_priors(win_probs, ref.labels, ref.probabilities, model_prior,
                            s.n_bootstrap, s.seed) if s.n_bootstrap > 0 else None
    stat, p = prior_unchanged_test(win_pred, ref.probabilities[ref_idx].argmax(axis=1), c)
    out: dict[str, Any] = {"training_prior": _named(names, train),
                           "em_recalibration": temps.summary()}
    for method, pi in est.items():
        lo, hi = (np.percentile(boot[method], [2.5, 97.5], axis=0) if boot is not None
                  else (np.full(c, np.nan), np.full(c, np.nan)))
        out[method] = {"prior": _named(names, pi), "ci95_low": _named(names, lo),
                       "ci95_high": _named(names, hi),
                       "tv_from_training": round(total_variation(pi, train), 6)}
    out["test"] = {"name": "chi-square homogeneity of predicted labels, window vs held-out "
                           "reference sample at the training prior",
                   "statistic": stat, "p_value": p, "reference_rows": int(len(ref_idx))}
    return out, est["em"]


def _drift(ref: Reference, win: LogWindow, ref_idx: np.ndarray, s: AnalysisSettings
           ) -> dict[str, Any]:
    if win.embeddings is None or ref.embeddings is None:
        return {"available": False, "reason": "no embeddings in the log or the reference"}
    rng = np.random.default_rng(s.seed)
    x = win.embeddings
    if len(x) > s.max_drift_rows:
        x = x[np.sort(rng.choice(len(x), s.max_drift_rows, replace=False))]
    y = ref.embeddings[ref_idx]
    if len(y) > s.max_drift_rows:
        y = y[np.sort(rng.choice(len(y), s.max_drift_rows, replace=False))]
    r = mmd_permutation_test(x, y, s.n_permutations, s.seed)
    return {"available": True, "method": "MMD² (Gaussian kernel, median heuristic), "
            "permutation test", "statistic": r.statistic, "p_value": r.p_value,
            "bandwidth": r.bandwidth, "n_window": r.n_window, "n_reference": r.n_reference}


def _performance(meta: BundleMeta, ref: Reference, win: LogWindow, em: np.ndarray,
                 temps: _Temperatures, s: AnalysisSettings) -> dict[str, Any]:
    names, c = meta.class_names, meta.architecture.num_classes
    model_prior = np.asarray(meta.model_prior)
    current = meta.deployment_prior
    if win.table is not None and DEPLOYMENT_PRIOR in win.table.column_names and len(win):
        current = json.loads(win.table[DEPLOYMENT_PRIOR][-1].as_py())
    # The rule in effect: the served T and prior, on the reference images.
    now = recalibrate(ref.probabilities, temps.served / temps.reference)
    rec_now = per_class_recall(ref.labels, decisions(now, model_prior,
                                                     deployment_target(meta, current)), c)
    # The adapted rule is what --apply-prior serves: the estimated prior at the calibrated T.
    rec_adapted = per_class_recall(ref.labels, decisions(recalibrate(ref.probabilities, temps.fit),
                                                         model_prior, em), c)
    return {
        "deployment_prior_in_effect": current,
        "current_rule": expected_metrics(rec_now, em),
        "with_estimated_prior": expected_metrics(rec_adapted, em),
        "per_class_recall_current": _named(names, rec_now),
        "low_confidence_threshold": s.low_confidence,
        "low_confidence_share": _named(names, low_confidence_share(
            win.predicted, win.served_probability, c, s.low_confidence)),
    }


def _prediction_rate(meta: BundleMeta, win: LogWindow, bins: int) -> dict[str, Any]:
    t = win.times.astype("datetime64[us]").astype(np.int64)
    edges = np.linspace(t.min(), t.max() + 1, bins + 1)
    which = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, bins - 1)
    c = meta.architecture.num_classes
    counts = np.zeros((bins, c))
    np.add.at(counts, (which, win.predicted), 1)
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.full_like(counts, np.nan), where=totals > 0)
    starts = edges[:-1].astype(np.int64).astype("datetime64[us]")
    return {"bin_start": [str(x) + "Z" for x in starts], "rows": totals[:, 0].astype(int).tolist(),
            "rate": {n: [None if np.isnan(v) else round(float(v), 4) for v in rates[:, i]]
                     for i, n in enumerate(meta.class_names)}}


def analyze(meta: BundleMeta, ref: Reference, win: LogWindow,
            settings: AnalysisSettings | None = None) -> dict[str, Any]:
    """The monitor.json payload for one window (see the module docstring).

    Raises:
        ValueError: an empty window.
    """
    s = settings or AnalysisSettings()
    if len(win) == 0:
        raise DataSourceError("the window holds no rows of this bundle: nothing to monitor yet")
    ref_idx = stratified_sample(ref.labels, training_prior(meta), s.seed)
    temps = _temperatures(meta, ref, win)
    label_shift, em = _label_shift(meta, ref, win, ref_idx, temps, s)
    drift = _drift(ref, win, ref_idx, s)
    p_prior = label_shift["test"]["p_value"]
    p_drift = drift.get("p_value", 1.0)
    return {
        "bundle": {"name": meta.name, "version": meta.version,
                   "class_names": meta.class_names},
        "window": {"rows": len(win), "start": str(win.times[0]) + "Z",
                   "end": str(win.times[-1]) + "Z", "files_read": win.files_read,
                   "files_skipped": win.files_skipped, "other_model_rows": win.other_model_rows},
        "label_shift": label_shift,
        "drift": drift,
        "performance": _performance(meta, ref, win, em, temps, s),
        "prediction_rate": _prediction_rate(meta, win, s.time_bins),
        "shift_detected": bool(min(p_prior, p_drift) < s.alpha / 2),
        "alpha": s.alpha,
    }
