"""A candidate checkpoint for transfer: a model in eval mode, its preprocessing, and a tap on
its penultimate layer.

Every form ``--weights`` accepts (``imgpipe.models.resolve_weights``; the first three below)
is a candidate, plus two ranking-only forms (the last two):

- a bundle folder (``bundles/<name>/v<N>`` or ``bundles/<name>`` for the latest version);
- a training checkpoint folder (``meta.json`` + ``model.safetensors``, or a run folder);
- a torchvision weights name read from the local torch hub cache
  (``resnet50.IMAGENET1K_V2``; never downloaded);
- ``ARCH=PATH``: a local weights file (``.safetensors``, or ``.pt``/``.pth`` loaded
  weights-only) for a registered architecture, e.g. ``cnn=zoo/shapes.safetensors``;
- ``random:ARCH``: a seeded random initialisation (the baseline every ranking should beat).

Candidates that carry a classifier head keep it as the *source head* (LEEP and NCE need the
source model's class probabilities). The model is built strictly, so weights of another
architecture are reported, never half-loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from imgpipe.data.transforms import Preprocess
from imgpipe.models import create_model, get_model_spec, list_models, resolve_weights
from imgpipe.models.heads import model_spec_of
from imgpipe.models.state import unwrap_model
from imgpipe.models.weights import ResolvedWeights, WeightsNotCachedError

RANDOM_PREFIX = "random:"


class CandidateError(ValueError):
    """A candidate that cannot be used: missing file, architecture mismatch, corrupt weights,
    torchvision weights not in the local cache.

    The message says which candidate and why; a ranking reports it and goes on with the others.
    """


@dataclass
class Candidate:
    """A loaded candidate.

    Attributes:
        spec: the string it was loaded from (its name in rankings).
        kind: ``bundle`` | ``checkpoint`` | ``file`` | ``torchvision`` | ``random``.
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

        The features are the input of the registered classifier head (after global pooling,
        before dropout in eval mode), read with a forward pre-hook so no architecture is
        special-cased; see ``imgpipe.models.forward_features``.
        """
        model = unwrap_model(self.model)
        head = model.get_submodule(model_spec_of(model).head)
        seen: list[Tensor] = []
        hook = head.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0]))
        try:
            logits = model(x)
        finally:
            hook.remove()
        return seen[-1].flatten(1).float(), logits.float()


def _build(spec: str, arch: str, num_classes: int, in_channels: int, cifar_stem: bool,
           image_size: int, state: dict[str, Tensor]) -> nn.Module:
    try:
        model = create_model(arch, num_classes, in_channels=in_channels, cifar_stem=cifar_stem,
                             image_size=image_size)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as e:
        first = " ".join(str(e).split())[:300]  # torch's message spans lines; keep its gist
        raise CandidateError(f"{spec}: weights do not fit architecture {arch!r}: {first}") from None
    return model.eval()


def _resolve(spec: str, ref: str) -> ResolvedWeights:
    from safetensors import SafetensorError

    try:
        return resolve_weights(ref)
    except WeightsNotCachedError as e:
        raise CandidateError(f"{spec}: {e}") from None
    except FileNotFoundError:
        raise CandidateError(f"{spec}: no such file or folder") from None
    except (ValueError, OSError, RuntimeError, SafetensorError) as e:
        raise CandidateError(f"{spec}: corrupt or unreadable weights: {e}") from None
    except Exception as e:  # noqa: BLE001 — unpickling a damaged .pt raises many types
        raise CandidateError(f"{spec}: corrupt or unreadable weights: "
                             f"{type(e).__name__}: {e}") from None


def _preprocess_for(target: Preprocess, in_channels: int) -> Preprocess:
    """The target's preprocessing adapted to a model's input channels (grey ↔ RGB)."""
    if in_channels == target.channels:
        return target
    mode = "L" if in_channels == 1 else "RGB"
    mean = (sum(target.mean) / len(target.mean),) * in_channels
    std = (sum(target.std) / len(target.std),) * in_channels
    return Preprocess(image_size=target.image_size, mode=mode, mean=mean, std=std)


def _from_weights(spec: str, arch: str | None, w: ResolvedWeights,
                  target: Preprocess) -> Candidate:
    if arch is not None and arch not in list_models():
        raise CandidateError(f"{spec}: unknown architecture {arch!r}; registered: "
                             f"{', '.join(list_models())}")
    if arch and w.model and arch != w.model:
        raise CandidateError(f"{spec}: weights do not fit architecture {arch!r}: they are a "
                             f"{w.model}")
    name = arch or w.model
    if name is None:
        raise CandidateError(f"{spec}: a weights file needs its architecture: write "
                             f"ARCH={spec} (e.g. cnn=model.safetensors)")
    head = w.state_dict.get(f"{get_model_spec(name).head}.weight")
    if head is None or head.ndim != 2:
        raise CandidateError(f"{spec}: no {get_model_spec(name).head}.weight in the weights; "
                             f"is {name!r} their architecture?")
    conv1 = next((v for v in w.state_dict.values() if v.ndim == 4), None)
    in_channels = w.in_channels or (int(conv1.shape[1]) if conv1 is not None else target.channels)
    if w.cifar_stem is not None:
        cifar_stem = w.cifar_stem
    else:  # a bare file: a 3x3 first conv is the small-image (CIFAR) variant of the ResNets
        cifar_stem = name == "cnn" or (conv1 is not None and conv1.shape[-1] == 3)
    pre = w.preprocess or _preprocess_for(target, in_channels)
    model = _build(spec, name, int(head.shape[0]), in_channels, cifar_stem, pre.image_size,
                   w.state_dict)
    return Candidate(spec, w.kind, name, model, pre, True, int(head.shape[0]))


def _random(spec: str, arch: str, target: Preprocess, seed: int) -> Candidate:
    torch.manual_seed(seed)
    try:
        model = create_model(arch, 2, in_channels=target.channels,
                             image_size=target.image_size).eval()
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
            unreadable weights, unknown architecture, torchvision weights that are not in the
            local cache (with the fetch command) — with the reason in the message.
    """
    if spec.startswith(RANDOM_PREFIX):
        return _random(spec, spec[len(RANDOM_PREFIX):], target, seed)
    arch, ref = None, spec
    if "=" in spec and not Path(spec).expanduser().exists():
        arch, ref = spec.split("=", 1)
    return _from_weights(spec, arch, _resolve(spec, ref), target)
