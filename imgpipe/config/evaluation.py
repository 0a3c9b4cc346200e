"""Configs of the jobs that judge a finished model: evaluate, rank_checkpoints and monitor.

Like every job config they are strict (unknown keys fail) and validated before any work starts;
the option languages they use (priors, windows) are parsed by ``config.specs``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import CliVariadicArg  # list fields take `--flag a b c` on the command line

from imgpipe.config.schema import StrictModel
from imgpipe.config.specs import parse_prior, parse_window
from imgpipe.constants import TEST, THRESHOLD_MODES, TRANSFER_SCORE_NAMES

# Highest Kendall's τ against fine-tuned balanced accuracy in benchmarks/transfer_bench.py
# (0.90 over 7 candidates; linear_probe_balanced 0.81), and it needs no source head.
DEFAULT_PRIMARY = "logme_balanced"


class EvaluateConfig(StrictModel):
    """``jobs/evaluate.py`` settings (YAML keys = these field names)."""

    bundle: str
    data: str
    split: str = TEST
    out: str = "reports/evaluate"
    prior: str | None = Field(
        None, description="model | balanced | train | p1,p2,...; default: the bundle's own")
    calibrate: bool = Field(False, description="fit temperature/threshold on val first")
    threshold_mode: Literal[THRESHOLD_MODES] = "max_f1"
    target_recall: float = Field(0.9, gt=0, le=1)
    many_threshold: int = Field(100, ge=0, description="many-shot: training count above this")
    few_threshold: int = Field(20, ge=0, description="few-shot: training count below this")
    report: bool = Field(True, description="write report.html, PNGs and model_card.md")
    robustness: bool = Field(False, description="also score corrupted copies of the split "
                             "(noise, blur, JPEG, brightness, contrast, rotation, occlusion)")
    robustness_seed: int = 0

    @field_validator("prior", mode="before")
    @classmethod
    def _prior_list_is_text(cls, v: Any) -> Any:
        """A YAML list ``[0.5, 0.5]`` is the same prior as the flag's ``0.5,0.5``."""
        if isinstance(v, (list, tuple)):
            return ",".join(str(p) for p in v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> EvaluateConfig:
        if self.few_threshold > self.many_threshold:
            raise ValueError(f"few_threshold ({self.few_threshold}) must be <= many_threshold "
                             f"({self.many_threshold})")
        parse_prior(self.prior)
        return self


class RankConfig(StrictModel):
    """``jobs/rank_checkpoints.py`` settings (flags override YAML, like every job)."""

    data: str = Field(description="prepared target shards")
    candidates: CliVariadicArg[list[str]] = Field(
        min_length=1, description="bundle, checkpoint folder, ARCH=FILE or random:ARCH")
    out: str = "runs/rank"
    primary: str = Field(DEFAULT_PRIMARY, description="score that orders the table")
    scores: CliVariadicArg[list[str] | None] = Field(None, description="scores to compute (default: all)")
    finetuned: str | None = Field(
        None, description="JSON {candidate: fine-tuned test balanced accuracy} for Kendall's τ")
    num_actors: int = Field(1, ge=1, description="actor-pool size per candidate")
    cpus_per_actor: float = Field(1.0, gt=0)
    batch_size: int = Field(128, ge=1)
    image_size: int = Field(32, ge=8, le=1024, description="for candidates without own preprocessing")
    seed: int = 0
    plot: bool = True

    @field_validator("primary")
    @classmethod
    def _known_primary(cls, v: str) -> str:
        if v not in list(TRANSFER_SCORE_NAMES):
            raise ValueError(f"unknown score {v!r}; valid: {', '.join(list(TRANSFER_SCORE_NAMES))}")
        return v

    @field_validator("scores")
    @classmethod
    def _known_scores(cls, v: list[str] | None) -> list[str] | None:
        bad = sorted(set(v or []) - set(list(TRANSFER_SCORE_NAMES)))
        if bad:
            raise ValueError(f"unknown score(s) {bad}; valid: {', '.join(list(TRANSFER_SCORE_NAMES))}")
        return v


class TriggerCriteria(BaseModel):
    """When to ask for retraining (any criterion met → alert). None disables a criterion."""

    model_config = ConfigDict(extra="forbid")

    drift_p_below: float | None = Field(0.01, gt=0, lt=1)
    prior_tv_above: float | None = Field(0.2, gt=0, le=1, description="EM estimate vs training")
    balanced_accuracy_below: float | None = Field(None, gt=0, le=1,
                                                  description="expected, current rule")
    min_rows: int = Field(200, ge=1, description="never alert on fewer rows")


class MonitorConfig(StrictModel):
    """``jobs/monitor.py`` settings (flags or ``--config monitor.yaml``)."""

    bundle: str
    log: str = Field(description="prediction log folder: local path, s3://, gs://")
    window: str = Field("1h", description="duration (30m, 1h, 2d) or a row count (500)")
    out: str = "runs/monitor"
    every: str | None = Field(None, description="periodic mode: run a pass this often (10m)")
    passes: int | None = Field(None, ge=1, description="periodic mode: stop after N passes")
    alpha: float = Field(0.05, gt=0, lt=1)
    bootstrap: int = Field(200, ge=0)
    permutations: int = Field(500, ge=19)
    seed: int = 0
    low_confidence: float = Field(0.5, gt=0, lt=1)
    apply_prior: bool = False
    prior_method: Literal["em", "bbse"] = "em"
    serve_address: str = Field("http://127.0.0.1:8265", description="Ray dashboard (Serve API)")
    app_name: str = "imgpipe"
    trigger: TriggerCriteria = Field(default_factory=TriggerCriteria)
    retrain_address: str | None = Field(None, description="Ray Jobs API; set to submit tune.py")
    retrain_data: str | None = Field(None, description="prepared data for the retraining job")
    retrain_args: list[str] = Field(default_factory=list, description="extra jobs/tune.py flags")
    retrain_working_dir: str | None = Field(
        None, description="upload this checkout with the job (else the cluster's own is used)")
    active_learning: int = Field(0, ge=0, description="queue size (0: off)")
    active_learning_score: Literal["margin", "entropy"] = "margin"

    @field_validator("window")
    @classmethod
    def _window(cls, v: str) -> str:
        parse_window(v)
        return v

    @field_validator("every")
    @classmethod
    def _every(cls, v: str | None) -> str | None:
        if v is not None and parse_window(v).duration is None:
            raise ValueError(f"every must be a duration like 10m or 1h, got {v!r}")
        return v

    @model_validator(mode="after")
    def _retrain(self) -> MonitorConfig:
        if self.retrain_address and not self.retrain_data:
            raise ValueError("retrain_address needs retrain_data (the data to retrain on)")
        return self
