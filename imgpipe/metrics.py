"""Imbalance-aware classification metrics, computed from counts.

Distributed evaluation sums per-worker confusion matrices (``confusion_matrix``) and only then
computes rates (``classification_metrics``): averaging per-worker rates would weight workers,
not samples. Every result is JSON-serialisable: plain ``float``/``int``/``list``, with ``None``
where a number is undefined (never NaN).

Conventions follow scikit-learn with ``labels=range(C)`` and ``zero_division=0``; the
extended metrics follow imbalanced-learn. Rates come from the (summable) confusion matrix here;
the scores that need per-sample probabilities — ROC-AUC, average precision, top-k, log loss,
Brier — are scikit-learn's own functions. The tests check each number against those libraries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

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


def top_k_key(k: int) -> str:
    """Result key of top-k accuracy (``top_5_accuracy``)."""
    return f"top_{k}_accuracy"


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, possibly on an accelerator
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_labels(y: Any, num_classes: int, what: str) -> np.ndarray:
    y = _to_numpy(y)
    if y.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D array of class indices, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what}: expected integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{what}: class indices must be in [0, {num_classes}), got [{y.min()}, {y.max()}]"
        )
    return y


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (sklearn's ``zero_division=0``)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in values]


def _mean_or_none(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows = true class, columns = predicted class.

    Accepts numpy arrays, lists or torch tensors of int class indices in ``[0, C)``.
    Raises ValueError on shape mismatch, non-integer labels or out-of-range indices.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    t = _check_labels(y_true, num_classes, "y_true")
    p = _check_labels(y_pred, num_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels, y_pred {p.size}")
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _check_cm(cm: Any) -> np.ndarray:
    cm = _to_numpy(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {cm.shape}")
    if not np.isfinite(cm).all() or (cm < 0).any():
        raise ValueError("confusion matrix must hold finite counts >= 0")
    if cm.sum() <= 0:
        raise ValueError("confusion matrix is empty: no samples were evaluated")
    return cm.astype(np.float64)


def _rates(cm: np.ndarray) -> dict[str, np.ndarray]:
    tp = np.diag(cm)
    support = cm.sum(axis=1)  # true count per class
    predicted = cm.sum(axis=0)
    return {
        "tp": tp,
        "support": support,
        "predicted": predicted,
        "recall": _safe_div(tp, support),
        "precision": _safe_div(tp, predicted),
        # 2tp / (2tp + fp + fn), like sklearn; 0 when the class is neither true nor predicted.
        "f1": _safe_div(2 * tp, support + predicted),
        # TN / (TN + FP) with TN + FP = N - support (imblearn; 0 when every sample is class c).
        "specificity": _safe_div(cm.sum() - support - predicted + tp, cm.sum() - support),
    }


def classification_metrics(cm: Any) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro/per-class precision, recall, F1 and support.

    Args:
        cm: (C, C) confusion matrix (rows = true), e.g. summed over workers.
    Returns:
        ``{ACCURACY, BALANCED_ACCURACY, MACRO_F1, MACRO_PRECISION, MACRO_RECALL: float,
        PER_CLASS_RECALL, PER_CLASS_PRECISION, PER_CLASS_F1: list[float], "support": list[int]}``.
        Balanced accuracy is the mean recall over classes present in y_true (sklearn); the
        macro averages run over all C classes with 0 for undefined ratios (sklearn,
        ``labels=range(C), zero_division=0``).
    Raises:
        ValueError: not square, negative counts, or no samples.
    """
    cm = _check_cm(cm)
    r = _rates(cm)
    present = r["support"] > 0
    return {
        ACCURACY: float(r["tp"].sum() / cm.sum()),
        BALANCED_ACCURACY: float(r["recall"][present].mean()),
        MACRO_F1: float(r["f1"].mean()),
        MACRO_PRECISION: float(r["precision"].mean()),
        MACRO_RECALL: float(r["recall"].mean()),
        PER_CLASS_RECALL: _floats(r["recall"]),
        PER_CLASS_PRECISION: _floats(r["precision"]),
        PER_CLASS_F1: _floats(r["f1"]),
        SUPPORT: [int(s) for s in r["support"]],
    }


