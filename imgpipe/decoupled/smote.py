"""Minority oversampling in feature space with imbalanced-learn (SMOTE, Borderline-SMOTE, ADASYN).

Interpolating penultimate features instead of pixels avoids SMOTE's blurry, unrealistic images
(Chawla et al. 2002; Han et al. 2005; He et al. 2008). imbalanced-learn's samplers need more
rows in a class than neighbours asked for (``k + 1``), and a long tail routinely has classes
with one or two images, so each class is oversampled on its own with ``k_c = min(k, n_c − 1)``;
a class with a single row (no neighbour to interpolate towards) is duplicated instead. What
happened to every class is returned, so a user can see which classes got real synthesis.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

SmoteMethod = Literal["smote", "borderline", "adasyn"]


@dataclass
class ClassOversampling:
    """What oversampling did to one class."""

    label: int
    real: int  # rows before
    synthetic: int  # interpolated rows added
    duplicated: int  # copies of real rows added (when interpolation was impossible)
    k_neighbors: int | None  # k used for this class (None: not interpolated)
    note: str = ""


def _sampler(method: SmoteMethod, label: int, target: int, k: int, seed: int):
    from imblearn.over_sampling import ADASYN, SMOTE, BorderlineSMOTE

    strategy = {label: target}
    if method == "smote":
        return SMOTE(sampling_strategy=strategy, k_neighbors=k, random_state=seed)
    if method == "borderline":
        return BorderlineSMOTE(sampling_strategy=strategy, k_neighbors=k, m_neighbors=max(k, 2),
                               random_state=seed)
    return ADASYN(sampling_strategy=strategy, n_neighbors=k, random_state=seed)


def _synthesise(x: np.ndarray, y: np.ndarray, label: int, target: int, k: int,
                method: SmoteMethod, seed: int) -> tuple[np.ndarray, str]:
    """New rows for ``label`` (imblearn appends them after the originals)."""
    try:
        xr, _ = _sampler(method, label, target, k, seed).fit_resample(x, y)
        return xr[len(x):], ""
    except (ValueError, RuntimeError) as e:
        # ADASYN refuses a class with no other-class neighbour; Borderline-SMOTE a class with
        # no borderline rows: both mean plain SMOTE is the right fallback.
        if method == "smote":
            raise
        xr, _ = _sampler("smote", label, target, k, seed).fit_resample(x, y)
        return xr[len(x):], f"{method} not applicable ({e}); used smote"


def oversample_features(x: np.ndarray, y: np.ndarray, k: int = 5, method: SmoteMethod = "smote",
                        seed: int = 0, target: int | None = None,
                        ) -> tuple[np.ndarray, np.ndarray, list[ClassOversampling]]:
    """Oversample every class of ``(x, y)`` to ``target`` rows (default: the largest class).

    Args:
        x: (N, D) float features. y: (N,) int labels.
        k: neighbours for interpolation (per class ``min(k, n_c − 1)``).
        method: ``smote`` | ``borderline`` | ``adasyn`` (imbalanced-learn).
        seed: random state of every sampler (same seed, same rows).
    Returns:
        ``(x_out, y_out, report)``: the original rows first, then the new ones (float32 /
        int64), and one ``ClassOversampling`` per class present, in label order.
    Raises:
        ValueError: empty input, mismatched lengths, non-finite features or k < 1.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
        raise ValueError(f"expected x (N, D) and y (N,), got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features must be finite")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    counts = np.bincount(y)
    goal = int(target if target is not None else counts.max())
    new_x, new_y, report = [x], [y], []
    rng = np.random.default_rng(seed)
    for label in np.flatnonzero(counts):
        n = int(counts[label])
        need = max(0, goal - n)
        entry = ClassOversampling(int(label), n, 0, 0, None)
        if need and n >= 2:
            kc = min(k, n - 1)
            rows, entry.note = _synthesise(x, y, int(label), goal, kc, method, seed)
            entry.synthetic, entry.k_neighbors = len(rows), kc
            if kc < k:
                entry.note = (entry.note + "; " if entry.note else "") + f"k lowered to {kc}"
            new_x.append(rows)
            new_y.append(np.full(len(rows), label, dtype=np.int64))
        elif need:  # one row: nothing to interpolate towards
            pick = rng.choice(np.flatnonzero(y == label), size=need)
            entry.duplicated, entry.note = need, "1 row: duplicated (no neighbour)"
            new_x.append(x[pick])
            new_y.append(np.full(need, label, dtype=np.int64))
        report.append(entry)
    x_out = np.concatenate(new_x).astype(np.float32)
    if not np.isfinite(x_out).all():  # imblearn interpolates; this guards the contract
        raise ValueError("oversampling produced non-finite features")
    return x_out, np.concatenate(new_y), report


def report_dicts(report: list[ClassOversampling], class_names: list[str]) -> list[dict]:
    """The per-class report as JSON-ready dicts with class names."""
    return [{**asdict(r), "class_name": class_names[r.label]} for r in report]
