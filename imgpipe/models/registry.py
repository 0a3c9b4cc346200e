"""Model registry and factory (timm-style ``create_model``).

Every model maps ``(N, in_channels, H, W)`` float images to ``(N, num_classes)`` logits. Each
registered name carries a ``ModelSpec``: where its classifier head lives (``fc`` for the small
CNN and ResNets, torchvision's own names for the others) and its backbone stages from input to
output, which fine-tuning (``partial:K``, layer-wise lr decay) and feature access use. Nothing
is ever downloaded: torchvision models are built with ``weights=None``; starting weights come
from ``imgpipe.models.weights.resolve_weights``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

# The specs are read on processes that never build a model (a Tune trial's actor resolving its
# config, the driver planning a run): torch is imported only by the builders, where they run.

# builder(num_classes, in_channels, cifar_stem, image_size) -> model
ModelBuilder = Callable[[int, int, bool, "int | None"], "nn.Module"]


@dataclass(frozen=True)
class ModelSpec:
    """How to build a registered model and where its parts are.

    Attributes:
        builder: ``builder(num_classes, in_channels, cifar_stem, image_size)``.
        head: dotted path of the final ``nn.Linear`` (the classifier head).
        stages: backbone stages from input to output, each a tuple of dotted module/parameter
            name prefixes; every non-head parameter belongs to exactly one stage.
        torchvision_name: the torchvision builder whose weights fit (``None``: imgpipe's own).
        cifar_stem: whether ``cifar_stem`` changes the network (ResNets and the small CNN).
        min_image_size: the smallest input side (px) the network accepts.
        image_size_multiple: input sides must be a multiple of this (a ViT's patch size).
    """

    builder: ModelBuilder
    head: str
    stages: tuple[tuple[str, ...], ...]
    torchvision_name: str | None = None
    cifar_stem: bool = False
    min_image_size: int = 8
    image_size_multiple: int = 1


_MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, head: str, stages: tuple[tuple[str, ...], ...],
                   torchvision_name: str | None = None, cifar_stem: bool = False,
                   min_image_size: int = 8, image_size_multiple: int = 1
                   ) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator adding ``builder`` under ``name`` with its head path and stages."""

    def add(builder: ModelBuilder) -> ModelBuilder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = ModelSpec(builder, head, stages, torchvision_name, cifar_stem,
                                  min_image_size, image_size_multiple)
        return builder

    return add


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_MODELS)


def get_model_spec(name: str) -> ModelSpec:
    """The ``ModelSpec`` of a registered name. Raises ValueError listing the valid names."""
    spec = _MODELS.get(name)
    if spec is None:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return spec


def num_stages_of(name: str) -> int:
    """Backbone stages S of the registered architecture ``name`` (``partial:K`` takes 0…S)."""
    return len(get_model_spec(name).stages)


def _prefixes(root: str, indices: range) -> tuple[str, ...]:
    return tuple(f"{root}.{i}" for i in indices)


@register_model("cnn", head="fc", cifar_stem=True,
                stages=tuple(_prefixes("features", range(7 * b, 7 * b + 7)) for b in range(3)))
def _cnn(num_classes: int, in_channels: int, cifar_stem: bool, image_size: int | None) -> nn.Module:
    from imgpipe.models.cnn import SmallCNN

    return SmallCNN(num_classes, in_channels, cifar_stem)


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _replace_input_conv(model: nn.Module, path: str, in_channels: int) -> None:
    """A first conv taking ``in_channels`` instead of 3 (fresh init; weights adapt on load)."""
    from torch import nn

    old: nn.Conv2d = model.get_submodule(path)
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    bias=old.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    set_submodule(model, path, new)


def _resnet(arch: str, num_classes: int, in_channels: int, cifar_stem: bool) -> nn.Module:
    import torchvision  # deferred: importing torchvision costs ~1 s and is not always needed
    from torch import nn

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


_RESNET_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


def _register_resnet(arch: str) -> None:
    @register_model(arch, head="fc", stages=_RESNET_STAGES, torchvision_name=arch, cifar_stem=True)
    def _build(num_classes: int, in_channels: int, cifar_stem: bool,
               image_size: int | None) -> nn.Module:
        return _resnet(arch, num_classes, in_channels, cifar_stem)


for _arch in ("resnet18", "resnet34", "resnet50"):
    _register_resnet(_arch)


def _torchvision(arch: str, num_classes: int, in_channels: int, input_conv: str,
                 **kwargs: object) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes, **kwargs)
    _replace_input_conv(model, input_conv, in_channels)
    return model


