"""Configs: everything a user writes (flags, YAML), validated before any work starts.

- ``schema``: the strict, layered job configs (defaults < YAML < flags) and their loading.
- ``search``: the search space of a tune run (its ``search:`` section).
- ``specs``: the small option languages (class weights, sampler, fine-tuning mode), parsed.

The room imports only ``constants`` and ``errors``: every other room may read its configs.
"""

from imgpipe.config.schema import (
    EMBEDDED_DATASETS,
    MODEL_NAMES,
    Augment,
    ConfigError,
    EmbeddedDataset,
    LossConfig,
    MixConfig,
    ModelConfig,
    ModelName,
    OptimConfig,
    PrepareConfig,
    RebalanceConfig,
    SamplerConfig,
    StrictModel,
    TrainConfig,
    TuneJobConfig,
    choices,
    format_validation_error,
    load_yaml,
    resolve_config,
)

__all__ = [
    "EMBEDDED_DATASETS", "MODEL_NAMES", "Augment", "ConfigError", "EmbeddedDataset",
    "LossConfig", "MixConfig", "ModelConfig", "ModelName", "OptimConfig", "PrepareConfig",
    "RebalanceConfig", "SamplerConfig", "StrictModel", "TrainConfig", "TuneJobConfig",
    "choices", "format_validation_error", "load_yaml", "resolve_config",
]
