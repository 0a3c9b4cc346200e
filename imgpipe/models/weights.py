"""Starting weights from a spec string: a local file, a torchvision weights name read from the
local torch hub cache, or an imgpipe bundle / training checkpoint. Never downloads.

    resolve_weights("resnet50.IMAGENET1K_V2")          # torchvision's weights API, local cache
    resolve_weights("ResNet50_Weights.IMAGENET1K_V2")  # the same, torchvision's enum spelling
    resolve_weights("init.safetensors")                # or .pt/.pth/.bin, loaded weights-only
    resolve_weights("bundles/digits-lt/v3")            # a bundle (checksum verified)
    resolve_weights("runs/train-1/best")               # a checkpoint folder (or a run folder)
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from imgpipe.config import ConfigError, ModelConfig
from imgpipe.constants import WEIGHT_SUFFIXES
from imgpipe.data.transforms import Preprocess
from imgpipe.models.registry import create_model, get_model_spec, list_models, num_stages_of

if TYPE_CHECKING:
    from torch import Tensor, nn

# Resolving a config without weights (every Tune trial's actor does) must not import torch:
# the state-dict readers (imgpipe.models.state) are imported where tensors are read.

_TORCHVISION_SPEC = re.compile(r"^([A-Za-z][A-Za-z0-9_]*)\.([A-Z][A-Z0-9_]*)$")


class WeightsNotCachedError(FileNotFoundError):
    """A torchvision weights name whose file is not in the local torch hub cache."""


@dataclass
class ResolvedWeights:
    """What a weights spec resolves to: enough to build the model and preprocess its inputs.

    Attributes:
        spec: the spec as given. kind: ``file`` | ``torchvision`` | ``bundle`` | ``checkpoint``.
        path: the file or folder read.
        state_dict: CPU tensors (wrapper prefixes stripped), head included.
        model: registry name of the architecture, ``None`` for a bare file (the caller says).
        cifar_stem / in_channels: the architecture's stem and input channels when known.
        preprocess: the weights' own preprocessing (size, RGB/L, mean/std), ``None`` for a
            bare file (the data's own is used).
        source_classes: class names of the source head (ImageNet categories, a bundle's
            classes), ``None`` when unknown.
    """

    spec: str
    kind: str
    path: str
    state_dict: dict[str, Tensor] = field(repr=False)
    model: str | None = None
    cifar_stem: bool | None = None
    in_channels: int | None = None
    preprocess: Preprocess | None = None
    source_classes: list[str] | None = None

    def summary(self) -> dict[str, object]:
        """JSON-friendly description (no tensors), for results files and rankings."""
        return {"spec": self.spec, "kind": self.kind, "path": self.path, "model": self.model,
                "cifar_stem": self.cifar_stem, "in_channels": self.in_channels,
                "preprocess": self.preprocess.model_dump(mode="json") if self.preprocess else None,
                "num_source_classes": len(self.source_classes) if self.source_classes else None,
                "num_tensors": len(self.state_dict)}


def resolve_weights(spec: str) -> ResolvedWeights:
    """Resolve a weights spec (see the module docstring) without downloading anything.

    Raises:
        WeightsNotCachedError: a torchvision weights name whose file is not cached; the
            message gives the exact path torchvision expects and the command that fetches it.
        FileNotFoundError: a path that does not exist.
        ValueError: an unknown torchvision name, an architecture imgpipe does not register,
            a corrupt or unreadable file, or a folder that is neither a bundle nor a checkpoint.
    """
    spec = str(spec).strip()
    if not spec:
        raise ValueError("empty weights spec")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _resolve_folder(spec, path)
    if path.is_file():
        from imgpipe.models.state import load_state_dict_file

        return ResolvedWeights(spec, "file", str(path), load_state_dict_file(path))
    if _TORCHVISION_SPEC.match(spec) and not spec.endswith(WEIGHT_SUFFIXES):
        return _resolve_torchvision(spec)
    raise FileNotFoundError(
        f"weights {spec!r}: no such file or folder, and not a torchvision weights name "
        "(like resnet50.IMAGENET1K_V2 or ResNet50_Weights.IMAGENET1K_V2)")


def _torchvision_weights(spec: str):
    """The torchvision ``WeightsEnum`` member and the imgpipe model name it fits."""
    from torchvision.models import get_model_weights, get_weight

    owner, value = _TORCHVISION_SPEC.match(spec).groups()
    fitting = {n: get_model_spec(n).torchvision_name for n in list_models()
               if get_model_spec(n).torchvision_name}
    try:
        weights = get_weight(spec) if "_Weights" in owner else get_model_weights(owner)[value]
    except (KeyError, ValueError) as e:
        raise ValueError(f"weights {spec!r}: torchvision knows no such weights ({e})") from None
    for name, tv_name in fitting.items():
        if get_model_weights(tv_name) is type(weights):
            return weights, name
    raise ValueError(f"weights {spec!r} belong to an architecture imgpipe does not register; "
                     f"registered torchvision architectures: {', '.join(sorted(fitting))}")


def torchvision_cache_path(weights) -> Path:
    """Where torchvision's ``load_state_dict_from_url`` looks for ``weights``:
    ``$TORCH_HOME/hub/checkpoints/<file name of weights.url>``."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def fetch_command(weights) -> str:
    """One shell command that puts ``weights`` into the same cache path on a machine with
    internet access (torchvision's own loader, hash checked)."""
    import torch.hub

    enum = f"{type(weights).__name__}.{weights.name}"
    torch_home = Path(torch.hub.get_dir()).parent
    code = (f"from torchvision.models import get_weight; "
            f'get_weight("{enum}").get_state_dict(progress=True, check_hash=True)')
    return f"TORCH_HOME={shlex.quote(str(torch_home))} python -c {shlex.quote(code)}"


def _resolve_torchvision(spec: str) -> ResolvedWeights:
    weights, name = _torchvision_weights(spec)
    cached = torchvision_cache_path(weights)
    if not cached.is_file():
        raise WeightsNotCachedError(
            f"weights {spec!r} ({type(weights).__name__}.{weights.name}) are not in the local "
            f"torch hub cache; torchvision expects the file {cached} . Nothing is downloaded at "
            f"run time: on a machine with internet access run\n    {fetch_command(weights)}\n"
            f"and copy {cached.name} to {cached} here (or point TORCH_HOME at a folder holding "
            f"hub/checkpoints/{cached.name}).")
    try:
        # torchvision's own API; with the file cached, load_state_dict_from_url only reads it.
        state = weights.get_state_dict(progress=False, check_hash=False, weights_only=True)
    except Exception as e:  # a corrupt cache file: zip/pickle errors of several types
        raise ValueError(f"weights {spec!r}: cannot read {cached} ({type(e).__name__}: {e}); "
                         "delete it and fetch it again") from None
    transforms = weights.transforms()
    pre = Preprocess(image_size=int(transforms.crop_size[0]), mode="RGB",
                     mean=tuple(float(m) for m in transforms.mean),
                     std=tuple(float(s) for s in transforms.std))
    return ResolvedWeights(spec, "torchvision", str(cached), dict(state), model=name,
                           cifar_stem=False, in_channels=3, preprocess=pre,
                           source_classes=list(weights.meta.get("categories") or []) or None)


def _resolve_folder(spec: str, path: Path) -> ResolvedWeights:
    # Deferred imports: bundles and checkpoints are written downstream of models; reading
    # their (tensor-only) formats here does not make models depend on training at import time.
    if (path / "bundle.json").is_file() or any(path.glob("v*/bundle.json")):
        from imgpipe.bundle import load_bundle, resolve_bundle_dir

        bundle_dir = resolve_bundle_dir(path)
        meta, state = load_bundle(bundle_dir)
        arch = meta.architecture
        return ResolvedWeights(spec, "bundle", str(bundle_dir), dict(state), model=arch.model,
                               cifar_stem=arch.cifar_stem, in_channels=arch.in_channels,
                               preprocess=meta.preprocess, source_classes=list(meta.class_names))
    for candidate in (path, path / "best", path / "best_checkpoint"):
        if (candidate / "meta.json").is_file():
            return _resolve_checkpoint(spec, candidate)
    raise ValueError(f"weights {spec!r}: {path} is a folder but neither a bundle (bundle.json) "
                     "nor a training checkpoint (meta.json + model.safetensors)")


def _resolve_checkpoint(spec: str, path: Path) -> ResolvedWeights:
    from imgpipe.checkpoint import WEIGHTS_FILE

    try:
        meta = json.loads((path / "meta.json").read_text())
        mcfg = meta["train"]["model"]
        pre = Preprocess.model_validate(meta["preprocess"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"weights {spec!r}: {path}/meta.json is not a training checkpoint's "
                         f"metadata ({type(e).__name__}: {e})") from None
    from imgpipe.models.state import load_state_dict_file

    state = load_state_dict_file(path / WEIGHTS_FILE)
    return ResolvedWeights(spec, "checkpoint", str(path), state, model=mcfg["name"],
                           cifar_stem=bool(mcfg.get("cifar_stem", True)),
                           in_channels=pre.channels, preprocess=pre,
                           source_classes=list(meta.get("class_names") or []) or None)


def load_init_weights(model: nn.Module, source: str | Path | Mapping[str, Tensor]
                      ) -> dict[str, list[str]]:
    """``load_init_checkpoint`` from a state dict or anything ``resolve_weights`` accepts.

    Raises:
        FileNotFoundError: no such file. ValueError: nothing in the weights fits the model.
    """
    from imgpipe.models.state import load_init_checkpoint

    if isinstance(source, Mapping):
        return load_init_checkpoint(model, source)
    return load_init_checkpoint(model, resolve_weights(str(source)).state_dict, str(source))


def create_model_from_weights(weights: ResolvedWeights | str, num_classes: int | None = None,
                              *, model: str | None = None, in_channels: int | None = None,
                              cifar_stem: bool | None = None,
                              image_size: int | None = None) -> nn.Module:
    """Build the weights' architecture and load them (non-strictly, adapting the input conv).

    Args:
        weights: a ``ResolvedWeights`` or a spec for ``resolve_weights``.
        num_classes: head size; ``None`` keeps the source head (its classes must be known),
            so the source logits are available (e.g. for LEEP). Another size gets a fresh head.
        model / in_channels / cifar_stem / image_size: override or supply (bare files) what
            the weights do not say; by default the weights' own.
    Raises:
        ValueError: no architecture known (a bare file without ``model``), a ``model`` that
            contradicts the weights', or no source classes with ``num_classes=None``.
    """
    w = resolve_weights(weights) if isinstance(weights, str) else weights
    if model and w.model and model != w.model:
        raise ValueError(f"weights {w.spec!r} are a {w.model}, not a {model}")
    name = model or w.model
    if name is None:
        raise ValueError(f"weights {w.spec!r}: a bare weights file does not say its "
                         f"architecture; pass model= (one of {', '.join(list_models())})")
    if num_classes is None:
        if not w.source_classes:
            raise ValueError(f"weights {w.spec!r}: source classes unknown; pass num_classes")
        num_classes = len(w.source_classes)
    net = create_model(
        name, num_classes,
        in_channels=in_channels or w.in_channels or 3,
        cifar_stem=cifar_stem if cifar_stem is not None else bool(w.cifar_stem),
        image_size=image_size or (w.preprocess.image_size if w.preprocess else None))
    from imgpipe.models.state import load_init_checkpoint

    load_init_checkpoint(net, w.state_dict)
    return net


def resolve_model_config(cfg: ModelConfig, data_preprocess: Callable[[int], Preprocess],
                         weights: ResolvedWeights | None) -> tuple[ModelConfig, Preprocess]:
    """Merge the model config with what the weights say → (complete config, preprocessing).

    The weights' architecture, stem and preprocessing (mode, mean/std, size) fill every field
    left ``None``; an explicit ``image_size`` overrides the weights' size. Without weights (or
    for a bare file) the data's preprocessing (``data_preprocess(size)``, its mode and train
    mean/std) is used, with defaults cnn / cifar stem / 32 px. Greyscale data feeds a
    3-channel backbone by decoding to RGB (the grey value in all three channels).

    Raises:
        ConfigError: naming the field that contradicts the weights, a ``partial:K`` beyond the
            architecture's stages, or ``lora`` without the ``peft`` package.
    """
    from imgpipe.config.specs import parse_finetune

    w = weights
    name = cfg.name or (w.model if w else None) or "cnn"
    if w is not None and w.model and cfg.name and cfg.name != w.model:
        raise ConfigError(f"model.name: {cfg.name} given, but weights {w.spec!r} are a {w.model}; "
                          "drop --model or pick weights of that architecture")
    stem = cfg.cifar_stem
    if w is not None and w.cifar_stem is not None:
        if stem is not None and stem != w.cifar_stem:
            raise ConfigError(f"model.cifar_stem: {stem} given, but weights {w.spec!r} were "
                              f"trained with cifar_stem={w.cifar_stem}")
        stem = w.cifar_stem
    if w is not None and w.preprocess is not None:
        size = cfg.image_size or w.preprocess.image_size
        pre = w.preprocess.model_copy(update={"image_size": size})
    else:
        size = cfg.image_size or 32
        pre = data_preprocess(size)
    ft = parse_finetune(cfg.finetune)
    stages = num_stages_of(name)
    if ft.mode == "partial" and ft.frozen_stages(stages) > stages:
        raise ConfigError(f"model.finetune: partial:{ft.stage} but {name} has {stages} stages "
                          f"(0 = full … {stages} = linear-probe)")
    if ft.mode == "lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ConfigError("model.finetune: lora needs the peft package "
                              "(pip install 'peft>=0.13')") from None
    spec = get_model_spec(name)
    if size < spec.min_image_size:
        raise ConfigError(f"model.image_size: {name} needs at least {spec.min_image_size} px, "
                          f"got {size}; pass --image-size {spec.min_image_size} (images are "
                          "resized on decode)")
    if size % spec.image_size_multiple:
        m = spec.image_size_multiple
        raise ConfigError(f"model.image_size: {name} needs a multiple of {m}, got {size}; "
                          f"pass --image-size {-(-size // m) * m}")
    resolved = cfg.model_copy(update={"name": name, "cifar_stem": True if stem is None else stem,
                                      "image_size": size})
    return resolved, pre


def target_state_dict(weights: ResolvedWeights, model_name: str,
                      class_names: list[str]) -> dict[str, Tensor]:
    """The weights to start a model for ``class_names`` from: the source head is dropped
    unless the source classes are known to be exactly these (continuing training), so a head
    of the same size but other classes is never reused by accident."""
    if weights.source_classes is not None and list(weights.source_classes) == list(class_names):
        return weights.state_dict
    head = get_model_spec(model_name).head
    return {k: v for k, v in weights.state_dict.items()
            if not (k == f"{head}.weight" or k == f"{head}.bias")}


def load_model_weights(cfg: ModelConfig) -> ResolvedWeights | None:
    """``resolve_weights(cfg.weights)`` (None without weights), errors as ``ConfigError``
    naming ``model.weights`` — so a bad spec fails before any work, with exit code 2."""
    if not cfg.weights:
        return None
    try:
        return resolve_weights(cfg.weights)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.weights: {e}") from None


def check_weights(spec: str | None) -> None:
    """Cheap pre-flight check of a weights spec (no tensors read): the file or folder exists,
    or the torchvision weights are in the local cache. For jobs, before Ray starts.

    Raises:
        ConfigError: naming ``model.weights``, with the message ``resolve_weights`` would give.
    """
    if not spec:
        return
    path = Path(spec).expanduser()
    try:
        if path.exists():
            if path.is_dir() and not ((path / "bundle.json").is_file()
                                      or any(path.glob("v*/bundle.json"))
                                      or any((p / "meta.json").is_file() for p in
                                             (path, path / "best", path / "best_checkpoint"))):
                raise ValueError(f"{path} is a folder but neither a bundle nor a checkpoint")
            return
        if not (_TORCHVISION_SPEC.match(spec) and not spec.endswith(WEIGHT_SUFFIXES)):
            raise FileNotFoundError(f"weights {spec!r}: no such file or folder, and not a "
                                    "torchvision weights name (like resnet50.IMAGENET1K_V2)")
        weights, _ = _torchvision_weights(spec)
        if not torchvision_cache_path(weights).is_file():
            _resolve_torchvision(spec)  # raises WeightsNotCachedError with the full message
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.weights: {e}") from None
