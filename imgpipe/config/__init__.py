"""Configs: everything a user writes (flags, YAML), validated before any work starts.

- ``schema``: the strict, layered job configs (defaults < YAML < flags) and their loading.
- ``search``: the search space of a tune run (its ``search:`` section).
- ``specs``: the small option languages (class weights, sampler, fine-tuning mode), parsed.
- ``loading``: YAML + flag overrides → a validated config; errors that name the field.
- ``cli``: the jobs' command lines, generated from these models (pydantic-settings).

The room imports only ``constants`` and ``errors``: every other room may read its configs.
"""

from imgpipe.config.loading import (
    ConfigError,
    format_validation_error,
    load_yaml,
    resolve_config,
)
from imgpipe.config.schema import (
    EMBEDDED_DATASETS,
    MODEL_NAMES,
    Augment,
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
)

__all__ = [
    "EMBEDDED_DATASETS", "MODEL_NAMES", "Augment", "ConfigError", "EmbeddedDataset",
    "LossConfig", "MixConfig", "ModelConfig", "ModelName", "OptimConfig", "PrepareConfig",
    "RebalanceConfig", "SamplerConfig", "StrictModel", "TrainConfig", "TuneJobConfig",
    "format_validation_error", "load_yaml", "resolve_config",
]
