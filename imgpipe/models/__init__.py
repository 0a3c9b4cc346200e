"""Models: the registry (``create_model``), heads and penultimate features, starting weights.

``create_model``, ``list_models`` and ``unwrap_model`` keep their original import path. The
names are loaded on first use (PEP 562): the registry's specs and the weights resolver are read
where no model is built (a Tune trial's actor, the driver), and importing this package must not
import torch there.
"""

from __future__ import annotations

import importlib
from typing import Any

_SOURCES = {
    "imgpipe.models.heads": ("HEAD", "feature_dim", "forward_features", "get_classifier",
                             "model_spec_of", "parameter_stages", "reset_classifier"),
    "imgpipe.models.registry": ("ModelSpec", "create_model", "get_model_spec", "list_models",
                                "register_model"),
    "imgpipe.models.cnn": ("SmallCNN",),
    "imgpipe.models.state": ("adapt_input_conv", "load_init_checkpoint", "load_state_dict_file",
                             "unwrap_model"),
    "imgpipe.models.weights": ("ResolvedWeights", "WeightsNotCachedError",
                               "create_model_from_weights", "load_init_weights", "resolve_weights",
                               "torchvision_cache_path"),
}
_WHERE = {name: module for module, names in _SOURCES.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'imgpipe.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
