"""Configs: everything a user writes (flags, YAML), validated before any work starts.

- ``schema``: the strict, layered configs of the jobs that make data and models (prepare,
  train, tune, rebalance); defaults < YAML < flags.
- ``evaluation``: the configs of the jobs that judge a model (evaluate, rank, monitor).
- ``search``: the search space of a tune run (its ``search:`` section).
- ``specs``: the small option languages (class weights, sampler, fine-tuning mode), parsed.
- ``loading``: YAML + flag overrides → a validated config; errors that name the field.
- ``cli``: the jobs' command lines, generated from these models (pydantic-settings).

The room imports only ``constants`` and ``errors``: every other room may read its configs.
"""

from imgpipe.config.evaluation import EvaluateConfig, MonitorConfig, RankConfig, TriggerCriteria
from imgpipe.config.loading import (
    ConfigError,
    apply_overrides,
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
    "EvaluateConfig", "MonitorConfig", "RankConfig", "TriggerCriteria",
    "LossConfig", "MixConfig", "ModelConfig", "ModelName", "OptimConfig", "PrepareConfig",
    "RebalanceConfig", "SamplerConfig", "StrictModel", "TrainConfig", "TuneJobConfig",
    "apply_overrides", "format_validation_error", "load_yaml", "resolve_config",
]