@register_model("mobilenet_v3_small", head="classifier.3", torchvision_name="mobilenet_v3_small",
                stages=(("features.0",), ("features.1",), _prefixes("features", range(2, 4)),
                        _prefixes("features", range(4, 9)), _prefixes("features", range(9, 12)),
                        ("features.12", "classifier.0")))
def _mobilenet_v3_small(num_classes: int, in_channels: int, cifar_stem: bool,
                        image_size: int | None) -> nn.Module:
    return _torchvision("mobilenet_v3_small", num_classes, in_channels, "features.0.0")


@register_model("efficientnet_b0", head="classifier.1", torchvision_name="efficientnet_b0",
                stages=tuple((f"features.{i}",) for i in range(9)))
def _efficientnet_b0(num_classes: int, in_channels: int, cifar_stem: bool,
                     image_size: int | None) -> nn.Module:
    return _torchvision("efficientnet_b0", num_classes, in_channels, "features.0.0")


@register_model("convnext_tiny", head="classifier.2", torchvision_name="convnext_tiny",
                stages=(("features.0", "features.1"), ("features.2", "features.3"),
                        ("features.4", "features.5"), ("features.6", "features.7", "classifier.0")),
                # 4x stem and three 2x2 stride-2 downsamples: the last needs 2 px left
                min_image_size=32)
def _convnext_tiny(num_classes: int, in_channels: int, cifar_stem: bool,
                   image_size: int | None) -> nn.Module:
    return _torchvision("convnext_tiny", num_classes, in_channels, "features.0.0")


VIT_PATCH = 16


@register_model("vit_b_16", head="heads.head", torchvision_name="vit_b_16",
                stages=(("conv_proj", "class_token", "encoder.pos_embedding"),
                        *((f"encoder.layers.encoder_layer_{i}",) for i in range(11)),
                        ("encoder.layers.encoder_layer_11", "encoder.ln")),
                min_image_size=16, image_size_multiple=VIT_PATCH)
def _vit_b_16(num_classes: int, in_channels: int, cifar_stem: bool,
              image_size: int | None) -> nn.Module:
    size = image_size or 224
    if size % VIT_PATCH:
        raise ValueError(f"vit_b_16 needs an image size divisible by {VIT_PATCH}, got {size}")
    return _torchvision("vit_b_16", num_classes, in_channels, "conv_proj", image_size=size)


def create_model(name: str, num_classes: int, in_channels: int = 3, cifar_stem: bool = True,
                 image_size: int | None = None) -> nn.Module:
    """Build a registered model with a ``num_classes`` head, randomly initialised (starting
    weights: ``models.weights.load_init_weights`` or ``create_model_from_weights``).

    Args:
        name: one of ``list_models()``.
        num_classes: size of the classifier head (>= 2).
        in_channels: image channels (1 grey, 3 RGB).
        cifar_stem: small-image stem (ResNets: 3×3 stride-1 conv, no max-pool; small CNN: no
            stride-2 first conv); other architectures ignore it.
        image_size: input side in pixels; only ViT depends on it (position embeddings;
            default 224).
    Raises:
        ValueError: unknown name (lists the valid ones) or bad sizes.
    """
    spec = get_model_spec(name)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    model = spec.builder(num_classes, in_channels, cifar_stem, image_size)
    model.imgpipe_model = name  # read by imgpipe.models.heads (head path, stages)
    return model
