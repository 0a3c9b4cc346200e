"""Imbalance-aware classification losses and the ``create_loss`` factory.

Every loss is an ``nn.Module`` mapping ``logits (N, C)`` and ``targets (N,)`` int64 (or soft
``(N, C)`` probabilities, below) to a scalar.
Per-class tensors (weights, log-prior) are buffers, so ``loss.to(device)`` moves them.

Reduction (all losses): torch's weighted mean ``Σ_i ℓ_i / Σ_i w_{y_i}``, where ``ℓ_i`` already
carries the weights. With label smoothing ε the per-sample term is, as in
``F.cross_entropy(weight=w, label_smoothing=ε)``::

    ℓ_i = (1 - ε) · w_{y_i} · m_{i,y_i} · (-log p_{i,y_i})
          + (ε / C) · Σ_c w_c · m_{i,c} · (-log p_{i,c})

with the focal modulation ``m_{i,c} = (1 - p_{i,c})^γ`` (``m = 1`` for cross-entropy). Dividing
by ``Σ w_{y_i}`` keeps the loss scale independent of the weight vector, and makes focal with
γ=0 exactly the weighted cross-entropy. A batch whose targets all have weight 0 gives loss 0.

Soft targets (MixUp / CutMix): ``targets`` may also be ``(N, C)`` class probabilities ``q``.
The one-hot term becomes ``Σ_c q_{i,c} · w_c · m_{i,c} · (-log p_{i,c})`` and the normaliser
``Σ_i Σ_c q_{i,c} w_c``, so a one-hot ``q`` gives exactly the hard-label loss and a MixUp
target ``λ e_a + (1-λ) e_b`` gives ``λ ℓ(a) + (1-λ) ℓ(b)`` per sample (Zhang et al. 2018).
Every loss (weighted CE, focal, logit-adjusted, label smoothing, DRW) takes both forms.

Deferred re-weighting (Cao et al. 2019): with ``drw_epoch=k`` the weights are all 1 until
``set_epoch(k)``; the trainer calls ``set_epoch`` on the loss at the start of every epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imgpipe.config import LossConfig
from imgpipe.data.rebalance import check_class_counts, class_prior, class_weights

log = logging.getLogger(__name__)

# (1 - p)^γ is clamped away from 0: d/dx x^γ is infinite at 0 for γ < 1 and would turn the
# (zero) chain-rule factor into NaN for a sample predicted with probability exactly 1.
_MIN_ONE_MINUS_P = 1e-12


def _as_vector(values: Sequence[float] | np.ndarray | Tensor, what: str) -> Tensor:
    t = torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32)
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(f"{what}: expected one value per class (>= 2), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"{what}: values must be finite and >= 0, got {t.tolist()}")
    return t


def imbalanced_cross_entropy(logits: Tensor, targets: Tensor, weight: Tensor | None = None,
                             label_smoothing: float = 0.0, gamma: float = 0.0) -> Tensor:
    """Weighted, label-smoothed, optionally focal cross-entropy (see module docstring).

    Args:
        logits: (N, C) raw scores (any float dtype; computed in float32).
        targets: (N,) int64 class indices, or (N, C) class probabilities (rows sum to 1).
        weight: (C,) per-class weights, or None for all ones.
        label_smoothing: ε in [0, 1).
        gamma: focal exponent γ >= 0 (0 = cross-entropy).
    Returns:
        Scalar loss.
    Raises:
        ValueError: shapes that do not match, or soft targets that are not probabilities.
    """
    soft = targets.ndim == 2
    if targets.ndim not in (1, 2) or logits.ndim != 2 or targets.shape[0] != logits.shape[0] or (
            soft and targets.shape != logits.shape):
        raise ValueError(
            f"expected logits (N, C) and targets (N,) or (N, C), got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    num_classes = logits.shape[1]
    logp = F.log_softmax(logits.float(), dim=1)  # (N, C)
    per_class = -logp  # (N, C): -log p_c for every class
    if gamma > 0:
        # -expm1(log p) is 1 - p without cancellation when p is close to 1.
        one_minus_p = (-torch.expm1(logp)).clamp_min(_MIN_ONE_MINUS_P)
        per_class = per_class * one_minus_p.pow(gamma)
    if weight is None:
        weight = torch.ones(num_classes, device=logits.device)
    elif weight.shape != (num_classes,):
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}, logits have {num_classes} classes"
        )
    per_class = per_class * weight  # (N, C)
    if soft:
        q = _check_soft_targets(targets)
        loss = (per_class * q).sum(1)  # (N,)
        norm = (q * weight).sum()
    else:
        loss = per_class.gather(1, targets[:, None]).squeeze(1)  # (N,)
        norm = weight[targets].sum()
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * loss + (label_smoothing / num_classes) * per_class.sum(1)
    # Σ w_y can be 0 only if every target is a zero-weight class; clamp to give loss 0, not NaN.
    return loss.sum() / norm.clamp_min(torch.finfo(torch.float32).tiny)


def _check_soft_targets(targets: Tensor) -> Tensor:
    q = targets.float()
    if not torch.isfinite(q).all() or (q < 0).any() or not torch.allclose(
            q.sum(1), torch.ones_like(q[:, 0]), atol=1e-4):
        raise ValueError("soft targets must be finite, >= 0, and each row must sum to 1")
    return q


class ImbalanceLoss(nn.Module):
    """Base: per-class weights (a buffer), label smoothing, focal γ and deferred re-weighting."""

    weight: Tensor

    def __init__(self, weight: Sequence[float] | np.ndarray | Tensor | None = None,
                 label_smoothing: float = 0.0, drw_epoch: int | None = None,
                 gamma: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if drw_epoch is not None and drw_epoch < 0:
            raise ValueError(f"drw_epoch must be >= 0 or None, got {drw_epoch}")
        self.register_buffer("weight", None if weight is None else _as_vector(weight, "weight"))
        self.label_smoothing = float(label_smoothing)
        self.gamma = float(gamma)
        self.drw_epoch = drw_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss which epoch starts (switches deferred re-weighting on at ``drw_epoch``)."""
        self.epoch = int(epoch)

    @property
    def weights_active(self) -> bool:
        """Whether the class weights apply this epoch (always, unless DRW defers them)."""
        return self.drw_epoch is None or self.epoch >= self.drw_epoch

    def current_weight(self) -> Tensor | None:
        """The weight vector in force this epoch, or None (all ones)."""
        return self.weight if self.weights_active else None

    def adjust_logits(self, logits: Tensor) -> Tensor:
        return logits

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return imbalanced_cross_entropy(self.adjust_logits(logits), targets,
                                        self.current_weight(), self.label_smoothing, self.gamma)

    def extra_repr(self) -> str:
        return (f"label_smoothing={self.label_smoothing}, gamma={self.gamma}, "
                f"drw_epoch={self.drw_epoch}, epoch={self.epoch}")