def confusion_extras(cm: Any, iba_alpha: float = 0.1) -> dict[str, Any]:
    """Specificity, G-mean, IBA, MCC and support-weighted precision/recall/F1 from counts.

    - per-class specificity and G-mean: imblearn with ``labels=range(C)``; G-mean is the
      geometric mean of the C recalls, so it is 0 when any class has recall 0 — including a
      class absent from y_true (imblearn scores its recall 0).
    - index of balanced accuracy: imblearn ``make_index_balanced_accuracy(alpha=iba_alpha,
      squared=True)(geometric_mean_score)`` = ``(1 + α·(mean recall − mean specificity))·G²``.
    - MCC: sklearn's multiclass (Gorodkin) form, 0 when undefined.
    """
    cm = _check_cm(cm)
    r = _rates(cm)
    recall, spec, support = r["recall"], r["specificity"], r["support"]
    gmean = 0.0 if (recall == 0).any() else float(np.exp(np.mean(np.log(recall))))
    dominance = recall.mean() - spec.mean()
    n = cm.sum()
    cov_ytyp = r["tp"].sum() * n - np.dot(r["predicted"], support)
    cov_ypyp = n * n - np.dot(r["predicted"], r["predicted"])
    cov_ytyt = n * n - np.dot(support, support)
    denom = np.sqrt(cov_ypyp * cov_ytyt)
    return {
        PER_CLASS_SPECIFICITY: _floats(spec),
        GEOMETRIC_MEAN: gmean,
        INDEX_BALANCED_ACCURACY: float((1.0 + iba_alpha * dominance) * gmean**2),
        MCC: float(cov_ytyp / denom) if denom > 0 else 0.0,
        WEIGHTED_PRECISION: float(np.dot(r["precision"], support) / n),
        WEIGHTED_RECALL: float(np.dot(recall, support) / n),
        WEIGHTED_F1: float(np.dot(r["f1"], support) / n),
    }


def _sklearn_metrics():
    """``sklearn.metrics``, imported on first use: with SciPy and pandas it takes seconds to
    import, and the confusion-matrix metrics that every train worker and Tune trial computes
    (``classification_metrics``) need none of it."""
    from sklearn import metrics

    return metrics


def _binary_ranking(positive: np.ndarray, score: np.ndarray) -> tuple[float | None, float | None]:
    """(ROC-AUC, average precision) of one-vs-rest scores (scikit-learn's ``roc_auc_score`` /
    ``average_precision_score``); None when undefined: ROC-AUC needs both positives and
    negatives, AP needs positives (sklearn would warn and return nan or 0)."""
    n_pos = int(positive.sum())
    if n_pos == 0:
        return None, None
    ap = float(_sklearn_metrics().average_precision_score(positive, score))
    if n_pos == positive.size:
        return None, ap
    return float(_sklearn_metrics().roc_auc_score(positive, score)), ap


def ranking_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """One-vs-rest ROC-AUC and average precision (PR-AUC), per class and macro.

    A class absent from y_true (or, for ROC-AUC, making up all of it) has None and is left
    out of the macro mean; sklearn's ``roc_auc_score(multi_class="ovr")`` would refuse such
    input instead, so the per-class binary scores are computed and averaged here.
    """
    aucs: list[float | None] = []
    aps: list[float | None] = []
    for c in range(probs.shape[1]):
        auc, ap = _binary_ranking(y_true == c, probs[:, c])
        aucs.append(auc)
        aps.append(ap)
    return {
        PER_CLASS_ROC_AUC: aucs,
        MACRO_ROC_AUC: _mean_or_none(aucs),
        PER_CLASS_AVERAGE_PRECISION: aps,
        MACRO_AVERAGE_PRECISION: _mean_or_none(aps),
    }


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Fraction of samples whose true class is among the k highest scores
    (``sklearn.metrics.top_k_accuracy_score``); 1.0 when k >= C."""
    if k < 1:
        raise ValueError(f"top-k: k must be >= 1, got {k}")
    c = probs.shape[1]
    if k >= c:
        return 1.0
    # sklearn reads a binary problem's score as one column (the positive class).
    score = probs[:, 1] if c == 2 else probs
    return float(_sklearn_metrics().top_k_accuracy_score(y_true, score, k=k,
                                                          labels=np.arange(c)))


def negative_log_likelihood(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean ``-log p_y`` (``sklearn.metrics.log_loss``, which clips p to float64 eps)."""
    return float(_sklearn_metrics().log_loss(y_true, probs, labels=np.arange(probs.shape[1])))


