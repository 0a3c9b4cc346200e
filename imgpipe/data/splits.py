"""Splits and long tails: the seeded, per-class draws every data source shares.

- ``long_tail_counts``: per-class counts of a long tail with imbalance ratio ρ (Cao et al. 2019's
  exponential profile ``n_max · ρ^(-i/(C-1))``).
- ``long_tail_keep``: subsample an existing train split to such a tail (ingest).
- ``holdout_per_class``: balanced val/test drawn first, per class (the embedded datasets).
- ``stratified_assign``: carve val/test out of train per class, each class in every split.
"""

from __future__ import annotations

import math

import numpy as np

from imgpipe.constants import TEST, TRAIN, VAL
from imgpipe.errors import DataSourceError


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """Per-class counts of a long-tailed split: ``int(n_max * rho^(-i/(C-1)))``, class 0 the head.

    A class never gets fewer than one image (a class with no training rows cannot be learned and
    breaks per-class weights), so for ``n_max / rho < 1`` the tail is 1, not 0.

    Raises:
        ValueError: ``n_max`` < 1, ``num_classes`` < 1, or ``imbalance_ratio`` not a finite >= 1.
    """
    if not isinstance(n_max, (int, np.integer)) or n_max < 1:
        raise ValueError(f"n_max must be an integer >= 1, got {n_max!r}")
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if not (math.isfinite(imbalance_ratio) and imbalance_ratio >= 1):
        raise ValueError(f"imbalance_ratio must be a finite number >= 1, got {imbalance_ratio!r}")
    if num_classes == 1:
        return [int(n_max)]
    return [
        max(1, int(n_max * imbalance_ratio ** (-i / (num_classes - 1))))
        for i in range(num_classes)
    ]


def holdout_per_class(
    labels: np.ndarray, num_classes: int, val_per_class: int, test_per_class: int, seed: int
) -> tuple[dict[str, list[int]], list[list[int]]]:
    """Balanced test then val indices per class; returns (split → indices, remaining pools)."""
    counts = np.bincount(labels, minlength=num_classes)
    need = val_per_class + test_per_class
    if counts.min() <= need:
        small = int(np.argmin(counts))
        raise DataSourceError(
            f"val_per_class + test_per_class = {need} leaves no training images for class "
            f"{small} ({counts[small]} images); lower val_per_class/test_per_class"
        )
    rng = np.random.default_rng(seed)
    held: dict[str, list[int]] = {TEST: [], VAL: []}
    pools: list[list[int]] = []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c)).tolist()
        held[TEST] += idx[:test_per_class]
        held[VAL] += idx[test_per_class:need]
        pools.append(idx[need:])
    return held, pools


def stratified_assign(labels: np.ndarray, fractions: dict[str, float],
                      seed: int) -> tuple[np.ndarray, list[int]]:
    """Assign rows to splits per class: ``round(n * f)`` (at least 1) to each split, rest train.

    Per-class allocation (rather than sklearn's ``train_test_split(stratify=...)``, which only
    approximates per-class proportions and may give a rare class no val/test row at all) puts
    every splittable class in every split, so per-class recall exists. Classes with fewer than
    ``len(fractions) + 1`` rows stay wholly in train; their labels are returned.
    """
    out = np.full(len(labels), TRAIN, dtype=object)
    rng = np.random.default_rng(seed)
    small = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < len(fractions) + 1:
            small.append(int(c))
            continue
        take = [max(1, round(len(idx) * f)) for f in fractions.values()]
        while sum(take) > len(idx) - 1:  # keep at least one training row
            take[int(np.argmax(take))] -= 1
        start = 0
        for split, k in zip(fractions, take, strict=True):
            out[idx[start:start + k]] = split
            start += k
    return out, small


def long_tail_keep(labels: np.ndarray, imbalance_ratio: float, seed: int) -> np.ndarray:
    """Boolean mask that subsamples ``labels`` (train rows) to a long tail with ratio ``rho``.

    Classes are ranked by their own size (the natural head stays the head) and ``n_max`` is the
    largest head count every rank can supply, so as few rows as possible are dropped.
    """
    counts = np.bincount(labels)
    ranked = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    keep = np.zeros(len(labels), dtype=bool)
    if len(ranked) < 2:
        keep[:] = True
        return keep
    n_max = min(counts[c] * imbalance_ratio ** (r / (len(ranked) - 1))
                for r, c in enumerate(ranked))
    quotas = long_tail_counts(max(1, int(n_max)), len(ranked), imbalance_ratio)
    rng = np.random.default_rng([seed, 0x7A11])
    for c, q in zip(ranked, quotas, strict=True):
        keep[rng.permutation(np.flatnonzero(labels == c))[:q]] = True
    return keep
