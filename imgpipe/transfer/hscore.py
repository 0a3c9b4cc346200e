"""H-score of features for a labelling, with Ledoit-Wolf shrinkage of the feature covariance.

Bao, Li, Huang, Zheng, Wang, Zhang, "An Information-Theoretic Approach to Transferability in
Task Transfer Learning", ICIP 2019:  H(f) = tr(cov(f)⁻¹ cov(E[f | y])).
The sample covariance of high-dimensional features is ill-conditioned for small N; Ibrahim,
Ponomareva, Mazumder, "Newer is not always better: Rethinking transferability metrics, their
peculiarities, stability and performance", ECML-PKDD 2022, replace it by the Ledoit-Wolf
estimate Σ_α = (1−α)·cov(f) + α·μI (scikit-learn's ``LedoitWolf``) and scale the between-class
covariance by (1−α):   H_α(f) = tr(Σ_α⁻¹ (1−α) cov(E[f | y])).  Higher is better.

The class-balanced variant weights the class means equally in cov(E[f | y]) (instead of by
their row counts), so separating the tail classes counts as much as separating the head.
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import LedoitWolf


def between_class_covariance(features: np.ndarray, labels: np.ndarray,
                             balanced: bool = False) -> np.ndarray:
    """cov(E[f | y]) ``(D, D)``: class means weighted by class frequency, or equally."""
    f = np.asarray(features, dtype=np.float64)
    classes, y_idx, counts = np.unique(labels, return_inverse=True, return_counts=True)
    means = np.zeros((len(classes), f.shape[1]))
    np.add.at(means, y_idx, f)
    means /= counts[:, None]
    p = np.full(len(classes), 1 / len(classes)) if balanced else counts / counts.sum()
    centred = means - p @ means
    return (centred * p[:, None]).T @ centred


def hscore(features: np.ndarray, labels: np.ndarray, balanced: bool = False,
           shrinkage: float | None = None) -> float:
    """Shrinkage-regularised H-score (Ibrahim et al. 2022).

    Args:
        features: ``(N, D)``; labels: ``(N,)``.
        balanced: weight classes equally in the between-class covariance.
        shrinkage: fixed α in [0, 1]; None estimates it (Ledoit-Wolf). α = 0 gives Bao et al.'s
            original H-score (with a pseudo-inverse).
    Raises:
        ValueError: mismatched shapes, fewer than 2 classes, α outside [0, 1].
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or y.ndim != 1 or len(f) != len(y) or len(np.unique(y)) < 2:
        raise ValueError(f"features (N, D) and labels (N,) with >= 2 classes expected, got "
                         f"{f.shape}, {y.shape}")
    f = f - f.mean(axis=0)
    if shrinkage is None:
        lw = LedoitWolf(assume_centered=True).fit(f)
        alpha, cov_f = float(lw.shrinkage_), lw.covariance_
    else:
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        emp = f.T @ f / len(f)
        mu = np.trace(emp) / f.shape[1]
        alpha, cov_f = shrinkage, (1 - shrinkage) * emp + shrinkage * mu * np.eye(f.shape[1])
    cov_g = between_class_covariance(f, y, balanced)
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-10, hermitian=True) @ cov_g)
                 * (1 - alpha))
