"""Optimizers with parameter groups, and the warm-up + cosine learning-rate schedule.

Parameter groups follow torchvision's classification reference (``set_weight_decay``): no
weight decay on normalisation parameters, biases and ViT's class token / position embedding.
On top: a separate head lr and layer-wise lr decay (BEiT, Bao et al. 2022; timm's
``param_groups_layer_decay``): stage s of S backbone stages trains at lr · d^(S − s), the head
at lr (or ``head_lr``). Each group carries ``lr_scale``; ``set_lr`` applies the schedule to
every group relative to its scale. Frozen parameters (``requires_grad=False``) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from imgpipe.config import OptimConfig

NO_DECAY_NAMES = ("class_token", "pos_embedding", "relative_position_bias_table")


def _no_decay_names(model: nn.Module) -> set[str]:
    from imgpipe.models.finetune import NORM_TYPES

    names = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(module, NORM_TYPES) or pname == "bias" or p.ndim <= 1 \
                    or pname in NO_DECAY_NAMES:
                names.add(full)
    return names


def _stage_scales(model: nn.Module, cfg: OptimConfig) -> dict[str, float]:
    """Parameter name → lr multiplier (head lr and layer-wise decay)."""
    from imgpipe.models import HEAD, model_spec_of, parameter_stages, unwrap_model

    inner = unwrap_model(model)
    if cfg.head_lr is None and cfg.layer_decay is None:
        return {name: 1.0 for name, _ in inner.named_parameters()}
    stages = parameter_stages(inner)
    total = len(model_spec_of(inner).stages)
    decay = cfg.layer_decay or 1.0
    head = (cfg.head_lr / cfg.lr) if cfg.head_lr is not None else 1.0
    return {name: head if s == HEAD else decay ** (total - s) for name, s in stages.items()}


def create_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (weight decay, lr scale), largest lr scale first.

    Returns torch optimizer groups with ``params``, ``weight_decay``, ``lr`` and ``lr_scale``.
    Raises ValueError when no parameter is trainable.
    """
    from imgpipe.models import unwrap_model

    inner = unwrap_model(model)
    no_decay = _no_decay_names(inner)
    scales = _stage_scales(inner, cfg)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if name in no_decay else cfg.weight_decay
        groups.setdefault((scales[name], wd), []).append(p)
    if not groups:
        raise ValueError("no trainable parameters (every parameter is frozen)")
    return [{"params": ps, "weight_decay": wd, "lr": cfg.lr * scale, "lr_scale": scale}
            for (scale, wd), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], -kv[0][1]))]


def create_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter] | nn.Module
                     ) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov) | Adam | AdamW | RMSprop.

    Given a model: parameter groups from ``create_param_groups`` (no decay on norms/biases,
    head lr, layer decay; frozen parameters left out). Given parameters: one group.
    """
    if isinstance(params, nn.Module):
        groups: list[dict[str, Any]] = create_param_groups(params, cfg)
    else:
        groups = [{"params": [p for p in params if p.requires_grad], "lr_scale": 1.0}]
    return OPTIMIZERS[cfg.name](groups, cfg)


# The registry: one builder per name in ``constants.OPTIMIZER_NAMES`` (a test keeps them equal).
OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]], OptimConfig], torch.optim.Optimizer]] = {
    "sgd": lambda groups, cfg: torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay),
    "adam": lambda groups, cfg: torch.optim.Adam(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay),
    "adamw": lambda groups, cfg: torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay),
    "rmsprop": lambda groups, cfg: torch.optim.RMSprop(
        groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
}


def lr_factor(progress_epochs: float, total_epochs: int, cfg: OptimConfig) -> float:
    """Multiplier of the base lr at a fractional epoch: linear warm-up, then cosine to the floor."""
    warm = min(cfg.warmup_epochs, max(total_epochs - 1, 0))
    if warm > 0 and progress_epochs < warm:
        return max(progress_epochs / warm, 1e-3)
    span = max(total_epochs - warm, 1e-8)
    t = min(max((progress_epochs - warm) / span, 0.0), 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    """Every group's lr = base_lr · factor · its ``lr_scale`` (1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor * group.get("lr_scale", 1.0)
