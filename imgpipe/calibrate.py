"""Post-hoc calibration fitted on the validation split: temperature and binary decision threshold.

The adjustment itself (``logits / T``, then ``+ log target − log model prior``, then softmax) is
applied in exactly one place, ``imgpipe.inference`` (the ``Predictor``), so evaluation and
serving cannot drift. This module only *chooses* the numbers that the Predictor applies:

- ``fit_temperature``: the T that minimises validation NLL of ``softmax(logits / T + shift)``.
  ``shift`` is the Predictor's prior offset towards the validation split's own class frequencies,
  so T absorbs over/under-confidence and not the prior mismatch between training and validation.
- ``choose_threshold``: the cut on ``p(class 1)`` for binary tasks (max F1 or a target recall);
  the Predictor predicts class 1 iff ``p(class 1) >= threshold``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from imgpipe.constants import THRESHOLD_MODES

# Temperatures outside this range mean a broken model (or logits that are not logits).
T_MIN, T_MAX = 1e-2, 1e2
# bundle.json requires 0 < threshold < 1.
_THRESHOLD_EPS = 1e-6
ThresholdMode = Literal[THRESHOLD_MODES]


def _check_logits(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits: expected shape (N, C) with C >= 2, got {z.shape}")
    if y.shape != (z.shape[0],) or z.shape[0] == 0:
        raise ValueError(f"labels: expected shape ({z.shape[0]},) with N > 0, got {y.shape}")
    if not np.isfinite(z).all():
        raise ValueError("logits: values must be finite")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels: expected integer class indices in [0, {z.shape[1]})")
    return z, y.astype(np.int64)


def nll_at_temperature(logits: np.ndarray, labels: np.ndarray, temperature: float,
                       shift: np.ndarray | None = None) -> float:
    """Mean ``-log softmax(logits / T + shift)[label]`` computed in log space (never clipped).

    Args:
        logits: (N, C) raw model outputs; labels: (N,) int class indices.
        shift: (C,) per-class logit offset (e.g. ``inference.prior_shift``); None = zeros.
    """
    z, y = _check_logits(logits, labels)
    a = z / float(temperature) + (0.0 if shift is None else np.asarray(shift, np.float64))
    with np.errstate(invalid="ignore"):  # a -inf shift on the true class gives +inf, correctly
        return float(np.mean(logsumexp(a, axis=1) - a[np.arange(y.size), y]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray,
                    shift: np.ndarray | None = None) -> float:
    """Temperature T > 0 minimising ``nll_at_temperature`` on held-out data (deterministic).

    NLL is convex in 1/T, hence unimodal in log T: a bounded Brent search on log T in
    ``[T_MIN, T_MAX]`` finds the global minimum. T never changes the argmax (it is positive),
    and 1.0 is returned unless the fit is strictly better, so validation NLL never rises.

    Raises:
        ValueError: bad shapes, non-finite logits or labels out of range.
    """
    z, y = _check_logits(logits, labels)

    def objective(log_t: float) -> float:
        return nll_at_temperature(z, y, float(np.exp(log_t)), shift)

    res = minimize_scalar(objective, bounds=(np.log(T_MIN), np.log(T_MAX)), method="bounded",
                          options={"xatol": 1e-6})
    t = float(np.exp(res.x))
    return t if objective(res.x) < objective(0.0) else 1.0


def _sorted_cuts(probs_pos: np.ndarray, positive: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct score (descending): true positives and predicted positives when cutting
    just below it, and the threshold for that cut (midway to the next lower score)."""
    order = np.argsort(-probs_pos, kind="mergesort")
    s, pos = probs_pos[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # ties move together
    tp = np.cumsum(pos)[last].astype(np.float64)
    k = (last + 1).astype(np.float64)
    lower = np.r_[s[last[:-1] + 1], 0.0]
    return tp, k, (s[last] + lower) / 2


def choose_threshold(probs_pos: np.ndarray, labels: np.ndarray, mode: ThresholdMode = "max_f1",
                     target_recall: float = 0.9) -> float:
    """Decision threshold on ``p(class 1)`` chosen on validation data (binary tasks).

    Candidate cuts lie midway between adjacent distinct scores, so the choice does not depend
    on ``>=`` vs ``>``. ``max_f1``: the cut with the highest F1 (ties → the higher threshold).
    ``recall``: the highest threshold whose recall is at least ``target_recall`` (the most
    precise such cut). The result is clipped into (0, 1) as bundle.json requires.

    Args:
        probs_pos: (N,) probabilities of class 1 (after temperature and prior correction).
        labels: (N,) 0/1 true labels.
    Raises:
        ValueError: bad shapes, non-binary labels, no positive example, or a bad mode/target.
    """
    p = np.asarray(probs_pos, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 1 or y.shape != p.shape or p.size == 0:
        raise ValueError(f"probs_pos and labels must be 1-D of equal length > 0, got "
                         f"{p.shape} and {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels: a decision threshold needs binary 0/1 labels")
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("labels: no positive (class 1) example to choose a threshold on")
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"mode: expected one of {THRESHOLD_MODES}, got {mode!r}")
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    tp, k, thresholds = _sorted_cuts(p, y == 1)
    if mode == "max_f1":
        best = int(np.argmax(2 * tp / (k + n_pos)))  # argmax takes the first = highest cut
    else:
        best = int(np.flatnonzero(tp / n_pos >= target_recall - 1e-12)[0])
    return float(np.clip(thresholds[best], _THRESHOLD_EPS, 1 - _THRESHOLD_EPS))
