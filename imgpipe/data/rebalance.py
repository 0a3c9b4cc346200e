"""Class counts, class-weight schemes and per-epoch resampling plans.

Resampling is a per-row repeat count drawn from ``(seed, epoch, row id)`` only, so it is the
same whatever the batching, block order or worker that sees the row, and a new epoch redraws it.
"""

from __future__ import annotations

import hashlib

import numpy as np

from imgpipe.config.specs import SamplerSpec, WeightSpec, parse_class_weights, parse_sampler


def check_class_counts(class_counts: np.ndarray | list[int]) -> np.ndarray:
    """Per-class training counts as float64 ``(C,)``.

    Raises:
        ValueError: fewer than 2 classes, a count that is negative or not finite, or all 0.
    """
    n = np.asarray(class_counts, dtype=np.float64)
    if n.ndim != 1 or n.size < 2:
        raise ValueError(f"class_counts: expected one count per class (>= 2), got shape {n.shape}")
    if not np.isfinite(n).all() or (n < 0).any() or n.sum() <= 0:
        raise ValueError(f"class_counts: need finite counts >= 0, not all 0, got {n.tolist()}")
    return n


def class_prior(class_counts: np.ndarray | list[int]) -> np.ndarray:
    """Training class prior ``n_c / Σn`` ``(C,)`` with zero-count classes counted as one example.

    The floor keeps ``log(prior)`` finite (no -inf/NaN in logit adjustment); a class absent
    from training is thus adjusted like a 1-shot class.

    Raises:
        ValueError: as :func:`check_class_counts`.
    """
    n = check_class_counts(class_counts)
    return np.where(n > 0, n, 1.0) / n.sum()


def class_weights(counts: np.ndarray | list[int], spec: WeightSpec | str) -> np.ndarray:
    """Per-class loss weights with mean 1 (classes with zero count get weight 0 before scaling).

    Raises ValueError when an explicit vector's length differs from the class count.
    """
    if isinstance(spec, str):
        spec = parse_class_weights(spec)
    n = np.asarray(counts, dtype=np.float64)
    if spec.scheme == "none":
        w = np.ones_like(n)
    elif spec.scheme == "power":
        w = np.where(n > 0, np.maximum(n, 1) ** -spec.beta, 0.0)
    elif spec.scheme == "effective":
        # Cui et al. 2019: effective number E_n = (1 - β^n) / (1 - β); weight ∝ 1 / E_n.
        beta = spec.beta
        w = np.where(n > 0, (1.0 - beta) / (1.0 - np.power(beta, n)), 0.0) if beta > 0 else (
            np.where(n > 0, 1.0, 0.0))
    else:
        if len(spec.vector) != len(n):
            raise ValueError(
                f"class_weights: explicit vector has {len(spec.vector)} values, "
                f"the data has {len(n)} classes"
            )
        w = np.asarray(spec.vector, dtype=np.float64)
    return w * (len(w) / w.sum())


def sampling_rates(counts: np.ndarray | list[int], spec: SamplerSpec | str) -> np.ndarray:
    """Expected copies per row of each class in one epoch.

    oversample → every class to the head count; undersample → to the tail count; sqrt →
    proportions ∝ n^0.5 with the epoch size unchanged; explicit → the given distribution with the
    epoch size unchanged. Classes absent from the data get rate 0.
    """
    if isinstance(spec, str):
        spec = parse_sampler(spec)
    n = np.asarray(counts, dtype=np.float64)
    present = n > 0
    safe = np.where(present, n, 1.0)
    if spec.strategy == "none":
        rates = np.ones_like(n)
    elif spec.strategy == "oversample":
        rates = n.max() / safe
    elif spec.strategy == "undersample":
        rates = n[present].min() / safe
    else:
        if spec.strategy == "sqrt":
            target = np.sqrt(n)
        else:
            if len(spec.target) != len(n):
                raise ValueError(
                    f"sampler: target distribution has {len(spec.target)} values, "
                    f"the data has {len(n)} classes"
                )
            target = np.asarray(spec.target, dtype=np.float64)
            if np.any((target > 0) & ~present):
                raise ValueError("sampler: target puts mass on a class with no training rows")
        target = np.where(present, target, 0.0)
        rates = n.sum() * target / target.sum() / safe
    return np.where(present, rates, 0.0)


def expected_epoch_counts(counts: np.ndarray | list[int], rates: np.ndarray) -> np.ndarray:
    return np.asarray(counts, dtype=np.float64) * rates


def id_hashes(ids: list[str] | np.ndarray) -> np.ndarray:
    """Stable uint64 per row id (independent of Python's hash randomisation)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little")
         for i in ids),
        dtype=np.uint64, count=len(ids),
    )


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def row_uniforms(hashes: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Uniform [0, 1) per row, a pure function of (row hash, seed, epoch)."""
    with np.errstate(over="ignore"):
        key = np.uint64((seed * 0x632BE59BD9B4E019 + epoch * 0x8CB92BA72F3D8DD7 + 1) % 2**64)
        z = _splitmix64(hashes ^ _splitmix64(np.asarray([key], dtype=np.uint64))[0])
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


def repeat_counts(labels: np.ndarray, hashes: np.ndarray, rates: np.ndarray,
                  seed: int, epoch: int) -> np.ndarray:
    """Copies of each row this epoch: ``floor(r) + Bernoulli(frac(r))`` — mean r, variance ≤ 1/4.

    Lower variance than a Poisson bootstrap, so a 1-image tail class oversampled ×100 gets
    exactly 100 copies instead of anywhere between 80 and 120.
    """
    r = rates[np.asarray(labels, dtype=np.int64)]
    base = np.floor(r)
    extra = row_uniforms(hashes, seed, epoch) < (r - base)
    return (base + extra).astype(np.int64)


def effective_prior(counts: np.ndarray | list[int], rates: np.ndarray | None = None,
                    weights: np.ndarray | None = None, tau: float = 0.0) -> np.ndarray:
    """The class prior a model trained this way implicitly predicts for.

    Resampling and loss weights scale each class's share of the training signal; logit
    adjustment with τ divides the prior by n^τ (τ=1 → balanced). Used for prior correction.
    """
    n = np.asarray(counts, dtype=np.float64)
    q = n * (rates if rates is not None else 1.0) * (weights if weights is not None else 1.0)
    q = q * np.where(n > 0, np.maximum(n, 1.0) ** -tau, 0.0)
    return q / q.sum()
