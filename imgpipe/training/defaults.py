"""Defaults that fit the data: input size and stem from the manifest's native image size.

A fixed 32 px default with the CIFAR stem erases thin structures (scratches, hairline cracks)
of a 160×120 photo. Unless the user set ``model.image_size`` / ``model.cifar_stem`` (or a
starting checkpoint fixes them), the input side follows the images' native shorter side,
kept within [``MIN_SIDE``, ``MAX_SIDE``] (small images are upsampled to what three pooling
stages need; large ones are capped for memory), and the stem is the CIFAR one (no early
downsampling) only below ``CIFAR_STEM_BELOW`` px — timm/torchvision practice.
"""

from __future__ import annotations

from imgpipe.config import TrainConfig
from imgpipe.data.manifest import Manifest

MIN_SIDE = 32
MAX_SIDE = 224
CIFAR_STEM_BELOW = 64


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
    why = "set by the user"
    if "image_size" not in fixed and not pinned and side is not None:
        size = min(max(side, MIN_SIDE), MAX_SIDE)
        update["image_size"] = max(MIN_SIDE, size - size % 8)
        why = f"from the data's native {manifest.image.width}x{manifest.image.height}"
    elif "image_size" not in fixed:
        why = "default (pretrained/initial weights)" if pinned else "default (mixed image sizes)"
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
    return cfg, (f"input {size}x{size} px ({why}), "
                 f"{'CIFAR stem' if stem else 'ImageNet stem (stride-2 start)'}")
