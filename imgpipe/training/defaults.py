"""Defaults that fit the data: input size and stem from the manifest's native image size.

A fixed 32 px default with the CIFAR stem erases thin structures (scratches, hairline cracks)
of a 160×120 photo. Unless the user set ``model.image_size`` / ``model.cifar_stem`` (or a
starting checkpoint fixes them), the input side follows the images' native shorter side,
rounded up to a multiple of 8 and kept within [``MIN_SIDE``, ``MAX_SIDE``] (and at least the
architecture's own minimum): small images are upsampled to what three 2x pooling stages need,
large ones are capped for memory. The stem is the CIFAR one (no early downsampling) only below
``CIFAR_STEM_BELOW`` px — timm/torchvision practice.

``MIN_SIDE`` is 16: three 2x stages (the small CNN; a CIFAR-stem ResNet's layer2–4) then leave
a 2x2 map. Measured on digits-lt (native 8 px; ``benchmarks/size_bench.py``: the cnn, 16
epochs, 3 seeds): mean test balanced accuracy 0.78 / 0.86 / 0.85 at 8 / 16 / 32 px with
logit adjustment, 0.76 / 0.84 / 0.85 with class-balanced resampling, a 16 px epoch costing
about a quarter of a 32 px one — upsampling further adds compute, not detail.
"""

from __future__ import annotations

import math

from imgpipe.config import TrainConfig
from imgpipe.data.manifest import Manifest
from imgpipe.models.registry import get_model_spec

MIN_SIDE = 16
MAX_SIDE = 224
CIFAR_STEM_BELOW = 64
CROP_WARN_RATIO = 2.0  # longer / shorter side from which the centre crop keeps half or less


def native_side(manifest: Manifest) -> int | None:
    """The shorter native side when every image shares one size, else None."""
    h, w = manifest.image.height, manifest.image.width
    return min(h, w) if h and w else None


def resolve_input_size(cfg: TrainConfig, manifest: Manifest) -> tuple[TrainConfig, str]:
    """``cfg`` with image size and stem derived from the data where the user left them unset.

    Returns the (possibly updated) config and a one-line explanation to print at start.
    """
    model = cfg.model
    fixed = model.model_fields_set
    pinned = bool(model.weights)  # their size/stem come from the weights (resolve_model_config)
    side = native_side(manifest)
    update: dict[str, object] = {}
    why = "as configured"  # by the user, or by the search a refit retrains
    if "image_size" not in fixed and not pinned and side is not None:
        # Rounded up, not down: resizing below the native side would drop the fine structure
        # the native size is kept for (28 px MNIST-like images stay at 32, not 24). A ViT also
        # needs a multiple of its patch size.
        spec = get_model_spec(model.name or "cnn")
        step = math.lcm(8, spec.image_size_multiple)
        floor = max(MIN_SIDE, spec.min_image_size)
        update["image_size"] = min(max(_round_up(side, step), _round_up(floor, step)),
                                   MAX_SIDE // step * step)
        why = f"from the data's native {manifest.image.width}x{manifest.image.height}"
    elif "image_size" not in fixed:
        why = ("the default for pretrained/initial weights" if pinned
               else "the default for mixed image sizes")
    size = update.get("image_size", model.image_size)
    if size is None and not pinned:
        size = update["image_size"] = 32
    if "cifar_stem" not in fixed and not pinned:
        update["cifar_stem"] = size < CIFAR_STEM_BELOW
    stem = update.get("cifar_stem", model.cifar_stem)
    if pinned and (size is None or stem is None):
        return cfg, (f"input {f'{size}x{size} px' if size else 'size'} and stem from the weights "
                     f"({model.weights})")
    if update:
        # model_copy keeps model_fields_set; the resolved values count as set from here on.
        model = model.model_validate({**model.model_dump(), **update})
        cfg = cfg.model_copy(update={"model": model})
    name = model.name or "cnn"
    stem_text = ("" if not get_model_spec(name).cifar_stem
                 else ", CIFAR stem" if stem else ", ImageNet stem (stride-2 start)")
    return cfg, f"input {size}x{size} px ({why}){stem_text}{_crop_warning(manifest)}"


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _crop_warning(manifest: Manifest) -> str:
    """A warning when decoding (resize the shorter side, centre-crop a square) keeps less than
    half of each image: thin strips lose most of their content."""
    h, w = manifest.image.height, manifest.image.width
    if not h or not w or max(h, w) < CROP_WARN_RATIO * min(h, w):
        return ""
    kept = min(h, w) / max(h, w)
    return (f"; warning: the {w}x{h} images are resized by their shorter side and centre-"
            f"cropped to a square, which keeps the middle {kept:.0%} of each (pad or tile them "
            "to a squarer shape when prepared)")
