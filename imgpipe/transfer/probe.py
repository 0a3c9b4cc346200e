"""Probes on frozen features, scored on the (balanced) validation split with scikit-learn.

- k-NN: cosine k nearest training rows; the plain vote counts neighbours, the class-balanced
  vote weights each neighbour by 1/n_class (train counts), so the head classes' density does
  not outvote a tail class that is locally closer.
- Linear probe: standardised features → multinomial logistic regression (scikit-learn
  ``LogisticRegression``); the balanced variant uses ``class_weight="balanced"``.

Both report scikit-learn's ``balanced_accuracy_score`` (mean per-class recall) on val.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

DEFAULT_K = 10


def _check(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
           val_y: np.ndarray) -> None:
    if train_x.ndim != 2 or val_x.ndim != 2 or train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"features (N, D) with one D expected, got {train_x.shape}, "
                         f"{val_x.shape}")
    if len(train_x) != len(train_y) or len(val_x) != len(val_y) or not len(val_y):
        raise ValueError("features and labels differ in length (or val is empty)")


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, query_x: np.ndarray,
                k: int = DEFAULT_K, balanced: bool = False) -> np.ndarray:
    """Cosine k-NN labels ``(M,)``: plain majority vote, or votes weighted by 1/n_class.

    Ties go to the smallest class index. ``k`` is capped at the number of training rows.
    """
    classes, y_idx, counts = np.unique(train_y, return_inverse=True, return_counts=True)
    k = max(1, min(k, len(train_x)))
    nn = NearestNeighbors(n_neighbors=k, metric="cosine").fit(train_x)
    neighbours = nn.kneighbors(query_x, return_distance=False)  # (M, k)
    votes = np.zeros((len(query_x), len(classes)))
    weight = 1.0 / counts if balanced else np.ones(len(classes))
    rows = np.repeat(np.arange(len(query_x)), k)
    np.add.at(votes, (rows, y_idx[neighbours].ravel()), weight[y_idx[neighbours].ravel()])
    return classes[votes.argmax(axis=1)]


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                 val_y: np.ndarray, k: int = DEFAULT_K, balanced: bool = False) -> float:
    """Balanced accuracy on val of the cosine k-NN classifier (see ``knn_predict``)."""
    _check(train_x, train_y, val_x, val_y)
    return float(balanced_accuracy_score(val_y, knn_predict(train_x, train_y, val_x, k,
                                                            balanced)))


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                          val_y: np.ndarray, balanced: bool = False, c: float = 1.0,
                          seed: int = 0) -> float:
    """Balanced accuracy on val of a logistic-regression probe on standardised features.

    ``balanced`` sets ``class_weight="balanced"`` (weights n / (C · n_c)).
    """
    _check(train_x, train_y, val_x, val_y)
    clf = make_pipeline(StandardScaler(), LogisticRegression(
        C=c, max_iter=500, class_weight="balanced" if balanced else None, random_state=seed))
    clf.fit(train_x, train_y)
    return float(balanced_accuracy_score(val_y, clf.predict(val_x)))
