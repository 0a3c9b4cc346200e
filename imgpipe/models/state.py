"""State dicts: unwrapping, reading local files weights-only, and loading them into a model
non-strictly with the adaptations transfer needs (input channels, ViT position embeddings)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger("imgpipe.models")

# Wrapper prefixes in saved state dicts: DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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


def strip_prefixes(key: str) -> str:
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
        FileNotFoundError: no such file. ValueError: unknown suffix, unreadable or no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: object = load_file(str(path), device="cpu")
        elif path.suffix in (".pt", ".pth", ".bin"):
            raw = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"{path}: expected a .safetensors, .pt, .pth or .bin file")
    except ValueError:
        raise
    except Exception as e:  # corrupt file: safetensors/pickle raise assorted types
        raise ValueError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    if isinstance(raw, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(raw.get(key), Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(raw).__name__}")
    tensors = {strip_prefixes(k): v for k, v in raw.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"{path}: holds no tensors")
    return tensors


def adapt_input_conv(weight: Tensor, in_channels: int) -> Tensor:
    """A conv weight ``(O, I, kh, kw)`` adapted to ``in_channels`` inputs (timm's
    ``adapt_input_conv``): RGB→grey sums the colour filters (grey replicated to RGB gives the
    same response), grey→RGB (or any I→C) repeats and rescales by I/C."""
    cin = weight.shape[1]
    if cin == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_channels // cin)
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (cin / in_channels)


def _adapt(key: str, value: Tensor, own: Tensor) -> Tensor | None:
    """``value`` reshaped to fit ``own`` when a known transfer adaptation applies, else None."""
    if value.shape == own.shape:
        return value
    if value.ndim == 4 and own.ndim == 4 and value.shape[0] == own.shape[0] \
            and value.shape[2:] == own.shape[2:]:
        return adapt_input_conv(value, own.shape[1])
    if key.endswith("pos_embedding") and value.ndim == 3 and own.ndim == 3 \
            and value.shape[2] == own.shape[2]:
        return _resize_pos_embedding(value, own.shape[1])
    return None


def _resize_pos_embedding(pos: Tensor, length: int) -> Tensor:
    """ViT position embeddings ``(1, 1 + g*g, D)`` → ``(1, length, D)`` by bicubic
    interpolation of the grid (torchvision's ``interpolate_embeddings``)."""
    from torchvision.models.vision_transformer import interpolate_embeddings

    side = int(round((length - 1) ** 0.5))
    return interpolate_embeddings(side * 16, 16, {"encoder.pos_embedding": pos})[
        "encoder.pos_embedding"]


def load_init_checkpoint(model: nn.Module, state: Mapping[str, Tensor], where: str = "state dict"
                         ) -> dict[str, list[str]]:
    """Load matching tensors of a state dict into ``model`` (non-strict).

    ``where`` names the source in logs and errors. From a file, folder or torchvision weights
    name: ``models.weights.load_init_weights``. Tensors that fit by
    name and shape are loaded; a first conv with another channel count and ViT position
    embeddings of another grid are adapted; other shape mismatches (typically the head when
    the class count changed) are skipped, as are names the model lacks; all skips are logged.

    Returns:
        ``{"loaded", "adapted", "skipped_shape", "unexpected", "missing"}`` name lists.
    Raises:
        ValueError: nothing in the weights fits the model.
    """
    target = unwrap_model(model)
    own = target.state_dict()
    state = {strip_prefixes(k): v for k, v in state.items()}
    fits: dict[str, Tensor] = {}
    adapted, skipped = [], []
    for k, v in state.items():
        if k not in own:
            continue
        new = _adapt(k, v, own[k])
        if new is None:
            skipped.append(k)
            continue
        fits[k] = new
        if new is not v:
            adapted.append(k)
    if not fits:
        raise ValueError(f"{where}: no tensor matches the model by name and shape")
    result = target.load_state_dict(fits, strict=False)
    report = {"loaded": sorted(fits), "adapted": sorted(adapted), "skipped_shape": sorted(skipped),
              "unexpected": sorted(k for k in state if k not in own),
              "missing": sorted(result.missing_keys)}
    log.info("init %s: loaded %d tensors from %s", type(target).__name__, len(fits), where)
    for kind in ("adapted", "skipped_shape", "unexpected", "missing"):
        if report[kind]:
            log.warning("init from %s: %s %s", where, kind.replace("_", " "), report[kind])
    return report
