"""Strict, layered configs: defaults < YAML file < command-line overrides.

Unknown keys and wrong types fail before any work starts, and the message names the field.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import CliVariadicArg  # list fields take `--flag a b c` on the command line

from imgpipe.config.loading import validation_error_lines
from imgpipe.config.search import SearchSpace
from imgpipe.config.specs import parse_class_weights, parse_finetune, parse_sampler
from imgpipe.constants import (
    LOSS_NAMES,
    METRIC_MODES,
    MIX_PARTNERS,
    OPTIMIZER_NAMES,
    TRANSFER_SCORE_NAMES,
)

EmbeddedDataset = Literal["digits-lt", "shapes-lt"]
EMBEDDED_DATASETS: tuple[str, ...] = get_args(EmbeddedDataset)


class Augment(BaseModel):
    """Train-time augmentation; off for evaluation and serving."""

    model_config = ConfigDict(extra="forbid")

    crop_padding: int = Field(2, ge=0, description="random crop after zero padding (pixels)")
    hflip: bool = Field(False, description="random horizontal flip (wrong for digits/text)")
    rotation_degrees: float = Field(10.0, ge=0, le=180)
    color_jitter: float = Field(0.0, ge=0, le=1, description="brightness/contrast strength")
    random_erasing: float = Field(0.0, ge=0, le=1, description="probability")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PrepareConfig(StrictModel):
    """Where images come from and how they become Parquet shards."""

    dataset: EmbeddedDataset | None = None
    image_folder: str | None = Field(None, description="class-per-folder tree (local or URI)")
    manifest: str | None = Field(None, description="CSV/Parquet with columns path,label[,split]")
    out: str = "data/digits-lt"
    imbalance_ratio: float | None = Field(
        100.0, ge=1.0, description="rho of the long tail; embedded data only unless set for own data"
    )
    seed: int = 0
    val_per_class: int = Field(20, ge=1)
    test_per_class: int = Field(50, ge=1)
    # shapes-lt only
    num_classes: int = Field(10, ge=2, le=1000)
    images_per_class: int = Field(500, ge=1, description="head class size (n_max)")
    image_size: int = Field(32, ge=8, le=512)
    # own data without split folders
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    rows_per_shard: int = Field(64, ge=1, description="small shards → several Ray Data blocks")

    @model_validator(mode="after")
    def _one_source(self) -> PrepareConfig:
        given = [k for k in ("dataset", "image_folder", "manifest") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "exactly one of dataset, image_folder, manifest must be set "
                f"(got {given or 'none'})"
            )
        return self


class LossConfig(StrictModel):
    name: Literal[LOSS_NAMES] = "ce"
    class_weights: str = Field(
        "none", description="none | power:BETA | effective:BETA | w1,w2,... (normalised to mean 1)"
    )
    focal_gamma: float = Field(2.0, ge=0, le=10)
    tau: float = Field(1.0, ge=0, le=5, description="logit adjustment strength (1 = balanced softmax)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    drw_epoch: int | None = Field(
        None, ge=0, description="deferred re-weighting: unweighted until this epoch"
    )

    @field_validator("class_weights")
    @classmethod
    def _scheme_parses(cls, v: str) -> str:
        parse_class_weights(v)
        return v


class OptimConfig(StrictModel):
    name: Literal[OPTIMIZER_NAMES] = "adamw"  # one name per training.optim registry entry
    lr: float = Field(3e-3, gt=0, le=10)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    warmup_epochs: int = Field(1, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="cosine floor as a fraction of lr")
    head_lr: float | None = Field(None, gt=0, le=10, description="classifier head lr (default: lr)")
    layer_decay: float | None = Field(
        None, gt=0, le=1, description="layer-wise lr decay: stage s of S gets lr * d^(S - s)")
    grad_clip: float | None = Field(5.0, gt=0)
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="keep an exponential moving average of the weights "
        "(decay per optimizer step, with timm's warm-up); val scores, checkpoints and bundles "
        "use the average")


class SamplerConfig(StrictModel):
    strategy: str = Field(
        "none", description="none | oversample | undersample | sqrt | p1,p2,... (target distribution)"
    )

    @field_validator("strategy")
    @classmethod
    def _strategy_parses(cls, v: str) -> str:
        parse_sampler(v)
        return v


ModelName = Literal["cnn", "resnet18", "resnet34", "resnet50", "mobilenet_v3_small",
                    "efficientnet_b0", "convnext_tiny", "vit_b_16"]
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)


class MixConfig(StrictModel):
    """Batch mixing: torchvision v2 MixUp / CutMix with soft targets, and the partner draw.

    ``partner=instance`` mixes each image with another image of the same batch (torchvision's
    pairing); ``balanced`` draws the second image class-balanced from a per-run pool of up to
    ``pool_per_class`` images per class (Remix, Chou et al. 2020; Balanced-MixUp, Galdran
    et al. 2021), so tail classes are mixed in as often as head classes.
    """

    mixup_alpha: float = Field(0.0, ge=0, le=10, description="MixUp Beta(alpha, alpha); 0 = off")
    cutmix_alpha: float = Field(0.0, ge=0, le=10, description="CutMix Beta(alpha, alpha); 0 = off")
    prob: float = Field(1.0, ge=0, le=1, description="probability that a batch is mixed")
    partner: Literal[MIX_PARTNERS] = "instance"
    pool_per_class: int = Field(32, ge=1, le=10_000,
                                description="balanced partner: images kept per class")

    @property
    def enabled(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0

    @model_validator(mode="after")
    def _partner_needs_mixing(self) -> MixConfig:
        if self.partner == "balanced" and not self.enabled:
            raise ValueError("partner: 'balanced' needs mixup_alpha or cutmix_alpha > 0 "
                             "(and prob > 0)")
        return self


class ModelConfig(StrictModel):
    """Architecture, starting weights and fine-tuning mode.

    ``None`` for name / cifar_stem / image_size means "what the weights say" (a torchvision
    weights name, bundle or checkpoint), else the defaults cnn / true / 32; resolved on the
    driver before any work starts (``imgpipe.models.weights.resolve_model_config``).
    """

    name: ModelName | None = Field(None, description="architecture (default: the weights', else cnn)")
    cifar_stem: bool | None = Field(None, description="small-image stem (ResNets, cnn)")
    weights: str | None = Field(
        None, description="starting weights: local .safetensors/.pt/.pth file, torchvision "
        "weights name (resnet50.IMAGENET1K_V2, local hub cache only), bundle or checkpoint folder")
    image_size: int | None = Field(None, ge=8, le=1024, description=(
        "default: the weights', else from the data (native side rounded up to a multiple of 8, "
        "16-224 px; 32 for mixed sizes)"))
    finetune: str = Field(
        "full", description="full | linear-probe | partial:K (freeze stages < K) | bitfit | lora")
    lora_rank: int = Field(8, ge=1, le=512, description="LoRA rank r (finetune=lora)")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (finetune=lora)")

    @model_validator(mode="before")
    @classmethod
    def _init_checkpoint_is_weights(cls, data: Any) -> Any:
        """``init_checkpoint`` (before --weights existed) is accepted as ``weights``."""
        if isinstance(data, dict) and "init_checkpoint" in data:
            data = dict(data)
            old = data.pop("init_checkpoint")
            if old is not None and data.get("weights") not in (None, old):
                raise ValueError("init_checkpoint and weights both set (init_checkpoint is the "
                                 "old name of weights; keep one)")
            if old is not None:
                data["weights"] = old
        return data

    @field_validator("finetune")
    @classmethod
    def _finetune_parses(cls, v: str) -> str:
        parse_finetune(v)
        return v


class TrainConfig(StrictModel):
    """One training run (also the per-trial config of a tune run)."""

    data: str = "data/digits-lt"
    out: str = "runs/train"
    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, description="per worker")
    min_steps_per_epoch: int = Field(
        10, ge=1, description="optimizer steps per epoch at least (small data gets more "
        "augmented passes per epoch instead of too few steps); every rank runs the same count")
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.45, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    use_gpu: bool = False
    amp: bool = Field(False, description="mixed precision (GPU only)")
    seed: int = 0
    metric: Literal["macro_f1", "balanced_accuracy", "accuracy"] = "macro_f1"
    patience: int | None = Field(None, ge=1, description="early stopping on the val metric")
    refit: bool = Field(
        False, description="train on train+val: the val images join the train stream and the "
        "class counts, so nothing is held out; the run keeps its last epoch, and its val scores "
        "are in-sample. For a configuration already chosen on val (the tune job's --refit)")
    resume: str | None = Field(None, description="checkpoint dir to resume from")
    max_failures: int = Field(
        3, ge=-1, description="worker/node failures recovered from by restoring the latest "
        "checkpoint (Ray Train's restart; with one worker, Tune's retry of the run's trial "
        "actor) (-1: unlimited, 0: fail on the first)")
    cache_decoded: bool = Field(True, description="decode once per run (object store)")
    shuffle_buffer: int = Field(256, ge=0)
    deterministic: bool = Field(False, description="preserve Ray Data order (slower)")
    storage_path: str | None = Field(
        None, description="where the run's checkpoints are kept (local or s3:// gs://)")
    progress: bool = Field(True, description="one progress line per epoch on the console")
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    sampler: SamplerConfig = SamplerConfig()
    augment: Augment = Augment()
    mix: MixConfig = MixConfig()

    @model_validator(mode="before")
    @classmethod
    def _verbose_is_progress(cls, data: Any) -> Any:
        """``verbose`` (the name until the jobs' --verbose came to mean Ray's logs) is accepted
        as ``progress``."""
        if isinstance(data, dict) and "verbose" in data:
            data = dict(data)
            old = data.pop("verbose")
            if "progress" in data and data["progress"] != old:
                raise ValueError("verbose and progress both set (verbose is the old name of "
                                 "progress; keep one)")
            data["progress"] = old
        return data

    @model_validator(mode="after")
    def _sane(self) -> TrainConfig:
        if self.amp and not self.use_gpu:
            raise ValueError("amp: mixed precision needs use_gpu=true")
        if self.metric not in METRIC_MODES:
            raise ValueError(f"metric: unknown {self.metric!r}")
        if self.refit and self.patience is not None:
            raise ValueError("patience: early stopping needs a held-out val split, and refit "
                             "trains on val; give refit a fixed number of epochs instead")
        self._not_double_corrected()
        return self

    def _not_double_corrected(self) -> None:
        """Full resampling already balances the classes; a second full correction on top
        (inverse-frequency weights, or logit adjustment with tau >= 1) over-corrects toward
        the tail — a common mistake that silently costs head-class accuracy."""
        if self.sampler.strategy not in ("oversample", "undersample"):
            return
        w = parse_class_weights(self.loss.class_weights)
        full_weights = (w.scheme == "power" and w.beta >= 0.99) or (
            w.scheme == "effective" and w.beta >= 0.999)
        full_logit = self.loss.name == "logit-adjusted" and self.loss.tau >= 0.99
        if full_weights or full_logit:
            what = "loss.class_weights" if full_weights else "loss.tau"
            raise ValueError(
                f"{what}: sampler.strategy={self.sampler.strategy} already balances the classes; "
                f"adding {'inverse-frequency weights' if full_weights else 'logit adjustment'} "
                "at full strength corrects the imbalance twice. Use one, or weaken the other "
                "(e.g. power:0.5, tau 0.5, or sampler sqrt)")


class TuneJobConfig(StrictModel):
    """A search: Tune + Optuna (TPE) + a scheduler over TrainConfig trials → a verified bundle."""

    data: str = "data/digits-lt"
    dataset: EmbeddedDataset | None = Field(
        None, description="embedded dataset to prepare into `data` when it has no manifest "
        "(digits-lt is prepared at the default `data` path without asking)")
    out: str = "runs/tune"
    name: str = Field("tune", pattern=r"^[A-Za-z0-9_.-]+$")
    bundle_root: str = "bundles"
    bundle_name: str | None = Field(None, description="default: the data folder's name")
    num_samples: int = Field(12, ge=1)
    max_concurrent: int = Field(2, ge=1)
    time_budget_s: float | None = Field(None, gt=0)
    workers_per_trial: int = Field(1, ge=1)
    cpus_per_worker: float = Field(0.45, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    use_gpu: bool = False
    storage_path: str | None = Field(None, description="Tune/Train storage (local, s3://, gs://)")
    seed: int = 0
    metric: Literal["macro_f1", "balanced_accuracy"] = "macro_f1"
    scheduler: Literal["asha", "median", "fifo"] = "asha"
    epochs: int = Field(16, ge=1, description="max epochs per trial (ASHA's max_t)")
    grace_period: int | None = Field(
        None, ge=1, description="epochs before ASHA may stop a trial (default min(4, epochs))")
    reduction_factor: float = Field(3.0, gt=1)
    warm_start: bool = Field(
        True, description="run the standard long-tail recipes that fit the search space first "
        "(logit adjustment; class-balanced resampling), then TPE")
    resume: bool = False
    trial_max_failures: int = Field(
        2, ge=-1, description="times Tune retries a failed trial (from its latest checkpoint)")
    report: bool = Field(True, description="write the evaluation report for the best bundle")
    refit: bool | None = Field(
        None, description="after the search, retrain the best trial's configuration on "
        "train+val for the epochs its checkpoint had, and bundle that model (AutoGluon's "
        "refit_full): rare classes gain their val images; test stays unseen. Default: only "
        "when val holds more images than train of some class")
    train: dict[str, Any] = Field(
        default_factory=dict, description="TrainConfig fields shared by all trials")
    search: dict[str, Any] = Field(default_factory=dict, description="SearchSpace overrides")
    candidates: CliVariadicArg[list[str] | None] = Field(
        None, min_length=1, description="starting weights to choose from (any --weights form, "
        "ARCH=PATH or random:ARCH): ranked by transferability before the search, which then "
        "searches over the top_k")
    top_k: int = Field(2, ge=1, description="ranked candidates the search tries")
    rank_score: str = Field("logme_balanced",
                            description="transferability score that picks the top_k")

    @property
    def effective_grace_period(self) -> int:
        return self.grace_period if self.grace_period is not None else min(4, self.epochs)

    @model_validator(mode="after")
    def _consistent(self) -> TuneJobConfig:
        if (self.grace_period is not None and self.grace_period > self.epochs
                and self.scheduler != "fifo"):  # FIFO never stops a trial: no grace to give
            raise ValueError(f"grace_period ({self.grace_period}) exceeds epochs ({self.epochs})")
        if self.train.get("refit"):
            raise ValueError("train.refit: trials are compared on val, so they must not train "
                             "on it; use refit (--refit) to retrain the chosen one on train+val")
        if self.candidates:
            if self.rank_score not in TRANSFER_SCORE_NAMES:
                raise ValueError(f"rank_score: unknown score {self.rank_score!r}; valid: "
                                 f"{', '.join(TRANSFER_SCORE_NAMES)}")
            model = self.train.get("model") or {}
            for key in ("weights", "init_checkpoint", "name"):
                if model.get(key):
                    raise ValueError(f"candidates: train.model.{key} is set too; the ranking "
                                     "picks the starting weights (drop one of the two)")
            if self.search.get("weights"):
                raise ValueError("candidates: search.weights is set too (drop one of the two)")
        for section, model in (("search", SearchSpace), ("train", TrainConfig)):
            try:
                model.model_validate(getattr(self, section))
            except ValidationError as e:
                # as the section's own paths (train.batch_size), not a nested "invalid train"
                raise ValueError("\n".join(validation_error_lines(e, section))) from None
        return self


class RebalanceConfig(StrictModel):
    """Decoupled classifier re-balancing of a bundle (Kang et al., ICLR 2020): frozen backbone,
    features extracted once, a re-balanced linear head, published as a new bundle version."""

    bundle: str = Field(description="source bundle: bundles/<name>/v<N> or bundles/<name> (latest)")
    data: str = Field(description="prepared shards the bundle was trained on (train, val, test)")
    method: Literal["crt", "tau-norm", "lws"] = "crt"
    smote: int | None = Field(None, ge=1, le=100,
                              description="k neighbours: oversample features before cRT")
    smote_method: Literal["smote", "borderline", "adasyn"] = "smote"
    out: str = Field("runs/rebalance", description="results.json goes here")
    bundle_root: str | None = Field(None, description="default: the source bundle's root")
    bundle_name: str | None = Field(None, description="default: the source bundle's name")
    metric: Literal["balanced_accuracy", "macro_f1"] = Field(
        "balanced_accuracy", description="val metric that picks tau / the best head epoch")
    epochs: int = Field(30, ge=1, le=10_000, description="cRT / LWS epochs over the features")
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.05, gt=0, le=10, description="SGD (momentum 0.9, cosine) learning rate")
    weight_decay: float = Field(5e-4, ge=0, le=1)
    tau_max: float = Field(2.0, gt=0, le=10, description="tau-norm: grid 0..tau_max")
    tau_step: float = Field(0.05, gt=0, le=1)
    seed: int = 0
    num_actors: int = Field(2, ge=1, description="feature-extraction actors (Ray Data)")
    cpus_per_actor: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _smote_with_crt(self) -> RebalanceConfig:
        if self.smote is not None and self.method != "crt":
            raise ValueError(f"smote: feature oversampling trains a new head, so it needs "
                             f"method crt (got {self.method})")
        return self