class WeightedCrossEntropy(ImbalanceLoss):
    """Cross-entropy with per-class weights and label smoothing (torch's semantics)."""

    def __init__(self, weight: Sequence[float] | np.ndarray | Tensor | None = None,
                 label_smoothing: float = 0.0, drw_epoch: int | None = None) -> None:
        super().__init__(weight, label_smoothing, drw_epoch, gamma=0.0)


class FocalLoss(ImbalanceLoss):
    """Focal loss (Lin et al. 2017): ``-α_y (1 - p_y)^γ log p_y``, α = the per-class weights.

    Label smoothing applies the modulation per class to the smoothed target (γ=0 gives
    label-smoothed weighted cross-entropy). Normalised by ``Σ α_y`` like the other losses.
    """

    def __init__(self, alpha: Sequence[float] | np.ndarray | Tensor | None = None,
                 gamma: float = 2.0, label_smoothing: float = 0.0,
                 drw_epoch: int | None = None) -> None:
        super().__init__(alpha, label_smoothing, drw_epoch, gamma=gamma)


class LogitAdjustedCrossEntropy(ImbalanceLoss):
    """Logit-adjusted cross-entropy (Menon et al. 2021): CE on ``logits + τ·log(prior)``.

    τ=1 is balanced softmax (Ren et al. 2020). The adjustment is part of the training
    objective only: predict with the raw logits, which then estimate the balanced posterior.
    Combines with class weights, label smoothing and DRW like ``WeightedCrossEntropy``.
    """

    log_prior: Tensor

    def __init__(self, prior: Sequence[float] | np.ndarray | Tensor, tau: float = 1.0,
                 weight: Sequence[float] | np.ndarray | Tensor | None = None,
                 label_smoothing: float = 0.0, drw_epoch: int | None = None) -> None:
        super().__init__(weight, label_smoothing, drw_epoch, gamma=0.0)
        p = _as_vector(prior, "prior")
        if (p <= 0).any():
            raise ValueError("prior: every class needs a positive prior (see class_prior)")
        if tau < 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        if self.weight is not None and self.weight.numel() != p.numel():
            raise ValueError(f"weight has {self.weight.numel()} classes, prior {p.numel()}")
        self.tau = float(tau)
        self.register_buffer("log_prior", torch.log(p / p.sum()))

    def adjust_logits(self, logits: Tensor) -> Tensor:
        return logits.float() + self.tau * self.log_prior

    def extra_repr(self) -> str:
        return f"tau={self.tau}, " + super().extra_repr()


