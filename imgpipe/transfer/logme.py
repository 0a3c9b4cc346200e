"""LogME: the log marginal evidence of a Bayesian linear model on frozen features.

You, Liu, Wang, Long, "LogME: Practical Assessment of Pre-trained Models for Transfer
Learning", ICML 2021. For each class k, the one-hot target column ``y_k`` is modelled as
``y = F w + ε`` with prior ``w ~ N(0, α⁻¹ I)`` and noise ``ε ~ N(0, β⁻¹ I)``; α and β maximise
the evidence by MacKay's fixed-point updates (Bishop, PRML §3.5.2), and the score is the mean
over classes of the maximised log evidence divided by N. Higher is better.

The class-balanced variant gives sample i the noise precision ``β·w_i`` with
``w_i = N / (C · n_{y_i})``: every class carries the same total weight, so a backbone that only
separates the head classes no longer wins on the head classes' sheer number of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MAX_ITER = 100
_TOL = 1e-5


@dataclass(frozen=True)
class _Spectrum:
    """Eigen-decomposition of FᵀF, shared by every class's fixed point."""

    features: np.ndarray  # (N, D) float64
    eigvals: np.ndarray  # (D,) eigenvalues of FᵀF (zeros past rank)
    eigvecs: np.ndarray  # (D, D) columns: eigenvectors


def _spectrum(features: np.ndarray) -> _Spectrum:
    f = np.asarray(features, dtype=np.float64)
    _, sigma, vt = np.linalg.svd(f, full_matrices=True)
    eig = np.zeros(f.shape[1])
    eig[: len(sigma)] = sigma**2
    return _Spectrum(f, eig, vt.T)


def _posterior_mean(sp: _Spectrum, y: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    z = sp.eigvecs.T @ (sp.features.T @ y)  # (D,)
    return sp.eigvecs @ (beta * z / (alpha + beta * sp.eigvals))


def _evidence(sp: _Spectrum, y: np.ndarray, alpha: float, beta: float) -> float:
    """log p(y | F, α, β) for an isotropic noise precision β (PRML eq. 3.86)."""
    n, d = sp.features.shape
    m = _posterior_mean(sp, y, alpha, beta)
    resid = float(((y - sp.features @ m) ** 2).sum())
    return (d / 2 * np.log(alpha) + n / 2 * np.log(beta)
            - 0.5 * float(np.log(alpha + beta * sp.eigvals).sum())
            - beta / 2 * resid - alpha / 2 * float(m @ m) - n / 2 * np.log(2 * np.pi))


def log_evidence(features: np.ndarray, y: np.ndarray, alpha: float, beta: float,
                 sample_weight: np.ndarray | None = None) -> float:
    """log p(y | F, α, β) of the Bayesian linear model, in nats.

    Args:
        features: ``(N, D)``; y: ``(N,)`` real targets; alpha, beta: prior and noise precision.
        sample_weight: optional ``(N,)`` positive weights: the noise precision of row i is
            ``β·w_i`` (heteroscedastic); None means all 1.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if sample_weight is None:
        return _evidence(_spectrum(f), y, alpha, beta)
    r = np.sqrt(np.asarray(sample_weight, dtype=np.float64))
    # Scaling the rows by √w turns the weighted model into an isotropic one; the
    # Jacobian of that change of variables adds ½ Σ log w_i.
    return _evidence(_spectrum(f * r[:, None]), y * r, alpha, beta) + 0.5 * float(
        np.log(sample_weight).sum())


def maximize_evidence(sp: _Spectrum, y: np.ndarray) -> tuple[float, float, float]:
    """MacKay's fixed point for (α, β); returns (α, β, log evidence)."""
    n = sp.features.shape[0]
    alpha, beta = 1.0, 1.0
    for _ in range(_MAX_ITER):
        gamma = float((beta * sp.eigvals / (alpha + beta * sp.eigvals)).sum())
        m = _posterior_mean(sp, y, alpha, beta)
        mm = max(float(m @ m), 1e-12)
        resid = max(float(((y - sp.features @ m) ** 2).sum()), 1e-12)
        new_alpha, new_beta = gamma / mm, max(n - gamma, 1e-12) / resid
        done = (abs(new_alpha - alpha) <= _TOL * alpha and abs(new_beta - beta) <= _TOL * beta)
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return alpha, beta, _evidence(sp, y, alpha, beta)


def class_balance_weights(labels: np.ndarray) -> np.ndarray:
    """``w_i = N / (C · n_{y_i})`` over the C classes present: mean 1, equal weight per class."""
    labels = np.asarray(labels)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return len(labels) / (len(classes) * counts[inverse].astype(np.float64))


def logme(features: np.ndarray, labels: np.ndarray, balanced: bool = False) -> float:
    """LogME score: mean over classes of max log evidence / N (You et al. 2021).

    Args:
        features: ``(N, D)`` frozen features; labels: ``(N,)`` class indices.
        balanced: weight classes equally (noise precision ∝ 1/n_class; see module docstring).
    Returns:
        The score (higher = better transfer). Comparable across candidates on one target.
    Raises:
        ValueError: mismatched lengths, fewer than 2 rows or 2 classes.
    """
    f, y = _check(features, labels)
    w = class_balance_weights(y) if balanced else None
    if w is not None:
        f = f * np.sqrt(w)[:, None]
    sp = _spectrum(f)
    scores = []
    for c in np.unique(y):
        target = (y == c).astype(np.float64)
        if w is not None:
            target = target * np.sqrt(w)
        scores.append(maximize_evidence(sp, target)[2])
    const = 0.5 * float(np.log(w).sum()) if w is not None else 0.0
    return float(np.mean(scores) + const) / len(y)


def _check(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or y.ndim != 1 or len(f) != len(y):
        raise ValueError(f"features (N, D) and labels (N,) expected, got {f.shape} and {y.shape}")
    if len(y) < 2 or len(np.unique(y)) < 2:
        raise ValueError("need at least 2 rows and 2 classes")
    if not np.isfinite(f).all():
        raise ValueError("features hold NaN or inf")
    return f, y
