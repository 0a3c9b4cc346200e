"""Live settings as one immutable snapshot per replica, swapped whole by ``reconfigure``.

A request reads ``model.live`` once and uses that object for everything it answers
(probabilities, the decision label, model name/version, calibration), so a ``reconfigure``
running meanwhile never gives one response a mix of old and new settings. ``reconfigure``
builds and validates the next snapshot completely before one attribute assignment publishes
it (atomic under the GIL); nothing ever mutates a published snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from imgpipe.bundle import BundleMeta, validate_meta
from imgpipe.inference import adjusted_probabilities
from serving.schemas import LiveConfig


def apply_live_config(meta: BundleMeta, live: LiveConfig) -> BundleMeta:
    """The bundle's metadata with the live calibration overrides applied (validated).

    Raises BundleError when an override does not fit the bundle (e.g. a prior of the wrong
    length, a threshold on a multi-class model).
    """
    fields = meta.model_dump()
    for key in ("temperature", "deployment_prior", "decision_threshold"):
        value = getattr(live, key)
        if value is not None:
            fields[key] = value
    return validate_meta(fields, f"{meta.name} v{meta.version} with user_config")


@dataclass(frozen=True)
class LiveState:
    """One consistent set of live settings: the user_config and the metadata it yields."""

    config: LiveConfig
    meta: BundleMeta  # bundle metadata with the live calibration overrides applied

    @classmethod
    def create(cls, bundle_meta: BundleMeta, config: LiveConfig) -> LiveState:
        """Validate ``config`` against the bundle. Raises BundleError when it does not fit."""
        return cls(config=config, meta=apply_live_config(bundle_meta, config))

    def probabilities(self, logits: torch.Tensor | np.ndarray) -> np.ndarray:
        """Logits ``(N, C)`` → float64 probabilities: temperature, prior shift, softmax
        (``imgpipe.inference.adjusted_probabilities``, as offline evaluation does)."""
        return adjusted_probabilities(logits, self.meta)

    def label_indices(self, probs: np.ndarray) -> np.ndarray:
        """Decision per row ``(N,)``: argmax, or ``p(class 1) >= threshold`` for binary bundles."""
        threshold = self.meta.decision_threshold
        if threshold is not None:
            return (probs[:, 1] >= threshold).astype(np.int64)
        return probs.argmax(axis=1).astype(np.int64)

    def labels(self, probs: np.ndarray) -> list[str]:
        names = self.meta.class_names
        return [names[i] for i in self.label_indices(probs)]
