"""Label-free performance estimates under label shift, from the held-out reference.

Under label shift p(x | y) is fixed, so each class's recall under a fixed decision rule is what
it was on held-out data; accuracy under a new prior π is Σ_y π_y · recall_y, and balanced
accuracy (mean recall) depends only on the rule. The rule is the app's: argmax of
``log p_cal + log target − log model_prior`` for the deployment prior in effect, or the
same with the estimated prior (what ``--apply-prior`` would do).
"""

from __future__ import annotations

import numpy as np


def decisions(probs: np.ndarray, model_prior: np.ndarray, target_prior: np.ndarray | None
              ) -> np.ndarray:
    """Class index per row ``(N,)`` of calibrated ``probs (N, C)`` after prior correction."""
    z = np.log(np.clip(probs, 1e-300, None))
    if target_prior is not None:
        src = np.asarray(model_prior, dtype=np.float64) / np.sum(model_prior)
        tgt = np.asarray(target_prior, dtype=np.float64) / np.sum(target_prior)
        with np.errstate(divide="ignore"):
            z = z + np.log(tgt) - np.log(np.where(src > 0, src, 1.0))
    return z.argmax(axis=1)


def per_class_recall(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall per class ``(C,)`` (NaN for a class without rows)."""
    hits = np.bincount(labels[predicted == labels], minlength=num_classes).astype(float)
    totals = np.bincount(labels, minlength=num_classes).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, hits / totals, np.nan)


def expected_metrics(recall: np.ndarray, prior: np.ndarray) -> dict[str, float]:
    """Expected accuracy Σ π·recall and balanced accuracy (mean recall) under ``prior``."""
    ok = ~np.isnan(recall)
    p = np.asarray(prior, dtype=np.float64)[ok]
    return {"accuracy": float(np.sum(p * recall[ok]) / max(p.sum(), 1e-12)),
            "balanced_accuracy": float(np.mean(recall[ok])) if ok.any() else float("nan")}


def low_confidence_share(predicted: np.ndarray, served_probability: np.ndarray,
                         num_classes: int, threshold: float) -> np.ndarray:
    """Per predicted class ``(C,)``: share of its rows served with probability < threshold."""
    low = np.bincount(predicted[served_probability < threshold], minlength=num_classes)
    total = np.bincount(predicted, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, low / np.maximum(total, 1), np.nan)
