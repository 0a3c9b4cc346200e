"""Losses against hand computations in plain numpy/python, and the factory's contracts."""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imgpipe.config import LossConfig
from imgpipe.losses import (
    FocalLoss,
    LogitAdjustedCrossEntropy,
    WeightedCrossEntropy,
    class_prior,
    create_loss,
    list_losses,
)

LOGITS = np.array([[2.0, 0.5, -1.0],
                   [0.1, 0.2, 0.3],
                   [-1.0, 3.0, 0.0],
                   [0.0, 0.0, 4.0],
                   [1.5, -0.5, 0.5]])
TARGETS = np.array([0, 2, 1, 0, 2])
WEIGHT = np.array([0.5, 1.0, 2.0])


def _softmax_row(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def _hand_loss(logits, targets, weight=None, eps=0.0, gamma=0.0, offset=None) -> float:
    """Σ_i [(1-ε) w_y m_y (-log p_y) + ε/C Σ_c w_c m_c (-log p_c)] / Σ_i w_y, one sample at a time."""
    num_classes = len(logits[0])
    w = [1.0] * num_classes if weight is None else list(weight)
    off = [0.0] * num_classes if offset is None else list(offset)
    total, norm = 0.0, 0.0
    for z, y in zip(logits, targets, strict=True):
        p = _softmax_row([zc + oc for zc, oc in zip(z, off, strict=True)])
        term = [w[c] * (1 - p[c]) ** gamma * -math.log(p[c]) for c in range(num_classes)]
        total += (1 - eps) * term[y] + eps / num_classes * sum(term)
        norm += w[y]
    return total / norm


def _torch(logits=LOGITS, targets=TARGETS):
    return torch.tensor(logits, dtype=torch.float32), torch.tensor(targets, dtype=torch.int64)


def _cfg(**kw) -> LossConfig:
    return LossConfig(**kw)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("weight", [None, WEIGHT])
def test_weighted_ce_matches_hand(weight, eps):
    got = WeightedCrossEntropy(weight, label_smoothing=eps)(*_torch())
    assert got.item() == pytest.approx(_hand_loss(LOGITS, TARGETS, weight, eps), rel=1e-5)


def test_weighted_ce_is_torch_weighted_mean():
    # The documented reduction is torch's: the same number as F.cross_entropy's.
    x, y = _torch()
    w = torch.tensor(WEIGHT, dtype=torch.float32)
    want = F.cross_entropy(x, y, weight=w, label_smoothing=0.2)
    assert WeightedCrossEntropy(WEIGHT, 0.2)(x, y).item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_matches_hand(gamma, eps):
    got = FocalLoss(WEIGHT, gamma=gamma, label_smoothing=eps)(*_torch())
    want = _hand_loss(LOGITS, TARGETS, WEIGHT, eps, gamma)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_focal_two_class_textbook_value():
    # p_y = 0.8 by construction: FL = -(1 - 0.8)^2 log 0.8 (α = 1, one sample).
    x = torch.tensor([[math.log(0.8), math.log(0.2)]])
    got = FocalLoss(gamma=2.0)(x, torch.tensor([0]))
    assert got.item() == pytest.approx(-(0.2**2) * math.log(0.8), rel=1e-5)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_logit_adjusted_matches_hand(tau):
    counts = np.array([60.0, 30.0, 10.0])
    offset = [tau * math.log(n / counts.sum()) for n in counts]
    got = LogitAdjustedCrossEntropy(counts / counts.sum(), tau, WEIGHT, 0.1)(*_torch())
    assert got.item() == pytest.approx(
        _hand_loss(LOGITS, TARGETS, WEIGHT, 0.1, offset=offset), rel=1e-5)


def test_balanced_softmax_is_tau_one():
    # Ren et al.: p_y = n_y e^{z_y} / Σ_c n_c e^{z_c}.
    counts = [60, 30, 10]
    want = 0.0
    for z, y in zip(LOGITS, TARGETS, strict=True):
        denom = sum(n * math.exp(v) for n, v in zip(counts, z, strict=True))
        want += -math.log(counts[y] * math.exp(z[y]) / denom)
    loss = create_loss(_cfg(name="logit-adjusted", tau=1.0), counts)
    assert loss(*_torch()).item() == pytest.approx(want / len(TARGETS), rel=1e-5)


def test_focal_gamma_zero_is_ce():
    x, y = _torch()
    ce = WeightedCrossEntropy(WEIGHT, label_smoothing=0.1)(x, y)
    focal = FocalLoss(WEIGHT, gamma=0.0, label_smoothing=0.1)(x, y)
    assert focal.item() == pytest.approx(ce.item(), rel=1e-6)


def test_tau_zero_is_ce():
    x, y = _torch()
    ce = WeightedCrossEntropy(WEIGHT, label_smoothing=0.1)(x, y)
    la = LogitAdjustedCrossEntropy([0.7, 0.2, 0.1], 0.0, WEIGHT, 0.1)(x, y)
    assert la.item() == pytest.approx(ce.item(), rel=1e-6)


@pytest.mark.parametrize("name", list_losses())
def test_drw_switches_at_epoch_k(name):
    counts = [50, 20, 5]
    weighted = create_loss(_cfg(name=name, class_weights="power:1"), counts)
    deferred = create_loss(_cfg(name=name, class_weights="power:1", drw_epoch=2), counts)
    plain = create_loss(_cfg(name=name), counts)
    x, y = _torch()
    for epoch in range(4):
        deferred.set_epoch(epoch)
        want = (plain if epoch < 2 else weighted)(x, y).item()
        assert deferred(x, y).item() == pytest.approx(want, rel=1e-6), epoch
    assert weighted(x, y).item() != pytest.approx(plain(x, y).item(), rel=1e-3)


@pytest.mark.parametrize("scheme", ["none", "power:0.5", "effective:0.99", "1,2,7"])
@pytest.mark.parametrize("name", list_losses())
def test_weights_normalised_to_mean_one(name, scheme):
    loss = create_loss(_cfg(name=name, class_weights=scheme), [80, 15, 5])
    assert loss.weight.mean().item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("name", list_losses())
def test_gradients_finite_with_zero_count_class(name):
    counts = [100, 10, 0, 1]
    loss = create_loss(_cfg(name=name, class_weights="power:1", focal_gamma=0.5,
                            label_smoothing=0.1), counts)
    # Includes a target of the empty class and a sample predicted with probability exactly 1.
    x = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.0, 3.0, 0.0, 0.0],
                      [0.5, 0.5, 0.5, 0.5], [200.0, -200.0, -200.0, -200.0]], requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    out = loss(x, y)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", list_losses())
