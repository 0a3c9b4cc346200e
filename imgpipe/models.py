"""Model registry and factory (timm-style ``create_model``), local init, ``unwrap_model``.

Every model maps ``(N, in_channels, H, W)`` float images to ``(N, num_classes)`` logits and
calls its classifier head ``fc``. Nothing is ever downloaded: torchvision models are built
with ``weights=None``; starting weights come only from a local ``init_checkpoint``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

ModelBuilder = Callable[[int, int, bool], nn.Module]
_MODELS: dict[str, ModelBuilder] = {}

# Wrapper prefixes in saved state dicts: DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator adding ``builder(num_classes, in_channels, cifar_stem)`` under ``name``."""

    def add(builder: ModelBuilder) -> ModelBuilder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = builder
        return builder

    return add


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_MODELS)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Three conv blocks (conv-BN-ReLU ×2, max-pool) of 32/64/128 channels, global average
    pooling, dropout and a linear head: ~0.29M parameters, ~38M MACs per 32×32 image, so it
    trains in seconds per epoch on two CPU cores.

    The adaptive pooling accepts any input of at least 8×8. ``cifar_stem=False`` makes the
    first conv stride 2, for larger images (≥ 64 px) where full resolution is wasted.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, cifar_stem: bool = True,
                 widths: tuple[int, int, int] = (32, 64, 128), dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, width in enumerate(widths):
            stride = 2 if (i == 0 and not cifar_stem) else 1
            layers += _conv_bn_relu(cin, width, stride) + _conv_bn_relu(width, width)
            layers.append(nn.MaxPool2d(2))
            cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x)).flatten(1)  # (N, 128)
        return self.fc(self.dropout(x))  # (N, num_classes)


@register_model("cnn")
def _cnn(num_classes: int, in_channels: int, cifar_stem: bool) -> nn.Module:
    return SmallCNN(num_classes, in_channels, cifar_stem)


def _resnet(arch: str, num_classes: int, in_channels: int, cifar_stem: bool) -> nn.Module:
    import torchvision  # deferred: importing torchvision costs ~1 s and is not always needed

    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if cifar_stem:
        # CIFAR-style: a 3×3 stride-1 stem and no max-pool keep 32×32 inputs at 32×32 into
        # layer1 (4×4 into the final pool) instead of 8×8 (1×1).
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    # Same init torchvision gives conv1.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_model("resnet18")
def _resnet18(num_classes: int, in_channels: int, cifar_stem: bool) -> nn.Module:
    return _resnet("resnet18", num_classes, in_channels, cifar_stem)


@register_model("resnet34")
def _resnet34(num_classes: int, in_channels: int, cifar_stem: bool) -> nn.Module:
    return _resnet("resnet34", num_classes, in_channels, cifar_stem)


def create_model(name: str, num_classes: int, in_channels: int = 3, cifar_stem: bool = True,
                 init_checkpoint: str | None = None) -> nn.Module:
    """Build a registered model with a ``num_classes`` head, optionally from local weights.

    Args:
        name: one of ``list_models()``.
        num_classes: size of the ``fc`` head (>= 2).
        in_channels: image channels (1 grey, 3 RGB).
        cifar_stem: small-image stem (ResNets: 3×3 stride-1 conv, no max-pool).
        init_checkpoint: local ``.safetensors``/``.pt``/``.pth``; see ``load_init_checkpoint``.
    Raises:
        ValueError: unknown name (lists the valid ones) or bad sizes.
        FileNotFoundError: ``init_checkpoint`` does not exist.
    """
    builder = _MODELS.get(name)
    if builder is None:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    model = builder(num_classes, in_channels, cifar_stem)
    if init_checkpoint is not None:
        load_init_checkpoint(model, init_checkpoint)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DataParallel (``.module``) and torch.compile
    (``._orig_mod``) wrappers, in any nesting; the model itself if unwrapped."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a local checkpoint, on CPU, wrapper prefixes stripped; never unpickles code.

    ``.safetensors`` via safetensors; ``.pt``/``.pth``/``.bin`` via ``torch.load(weights_only=
    True)``, either a raw state dict or a dict holding one under ``"model"``/``"state_dict"``.

    Raises:
        FileNotFoundError: no such file. ValueError: unknown suffix or no tensors inside.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw: object = load_file(str(path), device="cpu")
    elif path.suffix in (".pt", ".pth", ".bin"):
        raw = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: expected a .safetensors, .pt or .pth file")
    if isinstance(raw, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(raw.get(key), Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(raw).__name__}")
    tensors = {_strip_prefixes(k): v for k, v in raw.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"{path}: holds no tensors")
    return tensors


def load_init_checkpoint(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load matching tensors from a local checkpoint into ``model`` (non-strict).

    Tensors whose shape differs from the model's (typically the ``fc`` head when the class
    count changed) are skipped, as are names the model lacks; all skips are logged.

    Returns:
        ``{"loaded", "skipped_shape", "unexpected", "missing"}`` lists of parameter names.
    Raises:
        FileNotFoundError: no such file. ValueError: nothing in the file fits the model.
    """
    target = unwrap_model(model)
    own = target.state_dict()
    state = load_state_dict_file(path)
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    if not fits:
        raise ValueError(f"{path}: no tensor matches the model by name and shape")
    result = target.load_state_dict(fits, strict=False)
    report = {
        "loaded": sorted(fits),
        "skipped_shape": skipped,
        "unexpected": sorted(k for k in state if k not in own),
        "missing": sorted(result.missing_keys),
    }
    log.info("init %s: loaded %d tensors from %s", type(target).__name__, len(fits), path)
    for kind in ("skipped_shape", "unexpected", "missing"):
        if report[kind]:
            log.warning("init from %s: %s %s", path, kind.replace("_", " "), report[kind])
    return report
