"""Models: the registry (``create_model``), heads and penultimate features, starting weights.

``create_model``, ``list_models`` and ``unwrap_model`` keep their original import path.
"""

from imgpipe.models.heads import (
    HEAD,
    feature_dim,
    forward_features,
    get_classifier,
    model_spec_of,
    parameter_stages,
    reset_classifier,
)
from imgpipe.models.registry import (
    ModelSpec,
    SmallCNN,
    create_model,
    get_model_spec,
    list_models,
    register_model,
)
from imgpipe.models.state import (
    adapt_input_conv,
    load_init_checkpoint,
    load_state_dict_file,
    unwrap_model,
)
from imgpipe.models.weights import (
    ResolvedWeights,
    WeightsNotCachedError,
    create_model_from_weights,
    load_init_weights,
    resolve_weights,
    torchvision_cache_path,
)

__all__ = [
    "HEAD", "ModelSpec", "ResolvedWeights", "SmallCNN", "WeightsNotCachedError",
    "adapt_input_conv", "create_model", "create_model_from_weights", "feature_dim",
    "forward_features", "get_classifier", "get_model_spec", "list_models", "load_init_checkpoint",
    "load_init_weights", "load_state_dict_file", "model_spec_of", "parameter_stages", "register_model",
    "reset_classifier", "resolve_weights", "torchvision_cache_path", "unwrap_model",
]
