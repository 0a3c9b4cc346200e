"""NCE: negative conditional entropy of the target labels given source labels.

Tran, Nguyen, Hassner, "Transferability and Hardness of Supervised Classification Tasks",
ICCV 2019: NCE(Y | Z) = −H(Y | Z) = Σ_{y,z} P̂(y, z) log P̂(y | z)  (≤ 0; higher is better).
The source labels Z of target images are the source model's argmax predictions ("dummy
labels", as in Nguyen et al. 2020). The class-balanced variant weights row i by 1/n_{y_i}.
"""

from __future__ import annotations

import numpy as np

from imgpipe.transfer.leep import _row_weights


def nce_from_labels(source_labels: np.ndarray, labels: np.ndarray,
                    balanced: bool = False) -> float:
    """NCE from per-row source labels ``(N,)`` and target labels ``(N,)`` (nats).

    Raises:
        ValueError: shapes that differ or are empty.
    """
    z = np.asarray(source_labels)
    y = np.asarray(labels)
    if z.ndim != 1 or y.ndim != 1 or len(z) != len(y) or len(y) == 0:
        raise ValueError(f"source_labels (N,) and labels (N,) expected, got {z.shape}, {y.shape}")
    _, y_idx = np.unique(y, return_inverse=True)
    _, z_idx = np.unique(z, return_inverse=True)
    joint = np.zeros((y_idx.max() + 1, z_idx.max() + 1))
    np.add.at(joint, (y_idx, z_idx), _row_weights(y, balanced))
    p_z = joint.sum(axis=0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log((joint / p_z)[nz])).sum())


def nce(source_logits: np.ndarray, labels: np.ndarray, balanced: bool = False) -> float:
    """NCE with dummy labels: ``argmax`` of the source-head logits ``(N, K)``."""
    return nce_from_labels(np.asarray(source_logits).argmax(axis=1), labels, balanced)