def test_registered_loss_contract(name):
    loss = create_loss(_cfg(name=name), [40, 10, 2])
    x, y = _torch()
    x.requires_grad_(True)
    out = loss(x, y)
    assert out.ndim == 0 and torch.isfinite(out)
    out.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # Per-class tensors are buffers, so .to() moves/casts them with the module.
    buffers = dict(loss.named_buffers())
    assert "weight" in buffers
    loss.to(torch.float64)
    assert all(b.dtype == torch.float64 for b in loss.buffers())
    loss.set_epoch(3)
    assert loss.epoch == 3


def test_registry_matches_config_choices():
    choices = typing.get_args(LossConfig.model_fields["name"].annotation)
    assert set(list_losses()) == set(choices)


def test_unknown_name_lists_valid_names():
    cfg = LossConfig().model_copy(update={"name": "nope"})
    with pytest.raises(ValueError, match="nope.*ce, focal, logit-adjusted"):
        create_loss(cfg, [3, 2])


def test_class_prior_handles_zero_counts():
    prior = class_prior([6, 0, 2])
    assert np.all(prior > 0) and np.all(np.isfinite(np.log(prior)))
    assert prior[0] / prior[2] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="not all 0"):
        class_prior([0, 0])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="3 values"):
        create_loss(_cfg(class_weights="1,2,3"), [5, 5])
    with pytest.raises(ValueError, match="weight has shape"):
        WeightedCrossEntropy([1.0, 1.0])(*_torch())
    with pytest.raises(ValueError, match="targets"):
        WeightedCrossEntropy()(torch.zeros(4, 3), torch.zeros(3, dtype=torch.int64))


def test_all_zero_weight_batch_gives_zero_not_nan():
    loss = WeightedCrossEntropy([1.0, 0.0, 2.0])
    out = loss(torch.randn(3, 3), torch.tensor([1, 1, 1]))
    assert out.item() == 0.0


@pytest.mark.parametrize("name", list_losses())
def test_low_precision_logits_are_computed_in_float32(name):
    loss = create_loss(_cfg(name=name, class_weights="power:1"), [40, 10, 2])
    x, y = _torch()
    full = loss(x, y)
    half = loss(x.to(torch.bfloat16), y)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list_losses())
def test_loss_moves_to_cuda(name):
    loss = create_loss(_cfg(name=name, class_weights="power:1"), [40, 10, 2])
    x, y = _torch()
    want = loss(x, y).item()
    got = loss.to("cuda")(x.cuda(), y.cuda())
    assert got.device.type == "cuda" and got.item() == pytest.approx(want, rel=1e-5)
