"""``Predictor``: a bundle → calibrated, prior-corrected class probabilities.

Evaluation and serving both use this class, so an image gets the same probabilities offline
and over HTTP. The order of adjustments is fixed: temperature scaling (``logits / T``), then
prior correction (``+ log(target prior) − log(model prior)``), then softmax — all in float64
after the float32 forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from imgpipe.bundle import BundleMeta, DeploymentPrior, load_bundle, validate_meta
from imgpipe.data.transforms import preprocess_images
from imgpipe.models import create_model

_UNSET = object()


def target_prior(meta: BundleMeta) -> np.ndarray | None:
    """The normalised class prior of the deployment, or None for "model" (no correction)."""
    choice = meta.deployment_prior
    if choice == "model":
        return None
    if choice == "balanced":
        vec = np.ones(meta.architecture.num_classes)
    elif choice == "train":
        vec = np.asarray(meta.train_class_counts, dtype=np.float64)
    else:
        vec = np.asarray(choice, dtype=np.float64)
    return vec / vec.sum()


def prior_shift(meta: BundleMeta) -> np.ndarray:
    """Per-class logit offset ``log(target) − log(model_prior)`` (float64, shape ``(C,)``).

    A class the deployment never sees (target 0) gets ``-inf`` → probability exactly 0. A class
    the model was trained without (model prior 0) carries no learnt prior to remove, so it is
    left uncorrected rather than given an infinite boost.
    """
    target = target_prior(meta)
    n = meta.architecture.num_classes
    if target is None:
        return np.zeros(n)
    model = np.asarray(meta.model_prior, dtype=np.float64)
    model = model / model.sum()
    with np.errstate(divide="ignore"):
        shift = np.log(target) - np.log(np.where(model > 0, model, 1.0))
    return np.where(model > 0, shift, np.where(target > 0, 0.0, -np.inf))


def adjusted_probabilities(logits: np.ndarray | torch.Tensor, meta: BundleMeta) -> np.ndarray:
    """float64 ``(N, C)`` probabilities: softmax(logits / T + prior_shift)."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().numpy()
    z = np.asarray(logits, dtype=np.float64) / meta.temperature + prior_shift(meta)
    z = z - z.max(axis=1, keepdims=True)  # finite: at least one class has a finite shift
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Predictor:
    """A loaded bundle: model in eval mode plus its preprocessing and adjustments."""

    def __init__(self, meta: BundleMeta, model: torch.nn.Module, device: str = "cpu") -> None:
        self.meta = meta
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @classmethod
    def load(cls, bundle_dir: str | Path, device: str = "cpu") -> Predictor:
        """Load a bundle (checksum verified, safetensors only) and build its model, strictly.

        Raises:
            BundleError / BundleChecksumError: see ``imgpipe.bundle.load_bundle``.
            RuntimeError: the weights do not fit the recorded architecture.
        """
        meta, state = load_bundle(bundle_dir)
        arch = meta.architecture
        model = create_model(arch.model, arch.num_classes, in_channels=arch.in_channels,
                             cifar_stem=arch.cifar_stem, image_size=meta.preprocess.image_size)
        model.load_state_dict(state, strict=True)
        return cls(meta, model, device)

    @property
    def class_names(self) -> list[str]:
        return self.meta.class_names

    @property
    def num_classes(self) -> int:
        return self.meta.architecture.num_classes

    def set_adjustment(self, temperature: float | None = None,
                       deployment_prior: DeploymentPrior | None = None,
                       decision_threshold: float | None | object = _UNSET) -> None:
        """Change calibration at runtime; values are validated exactly as in ``bundle.json``.

        ``None`` leaves temperature/prior unchanged; ``decision_threshold=None`` clears it.
        Raises BundleError (via validation) for invalid values; the old state is then kept.
        """
        update = self.meta.model_dump()
        if temperature is not None:
            update["temperature"] = float(temperature)
        if deployment_prior is not None:
            update["deployment_prior"] = deployment_prior
        if decision_threshold is not _UNSET:
            update["decision_threshold"] = decision_threshold
        self.meta = validate_meta(update, f"{self.meta.name} v{self.meta.version}")

    def preprocess(self, images: Sequence[bytes]) -> torch.Tensor:
        """Encoded images → float ``(N, C, S, S)`` via the shared ``preprocess_images``.

        Raises ImageDecodeError for the first unusable image.
        """
        return preprocess_images(list(images), self.meta.preprocess)

    @torch.no_grad()
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """float ``(N, C, S, S)`` → float32 logits ``(N, num_classes)`` on CPU."""
        return self.model(x.to(self.device, torch.float32)).float().cpu()

    def probabilities(self, logits: torch.Tensor | np.ndarray) -> np.ndarray:
        """Temperature, then prior correction, then softmax → float64 ``(N, num_classes)``."""
        return adjusted_probabilities(logits, self.meta)

    def predict_images(self, images: Sequence[bytes]) -> np.ndarray:
        """Encoded images → adjusted probabilities ``(N, num_classes)`` float64."""
        if not images:
            return np.zeros((0, self.num_classes))
        return self.probabilities(self.predict_logits(self.preprocess(images)))

    def predict_labels(self, probs: np.ndarray) -> np.ndarray:
        """Class indices ``(N,)``: argmax, or ``p(class 1) >= decision_threshold`` (binary)."""
        probs = np.asarray(probs)
        if self.meta.decision_threshold is not None:
            return (probs[:, 1] >= self.meta.decision_threshold).astype(np.int64)
        return probs.argmax(axis=1).astype(np.int64)