LossBuilder = Callable[[LossConfig, np.ndarray, np.ndarray], ImbalanceLoss]


def _build_ce(cfg: LossConfig, weights: np.ndarray, counts: np.ndarray) -> ImbalanceLoss:
    return WeightedCrossEntropy(weights, cfg.label_smoothing, cfg.drw_epoch)


def _build_focal(cfg: LossConfig, weights: np.ndarray, counts: np.ndarray) -> ImbalanceLoss:
    return FocalLoss(weights, cfg.focal_gamma, cfg.label_smoothing, cfg.drw_epoch)


def _build_logit_adjusted(cfg: LossConfig, weights: np.ndarray,
                          counts: np.ndarray) -> ImbalanceLoss:
    return LogitAdjustedCrossEntropy(class_prior(counts), cfg.tau, weights,
                                     cfg.label_smoothing, cfg.drw_epoch)


_LOSSES: dict[str, LossBuilder] = {
    "ce": _build_ce,
    "focal": _build_focal,
    "logit-adjusted": _build_logit_adjusted,
}


def list_losses() -> list[str]:
    """Registered loss names, sorted."""
    return sorted(_LOSSES)


def create_loss(cfg: LossConfig, class_counts: Sequence[int] | np.ndarray) -> ImbalanceLoss:
    """Build the loss named ``cfg.name`` for training data with these per-class counts.

    Class weights come from ``rebalance.class_weights(counts, cfg.class_weights)`` (mean 1,
    zero for zero-count classes); the logit-adjustment prior from ``class_prior(counts)``.

    Raises:
        ValueError: unknown ``cfg.name`` (the message lists the valid names), bad counts, or
            an explicit weight vector whose length differs from the number of classes.
    """
    builder = _LOSSES.get(cfg.name)
    if builder is None:
        raise ValueError(f"unknown loss {cfg.name!r}; valid names: {', '.join(list_losses())}")
    counts = check_class_counts(class_counts)
    weights = class_weights(counts, cfg.class_weights)
    if cfg.drw_epoch is not None and np.allclose(weights, weights[0]):
        log.warning("loss: drw_epoch=%s has no effect with uniform class weights (%s)",
                    cfg.drw_epoch, cfg.class_weights)
    return builder(cfg, weights, counts)