def brier_score(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Multiclass Brier score: mean over samples of ``Σ_c (p_c − 1[y = c])²``, in [0, 2].

    ``sklearn.metrics.brier_score_loss(y, probs, labels=range(C), scale_by_half=False)``: for
    two classes sklearn's default halves it (the classic binary ``mean (p_1 − y)²``); we never
    halve, so the number means the same thing for every C.
    """
    return float(_sklearn_metrics().brier_score_loss(
        y_true, probs, labels=np.arange(probs.shape[1]), scale_by_half=False))


def calibration(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Expected calibration error over equal-width bins of the max-probability confidence.

    Bin b holds confidences in ``(b/n, (b+1)/n]`` (the first also holds 0). ECE =
    ``Σ_b (n_b / N) · |acc_b − conf_b|`` (Guo et al. 2017). Returns ``{ECE: float,
    RELIABILITY: {"bin_edges", "accuracy", "confidence", "count"}}`` for a reliability
    diagram; empty bins have accuracy/confidence None.
    """
    if n_bins < 1:
        raise ValueError(f"calibration: n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    bins = np.searchsorted(edges[1:-1], confidence, side="left")  # right-closed bins
    count = np.bincount(bins, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    ece = float(np.abs(acc_sum - conf_sum).sum() / y_true.size)
    filled = count > 0
    acc = _safe_div(acc_sum, count)
    conf = _safe_div(conf_sum, count)
    return {
        ECE: ece,
        RELIABILITY: {
            "bin_edges": _floats(edges),
            "accuracy": [float(a) if f else None for a, f in zip(acc, filled, strict=True)],
            "confidence": [float(c) if f else None for c, f in zip(conf, filled, strict=True)],
            "count": [int(c) for c in count],
        },
    }


def shot_accuracy(cm: Any, train_counts: Sequence[int] | np.ndarray, many_shot: int = 100,
                  few_shot: int = 20) -> dict[str, Any]:
    """Accuracy on many-shot (n > many_shot), medium and few-shot (n < few_shot) classes.

    n is the class's training count; defaults follow the long-tail convention (>100, 20–100,
    <20; Liu et al. 2019). Each group's accuracy is the mean per-class recall over its classes
    present in the evaluation set (sample accuracy on a balanced test set); None if it has none.
    Also returns ``SHOT_CLASSES``: the class indices of each group.
    """
    cm = _check_cm(cm)
    n = np.asarray(train_counts, dtype=np.float64)
    if n.shape != (cm.shape[0],):
        raise ValueError(f"train_counts: expected {cm.shape[0]} counts, got shape {n.shape}")
    if few_shot > many_shot:
        raise ValueError(f"few_shot ({few_shot}) must be <= many_shot ({many_shot})")
    r = _rates(cm)
    groups = {
        "many": n > many_shot,
        "medium": (n >= few_shot) & (n <= many_shot),
        "few": n < few_shot,
    }
    keys = {"many": MANY_SHOT_ACCURACY, "medium": MEDIUM_SHOT_ACCURACY, "few": FEW_SHOT_ACCURACY}
    out: dict[str, Any] = {}
    for group, members in groups.items():
        scored = members & (r["support"] > 0)
        out[keys[group]] = float(r["recall"][scored].mean()) if scored.any() else None
    out[SHOT_CLASSES] = {g: [int(c) for c in np.flatnonzero(m)] for g, m in groups.items()}
    return out


def _check_probs(y_true: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    probs = _to_numpy(probs).astype(np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs: expected shape (N, C) with C >= 2, got {probs.shape}")
    y = _check_labels(y_true, probs.shape[1], "y_true")
    if y.size != probs.shape[0] or y.size == 0:
        raise ValueError(f"y_true has {y.size} labels, probs {probs.shape[0]} rows (need > 0)")
    if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
        raise ValueError("probs: values must be finite probabilities in [0, 1]")
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probs: rows must sum to 1 (pass softmax outputs, not logits)")
    return y, probs


def probabilistic_metrics(y_true: Any, probs: Any,
                          train_counts: Sequence[int] | np.ndarray | None = None, *,
                          top_k: Sequence[int] = (1, 5), n_bins: int = 15,
                          many_shot: int = 100, few_shot: int = 20,
                          iba_alpha: float = 0.1) -> dict[str, Any]:
    """Every evaluation-report metric from true labels and predicted probabilities.

    Args:
        y_true: (N,) int class indices.
        probs: (N, C) class probabilities (rows sum to 1); predictions are their argmax.
        train_counts: (C,) training counts for many/medium/few-shot accuracy (omitted if None).
        top_k: k values for ``top_{k}_accuracy`` (k >= C gives 1.0).
        n_bins: ECE bins; many_shot/few_shot: shot-group thresholds; iba_alpha: IBA's α.
    Returns:
        ``classification_metrics`` ∪ ``confusion_extras`` ∪ ``ranking_metrics`` ∪ top-k ∪
        ``{NLL, BRIER}`` ∪ ``calibration`` ∪ ``shot_accuracy`` (JSON-serialisable).
    Raises:
        ValueError: shapes disagree, labels out of range, or probs are not probabilities.
    """
    y, p = _check_probs(y_true, probs)
    cm = confusion_matrix(y, p.argmax(axis=1), p.shape[1])
    out = classification_metrics(cm)
    out.update(confusion_extras(cm, iba_alpha))
    out.update(ranking_metrics(y, p))
    for k in top_k:
        out[top_k_key(k)] = top_k_accuracy(y, p, k)
    out[NLL] = negative_log_likelihood(y, p)
    out[BRIER] = brier_score(y, p)
    out.update(calibration(y, p, n_bins))
    if train_counts is not None:
        out.update(shot_accuracy(cm, train_counts, many_shot, few_shot))
    return out
