"""Data drift on embeddings: a kernel two-sample test against the bundle's reference sample.

Statistic: the (biased) squared maximum mean discrepancy with a Gaussian kernel whose width is
the median pairwise distance of the pooled sample (Gretton et al., JMLR 2012), computed from
scikit-learn's ``rbf_kernel``. p-value: a permutation test, ``scipy.stats.permutation_test``
(``(b + 1) / (R + 1)``; valid at any sample size when the two samples are exchangeable under H0).

Why not a drift library: alibi-detect's MMDDrift (the first choice: the same test, maintained)
and frouros pin numpy/scipy/matplotlib/pillow versions below this project's, nannyml pulls
gradient-boosting and cloud SDKs for tabular monitoring, and evidently installs a web stack
and usage telemetry. scikit-learn and SciPy are already dependencies and well kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import permutation_test
from sklearn.metrics.pairwise import pairwise_distances, rbf_kernel


@dataclass(frozen=True)
class DriftResult:
    statistic: float  # MMD², kernel units
    p_value: float
    bandwidth: float  # median pairwise distance
    n_window: int
    n_reference: int


def mmd_permutation_test(window: np.ndarray, reference: np.ndarray, n_permutations: int = 500,
                         seed: int = 0) -> DriftResult:
    """Two-sample MMD² test of ``window (n, D)`` against ``reference (m, D)``.

    Raises:
        ValueError: fewer than 2 rows in either sample, or different feature sizes.
    """
    x = np.asarray(window, dtype=np.float64)
    y = np.asarray(reference, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or len(x) < 2 or len(y) < 2:
        raise ValueError(f"need (n>=2, D) and (m>=2, D) samples, got {x.shape} and {y.shape}")
    pooled = np.concatenate([x, y])
    d = pairwise_distances(pooled)
    bandwidth = float(np.median(d[np.triu_indices_from(d, k=1)])) or 1.0
    k = rbf_kernel(pooled, gamma=1.0 / (2.0 * bandwidth**2))
    row_sums, total = k.sum(axis=1), k.sum()
    n, m = len(x), len(y)
    # The smaller sample is gathered (|a|² entries per permutation); the rest follows from sums.
    small_first = n <= m

    def mmd2(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        single = np.ndim(a) == 1
        a = np.atleast_2d(a).astype(np.int64)
        s_aa = k[a[:, :, None], a[:, None, :]].sum(axis=(1, 2))
        s_ab = row_sums[a].sum(axis=1) - s_aa
        s_bb = total - s_aa - 2 * s_ab
        na, nb = a.shape[1], len(pooled) - a.shape[1]
        out = s_aa / na**2 + s_bb / nb**2 - 2 * s_ab / (na * nb)
        return out[0] if single else out

    ix, iy = np.arange(n), np.arange(n, n + m)
    data = (ix, iy) if small_first else (iy, ix)
    res = permutation_test(data, mmd2, permutation_type="independent", vectorized=True,
                           n_resamples=n_permutations, alternative="greater", batch=16,
                           rng=np.random.default_rng(seed))
    return DriftResult(float(res.statistic), float(res.pvalue), bandwidth, n, m)
