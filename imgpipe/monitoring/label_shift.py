"""Label shift: estimate the class prior of served traffic without labels, and test it.

Under label shift p(x | y) stays fixed while p(y) moves. Two standard estimators:

- **BBSE** (black-box shift estimation; Lipton, Wang & Smola, ICML 2018): with the confusion
  matrix M[i, j] = P(ŷ = i | y = j) measured on held-out labelled data, the served predicted-
  label distribution is q = M π_t; solve for π_t (here by least squares on the simplex).
- **EM / MLLS** (Saerens, Latinne & Decaestecker, Neural Computation 2002): maximum likelihood of
  the new prior by EM on calibrated posteriors p_s(y | x), re-weighting them by π_t / π_s.
  Needs calibrated probabilities (Alexandari, Kundaje & Shrikumar, ICML 2020: "calibrate, then
  EM"). The log holds softmax(z / T) with the bundle's T, which is 1 for a bundle that was never
  calibrated, so before EM the monitor refits a temperature on the labelled reference
  (``reference_temperature``) and rescales the window's log-probabilities with it
  (``recalibrate``). A calibrated bundle's refit is ≈ 1 and changes nothing.

Uncertainty by the bootstrap (window rows, and for BBSE also the reference rows per class). The
test of "prior unchanged" compares predicted-label counts of the window against those of a
held-out reference sample drawn at the training prior (a χ² test of homogeneity,
``scipy.stats.chi2_contingency``): under label shift the predicted-label distribution moves iff
the prior does (M invertible), the black-box shift detection test of Lipton et al. and Rabanser,
Günnemann & Lipton (NeurIPS 2019).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import lsq_linear
from scipy.special import log_softmax
from scipy.stats import chi2_contingency

from imgpipe.calibrate import fit_temperature
from imgpipe.evaluate import split_class_mix

# Floor for log-probabilities read back from the log (float32 softmax can round to 0).
_MIN_PROB = 1e-12


def reference_temperature(ref_probs: np.ndarray, ref_labels: np.ndarray,
                          source_prior: np.ndarray) -> float:
    """Temperature scaling (Guo et al., ICML 2017) refitted on the logged probabilities.

    Args:
        ref_probs: ``(N, C)`` probabilities of the held-out reference under ``source_prior``
            (what the log holds: softmax(z / T) at the model's own prior).
        ref_labels: ``(N,)`` true labels; their class mix is the split's own, so the fit
            shifts the logits to that mix first (``log(mix / source_prior)``), exactly as
            ``evaluate.calibrate_bundle`` does, and T measures over/under-confidence only.
        source_prior: ``(C,)`` the prior the probabilities are under.
    Returns:
        T' > 0 minimising reference NLL of softmax(log p / T' + shift); 1.0 unless strictly
        better (``calibrate.fit_temperature``).
    Raises:
        ValueError: shapes disagree or labels out of range.
    """
    p = np.asarray(ref_probs, dtype=np.float64)
    mix = np.asarray(split_class_mix(ref_labels, p.shape[1]))  # what calibrate_bundle fits to
    src = np.asarray(source_prior, dtype=np.float64)
    src = src / src.sum()
    # a class the model gives prior 0 is left uncorrected, as inference.prior_shift does
    with np.errstate(divide="ignore"):
        shift = np.where(src > 0, np.log(mix) - np.log(src), 0.0)
    return fit_temperature(np.log(np.maximum(p, _MIN_PROB)), ref_labels, shift)


def recalibrate(probs: np.ndarray, temperature: float | np.ndarray) -> np.ndarray:
    """``softmax(log p / T)`` row-wise, ``(N, C)`` float64; ``temperature`` is one T or one
    per row ``(N,)``; T = 1 everywhere returns ``probs`` as float64.

    Probabilities logged at temperature T_a are put at T_b by ``T = T_b / T_a`` (log p is
    z / T_a up to a per-row constant). Temperature never changes a row's argmax, so BBSE and
    the prior test are unaffected.
    """
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(temperature, dtype=np.float64)
    if np.all(t == 1.0):
        return p
    t = t[:, None] if t.ndim == 1 else t
    return np.exp(log_softmax(np.log(np.maximum(p, _MIN_PROB)) / t, axis=1))


def confusion_given_label(labels: np.ndarray, predicted: np.ndarray, num_classes: int
                          ) -> np.ndarray:
    """``M[i, j] = P(ŷ = i | y = j)`` ``(C, C)``; a class without rows gets the identity column."""
    m = np.zeros((num_classes, num_classes))
    np.add.at(m, (predicted, labels), 1.0)
    totals = m.sum(axis=0)
    m[:, totals == 0] = np.eye(num_classes)[:, totals == 0]
    return m / m.sum(axis=0, keepdims=True)


def bbse_prior(confusion: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """BBSE estimate of the target prior ``(C,)`` from served predicted labels ``(N,)``.

    Solves ``min ||M π − q||²`` with ``0 ≤ π ≤ 1`` (``scipy.optimize.lsq_linear``), then
    normalises: the unconstrained inverse of Lipton et al. can go negative in small windows.
    """
    c = confusion.shape[0]
    q = np.bincount(predicted, minlength=c) / max(len(predicted), 1)
    pi = lsq_linear(confusion, q, bounds=(0.0, 1.0)).x
    s = pi.sum()
    return pi / s if s > 0 else np.full(c, 1.0 / c)


def em_prior(probs: np.ndarray, source_prior: np.ndarray, tol: float = 1e-8,
             max_iter: int = 1000) -> np.ndarray:
    """Saerens et al. (2002) EM estimate of the target prior ``(C,)``.

    Args:
        probs: ``(N, C)`` calibrated posteriors under ``source_prior`` ``(C,)``.
    """
    p = np.asarray(probs, dtype=np.float64)
    src = np.asarray(source_prior, dtype=np.float64) / np.sum(source_prior)
    src = np.where(src > 0, src, 1e-12)
    pi = src.copy()
    for _ in range(max_iter):
        w = p * (pi / src)
        w /= w.sum(axis=1, keepdims=True)
        new = w.mean(axis=0)
        if np.abs(new - pi).max() < tol:
            return new
        pi = new
    return pi


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """½ Σ |p − q| of two distributions (both normalised here)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    return 0.5 * float(np.abs(p / p.sum() - q / q.sum()).sum())


