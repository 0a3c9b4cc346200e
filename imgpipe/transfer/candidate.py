"""A candidate checkpoint for transfer: a model in eval mode, its preprocessing, and a tap on
its penultimate layer.

``load_candidate(spec)`` is the only place that knows how a candidate is written on the
command line, so swapping in the project-wide weights resolver is a change in one function:

- a bundle folder (``bundles/<name>/v<N>`` or ``bundles/<name>`` for the latest version);
- a training checkpoint folder (``meta.json`` + ``model.safetensors``);
- ``ARCH=PATH``: a local weights file (``.safetensors``, or ``.pt``/``.pth`` loaded
  weights-only) for a registered architecture, e.g. ``cnn=zoo/shapes.safetensors``;
- ``random:ARCH``: a seeded random initialisation (the baseline every ranking should beat).

Bundles, checkpoints and weight files that carry a classifier head keep it as the *source head*
(LEEP and NCE need the source model's class probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from imgpipe.data.transforms import Preprocess
from imgpipe.models import create_model, load_state_dict_file, unwrap_model

HEAD = "fc"  # every registered model calls its classifier head ``fc`` (imgpipe.models)
RANDOM_PREFIX = "random:"


class CandidateError(ValueError):
    """A candidate that cannot be used: missing file, architecture mismatch, corrupt weights.

    The message says which candidate and why; a ranking reports it and goes on with the others.
    """


@dataclass
class Candidate:
    """A loaded candidate.

    Attributes:
        spec: the string it was loaded from (its name in rankings).
        kind: ``bundle`` | ``checkpoint`` | ``file`` | ``random``.
        architecture: registered model name (``cnn``, ``resnet18``, ...).
        model: the network in eval mode on CPU.
        preprocess: how target images are decoded for it (its own size, mode, mean/std).
        has_source_head: whether ``fc`` holds trained source-task weights (LEEP/NCE apply).
        source_classes: size of the source head (0 when there is none).
    """

    spec: str
    kind: str
    architecture: str
    model: nn.Module
    preprocess: Preprocess
    has_source_head: bool
    source_classes: int

    @torch.no_grad()
    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """float ``(N, C, S, S)`` → (penultimate features ``(N, D)``, source logits ``(N, K)``).

        The features are the input of the classifier head ``fc`` (after global pooling, before
        dropout in eval mode), read with a forward hook so no architecture is special-cased.
        """
        model = unwrap_model(self.model)
        head = getattr(model, HEAD, None)
        if not isinstance(head, nn.Module):
            raise CandidateError(f"{self.spec}: model has no {HEAD!r} head to tap")
        seen: list[Tensor] = []
        hook = head.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
        try:
            logits = model(x)
        finally:
            hook.remove()
        return seen[0].flatten(1).float(), logits.float()


def _build(spec: str, arch: str, num_classes: int, in_channels: int, cifar_stem: bool,
           state: dict[str, Tensor]) -> nn.Module:
    try:
        model = create_model(arch, num_classes, in_channels=in_channels, cifar_stem=cifar_stem)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as e:
        first = " ".join(str(e).split())[:300]  # torch's message spans lines; keep its gist
        raise CandidateError(f"{spec}: weights do not fit architecture {arch!r}: {first}") from None
    return model.eval()


def _from_bundle(spec: str, path: Path) -> Candidate:
    from imgpipe.bundle import BundleError, load_bundle

    try:
        meta, state = load_bundle(path)
    except BundleError as e:
        raise CandidateError(f"{spec}: {e}") from None
    a = meta.architecture
    model = _build(spec, a.model, a.num_classes, a.in_channels, a.cifar_stem, state)
    return Candidate(spec, "bundle", a.model, model, meta.preprocess, True, a.num_classes)


def _from_checkpoint(spec: str, path: Path) -> Candidate:
    from safetensors import SafetensorError

    from imgpipe.training.checkpoint import load_meta, load_weights

    try:
        meta = load_meta(path)
        pre = Preprocess.model_validate(meta["preprocess"])
        mcfg = meta["train"]["model"]
        num_classes = len(meta["class_names"])
        state = load_weights(path)
    except (KeyError, TypeError, ValueError, SafetensorError, OSError) as e:
        raise CandidateError(f"{spec}: unreadable checkpoint: {type(e).__name__}: {e}") from None
    model = _build(spec, mcfg["name"], num_classes, pre.channels, mcfg["cifar_stem"], state)
    return Candidate(spec, "checkpoint", mcfg["name"], model, pre, True, num_classes)


def _from_file(spec: str, arch: str, path: str, target: Preprocess) -> Candidate:
    from safetensors import SafetensorError

    try:
        state = load_state_dict_file(path)
    except FileNotFoundError:
        raise CandidateError(f"{spec}: file not found: {path}") from None
    except (ValueError, OSError, RuntimeError, SafetensorError) as e:
        raise CandidateError(f"{spec}: corrupt or unreadable weights: {e}") from None
    head = state.get(f"{HEAD}.weight")
    if head is None or head.ndim != 2:
        raise CandidateError(f"{spec}: no {HEAD}.weight in the file; is {arch!r} its architecture?")
    conv1 = next((v for k, v in state.items() if v.ndim == 4), None)
    in_channels = int(conv1.shape[1]) if conv1 is not None else target.channels
    # A stem with a 3x3 first conv is the small-image (CIFAR) variant of the ResNets.
    cifar_stem = arch == "cnn" or (conv1 is not None and conv1.shape[-1] == 3)
    model = _build(spec, arch, int(head.shape[0]), in_channels, cifar_stem, state)
    pre = _preprocess_for(target, in_channels)
    return Candidate(spec, "file", arch, model, pre, True, int(head.shape[0]))


def _preprocess_for(target: Preprocess, in_channels: int) -> Preprocess:
    """The target's preprocessing adapted to a model's input channels (grey ↔ RGB)."""
    if in_channels == target.channels:
        return target
    mode = "L" if in_channels == 1 else "RGB"
    mean = (sum(target.mean) / len(target.mean),) * in_channels
    std = (sum(target.std) / len(target.std),) * in_channels
    return Preprocess(image_size=target.image_size, mode=mode, mean=mean, std=std)


def _random(spec: str, arch: str, target: Preprocess, seed: int) -> Candidate:
    torch.manual_seed(seed)
    try:
        model = create_model(arch, 2, in_channels=target.channels).eval()
    except ValueError as e:
        raise CandidateError(f"{spec}: {e}") from None
    return Candidate(spec, "random", arch, model, target, False, 0)


def load_candidate(spec: str, target: Preprocess, seed: int = 0) -> Candidate:
    """Load one candidate (see the module docstring for the accepted forms).

    Args:
        spec: the candidate as written on the command line.
        target: the target data's preprocessing (used for weight files and random inits,
            which carry none of their own).
        seed: seeds a ``random:ARCH`` initialisation.
    Raises:
        CandidateError: missing file, weights that do not fit the architecture, corrupt or
            unreadable weights, unknown architecture — with the reason in the message.
    """
    if spec.startswith(RANDOM_PREFIX):
        return _random(spec, spec[len(RANDOM_PREFIX):], target, seed)
    if "=" in spec:
        arch, path = spec.split("=", 1)
        return _from_file(spec, arch, path, target)
    path = Path(spec).expanduser()
    if not path.exists():
        raise CandidateError(f"{spec}: no such file or folder")
    if path.is_dir() and (path / "meta.json").is_file():
        return _from_checkpoint(spec, path)
    if path.is_dir():
        return _from_bundle(spec, path)
    raise CandidateError(f"{spec}: a weights file needs its architecture: write ARCH={spec} "
                         "(e.g. cnn=model.safetensors)")
