"""Head and feature access for every registered model (timm's ``get_classifier`` /
``reset_classifier`` / pre-logits contract), and the stage of each parameter.

``create_model`` tags each model with its registry name (``model.imgpipe_model``), so these
functions work on any model it built, also when wrapped (DDP, torch.compile) or adapted (peft).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor, nn

from imgpipe.models.registry import ModelSpec, get_model_spec, set_submodule
from imgpipe.models.state import unwrap_model

ARCH_ATTR = "imgpipe_model"
HEAD = -1  # stage index of the classifier head's parameters
_FEATURES_LOCK = threading.Lock()


def model_spec_of(model: nn.Module) -> ModelSpec:
    """The ``ModelSpec`` of a model built by ``create_model``.

    Raises:
        ValueError: the model was not built by ``create_model`` (no registry tag).
    """
    name = getattr(unwrap_model(model), ARCH_ATTR, None)
    if name is None:
        raise ValueError(f"{type(unwrap_model(model)).__name__} was not built by "
                         "imgpipe.models.create_model; its head and stages are unknown")
    return get_model_spec(name)


def get_classifier(model: nn.Module) -> nn.Linear:
    """The classifier head (the final ``nn.Linear``; under peft, its base layer)."""
    head = unwrap_model(model).get_submodule(model_spec_of(model).head)
    base = getattr(head, "base_layer", head)
    if not isinstance(base, nn.Linear):
        raise ValueError(f"head is a {type(base).__name__}, expected nn.Linear "
                         "(was reset_classifier(model, 0) called?)")
    return base


def feature_dim(model: nn.Module) -> int:
    """Width D of the penultimate features (the head's ``in_features``)."""
    known = getattr(unwrap_model(model), "imgpipe_feature_dim", None)
    return known if known is not None else get_classifier(model).in_features


def reset_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the head by a fresh ``nn.Linear(D, num_classes)`` (torch's default init), or by
    ``nn.Identity`` when ``num_classes == 0`` so ``model(x)`` returns ``(N, D)`` features
    (timm's convention). Returns the model."""
    inner = unwrap_model(model)
    spec = model_spec_of(inner)
    dim = inner.imgpipe_feature_dim = feature_dim(inner)  # kept: an Identity head has none
    set_submodule(inner, spec.head, nn.Linear(dim, num_classes) if num_classes else nn.Identity())
    return model


@torch.no_grad()
def forward_features(model: nn.Module, x: Tensor) -> Tensor:
    """Penultimate (pre-logits) features ``(N, D)`` float of images ``(N, C, H, W)``.

    The input of the classifier head: pooled (and, for ViT, the class token after the final
    LayerNorm; for MobileNetV3 after the pre-logits ``Linear+Hardswish``). Call it with the
    model in eval mode (dropout off, BatchNorm on running statistics).
    """
    head = unwrap_model(model).get_submodule(model_spec_of(model).head)
    seen: list[Tensor] = []

    def grab(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        seen.append(inputs[0])

    with _FEATURES_LOCK:  # one hook at a time: concurrent callers would see each other's input
        handle = head.register_forward_pre_hook(grab)
        try:
            model(x)
        finally:
            handle.remove()
    return seen[-1].flatten(1)


def parameter_stages(model: nn.Module) -> dict[str, int]:
    """Parameter name → backbone stage (0 = stem … S-1 = last) or ``HEAD`` (-1).

    Names are those of ``unwrap_model(model).named_parameters()``; peft's adapter names map to
    the stage of the layer they adapt.

    Raises:
        ValueError: a parameter belongs to no stage (a registry entry is incomplete).
    """
    inner = unwrap_model(model)
    spec = model_spec_of(inner)
    out: dict[str, int] = {}
    for name, _ in inner.named_parameters():
        plain = name.replace(".base_layer", "")
        out[name] = _stage_of(plain, spec)
    return out


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _stage_of(name: str, spec: ModelSpec) -> int:
    if _matches(name, spec.head):
        return HEAD
    for i, prefixes in enumerate(spec.stages):
        if any(_matches(name, p) for p in prefixes):
            return i
    raise ValueError(f"parameter {name!r} belongs to no stage of the registry entry")
