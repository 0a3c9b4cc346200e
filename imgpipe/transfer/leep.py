"""LEEP: the log expected empirical prediction of a source classifier on the target labels.

Nguyen, Hassner, Seeger, Archambeau, "LEEP: A New Measure to Evaluate Transferability of
Learned Representations", ICML 2020. With θ(x) the source model's softmax over its K source
classes, the empirical joint is P̂(y, z) = (1/N) Σ_i θ(x_i)_z [y_i = y], the conditional
P̂(y | z) = P̂(y, z) / P̂(z), and

    LEEP = (1/N) Σ_i log Σ_z P̂(y_i | z) θ(x_i)_z        (≤ 0; higher is better).

The class-balanced variant weights row i by 1/n_{y_i} in both the joint and the average.
"""

from __future__ import annotations

import numpy as np
from scipy.special import softmax


def _row_weights(labels: np.ndarray, balanced: bool) -> np.ndarray:
    if not balanced:
        return np.full(len(labels), 1.0 / len(labels))
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inverse].astype(np.float64)
    return w / w.sum()


def leep_from_probs(source_probs: np.ndarray, labels: np.ndarray,
                    balanced: bool = False) -> float:
    """LEEP from source-class probabilities ``(N, K)`` (rows sum to 1) and labels ``(N,)``.

    Raises:
        ValueError: shapes that do not match, or probabilities that are not distributions.
    """
    theta = np.asarray(source_probs, dtype=np.float64)
    y = np.asarray(labels)
    if theta.ndim != 2 or y.ndim != 1 or len(theta) != len(y) or len(y) == 0:
        raise ValueError(f"source_probs (N, K) and labels (N,) expected, got {theta.shape}, "
                         f"{y.shape}")
    if (theta < 0).any() or not np.allclose(theta.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("source_probs rows must be probability distributions")
    classes, y_idx = np.unique(y, return_inverse=True)
    w = _row_weights(y, balanced)
    onehot = np.eye(len(classes))[y_idx]  # (N, C)
    joint = onehot.T @ (theta * w[:, None])  # (C, K): P̂(y, z)
    p_z = joint.sum(axis=0, keepdims=True)
    cond = np.divide(joint, p_z, out=np.zeros_like(joint), where=p_z > 0)  # P̂(y | z)
    eep = (theta * cond[y_idx]).sum(axis=1)  # Σ_z P̂(y_i|z) θ_iz
    return float((w * np.log(np.maximum(eep, 1e-300))).sum())


def leep(source_logits: np.ndarray, labels: np.ndarray, balanced: bool = False) -> float:
    """LEEP from source-head logits ``(N, K)``; see ``leep_from_probs``."""
    return leep_from_probs(softmax(np.asarray(source_logits, np.float64), axis=1), labels,
                           balanced)