def bootstrap_priors(window_probs: np.ndarray, ref_labels: np.ndarray, ref_probs: np.ndarray,
                     source_prior: np.ndarray, n_boot: int = 200, seed: int = 0
                     ) -> dict[str, np.ndarray]:
    """Bootstrap replicates ``(n_boot, C)`` of both estimators.

    Each replicate resamples the window's rows; BBSE's replicates also resample the reference
    rows within each class, so the CI covers the confusion matrix's own estimation error.
    """
    rng = np.random.default_rng(seed)
    n, c = window_probs.shape
    win_pred = window_probs.argmax(axis=1)
    ref_pred = ref_probs.argmax(axis=1)
    by_class = [np.flatnonzero(ref_labels == k) for k in range(c)]
    out = {"bbse": np.empty((n_boot, c)), "em": np.empty((n_boot, c))}
    for b in range(n_boot):
        rows = rng.integers(0, n, n)
        ref_rows = np.concatenate([rng.choice(ix, len(ix)) for ix in by_class if len(ix)])
        m = confusion_given_label(ref_labels[ref_rows], ref_pred[ref_rows], c)
        out["bbse"][b] = bbse_prior(m, win_pred[rows])
        out["em"][b] = em_prior(window_probs[rows], source_prior, tol=1e-6, max_iter=200)
    return out


def prior_unchanged_test(window_predicted: np.ndarray, reference_predicted: np.ndarray,
                         num_classes: int) -> tuple[float, float]:
    """χ² test of homogeneity of predicted-label counts: (statistic, p-value).

    ``reference_predicted`` must be a held-out sample *at the prior under test* (see
    ``reference.stratified_sample``), so both rows of the table are samples of the same
    distribution under H0. Classes predicted in neither sample are dropped.
    """
    table = np.stack([np.bincount(window_predicted, minlength=num_classes),
                      np.bincount(reference_predicted, minlength=num_classes)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 0.0, 1.0
    res = chi2_contingency(table, correction=False)
    return float(res.statistic), float(res.pvalue)
