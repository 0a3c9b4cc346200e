"""What every part of the report shares: file names, the summary metrics and their labels,
and how a value is printed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imgpipe.bundle import BundleMeta
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
    WEIGHTED_F1,
    WEIGHTED_PRECISION,
    WEIGHTED_RECALL,
)
from imgpipe.metrics import (
    top_k_key,
)

REPORT_FILE = "report.html"
MODEL_CARD_FILE = "model_card.md"
SUMMARY_METRICS: tuple[tuple[str, str], ...] = (
    (ACCURACY, "Accuracy"),
    (BALANCED_ACCURACY, "Balanced accuracy"),
    (MACRO_PRECISION, "Macro precision"),
    (MACRO_RECALL, "Macro recall"),
    (MACRO_F1, "Macro F1"),
    (WEIGHTED_PRECISION, "Weighted precision"),
    (WEIGHTED_RECALL, "Weighted recall"),
    (WEIGHTED_F1, "Weighted F1"),
    (GEOMETRIC_MEAN, "Geometric mean (G-mean)"),
    (INDEX_BALANCED_ACCURACY, "Index of balanced accuracy (α=0.1)"),
    (MCC, "Matthews correlation (MCC)"),
    (MACRO_ROC_AUC, "Macro ROC-AUC (one-vs-rest)"),
    (MACRO_AVERAGE_PRECISION, "Macro PR-AUC (average precision)"),
    (top_k_key(1), "Top-1 accuracy"),
    (top_k_key(3), "Top-3 accuracy"),
    (top_k_key(5), "Top-5 accuracy"),
    (NLL, "Negative log-likelihood"),
    (BRIER, "Brier score (multiclass, Σ over classes)"),
    (ECE, "Expected calibration error (15 bins)"),
    (MANY_SHOT_ACCURACY, "Many-shot accuracy"),
    (MEDIUM_SHOT_ACCURACY, "Medium-shot accuracy"),
    (FEW_SHOT_ACCURACY, "Few-shot accuracy"),
)


def fmt(value: Any, digits: int = 4) -> str:
    """A metric value for a table: ``n/a`` for None, ``digits`` decimals for floats."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def prior_text(meta: BundleMeta) -> str:
    """The bundle's deployment prior as written in the page and the card."""
    p = meta.deployment_prior
    return p if isinstance(p, str) else f"[{short_vector(p)}]"


def short_vector(values: Sequence[float], limit: int = 12) -> str:
    """The first ``limit`` values (3 significant digits) and how many there are."""
    shown = ", ".join(f"{v:.3g}" for v in values[:limit])
    return shown + (f", … ({len(values)} values)" if len(values) > limit else "")
