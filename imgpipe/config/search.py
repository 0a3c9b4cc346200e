"""The search space a tune run declares: ranges (searched) and single values (pinned) of each
parameter, the ``search:`` section of a tune YAML. Validated with the rest of the config, before
any work; ``tuning.space`` turns it into Optuna suggestions.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imgpipe.config.specs import parse_finetune
from imgpipe.constants import LOSS_NAMES, MIX_PARTNERS, OPTIMIZER_NAMES

FloatRange = float | tuple[float, float]
Choices = str | list[str]
FREE_VECTOR_MAX_CLASSES = 20
MIX_CHOICES = ("none", "mixup", "cutmix", "both")


class SearchSpace(BaseModel):
    """Ranges (``[lo, hi]``) and choices (lists); a scalar pins the parameter."""

    model_config = ConfigDict(extra="forbid")

    lr: FloatRange | None = Field(
        None, description="one lr range for every optimizer (overrides the per-optimizer ones)")
    # SGD wants ~10-100x the lr of the Adam family; one shared range makes many trials diverge
    # (too high for Adam) or crawl (too low for SGD), and ASHA wastes its rungs on them.
    lr_sgd: FloatRange = (1e-2, 3e-1)
    lr_adam: FloatRange = Field((3e-4, 1e-2), description="adam and adamw")
    lr_rmsprop: FloatRange = (1e-4, 3e-3)
    optimizer: Choices = Field(default_factory=lambda: list(OPTIMIZER_NAMES))
    momentum: FloatRange = (0.8, 0.99)
    beta1: FloatRange = (0.8, 0.95)
    weight_decay: FloatRange = (1e-6, 1e-2)
    weight_family: Choices = Field(
        default_factory=lambda: ["none", "power", "effective", "free"])
    power_beta: FloatRange = (0.0, 1.0)
    effective_beta: FloatRange = (0.9, 0.9999)
    free_log_weight: FloatRange = (-2.0, 2.0)
    loss: Choices = Field(default_factory=lambda: list(LOSS_NAMES))
    focal_gamma: FloatRange = (0.5, 4.0)
    tau: FloatRange = (0.25, 2.0)
    sampler: Choices = Field(default_factory=lambda: ["none", "oversample", "sqrt"])
    # Fine-tuning (None: not searched, every trial uses train.model.finetune / optim):
    # finetune choices among full | linear-probe | partial | bitfit | lora (or partial:K);
    # "partial" searches the frozen fraction of the backbone's stages (any architecture).
    finetune: Choices | None = None
    freeze_fraction: FloatRange = (0.25, 0.75)
    head_lr_ratio: FloatRange | None = Field(
        None, description="head lr = lr * ratio, searched log-uniform (e.g. [1, 100])")
    layer_decay: FloatRange | None = None
    # Starting weights (None: every trial uses train.model.weights); the tune job sets the
    # top-ranked --candidates here. Each choice is a candidate spec (imgpipe.transfer).
    weights: Choices | None = None
    # Batch mixing is pinned off by default; e.g. ``mix: [none, mixup, cutmix]`` searches it.
    mix: Choices = "none"  # none | mixup | cutmix | both (torchvision RandomChoice)
    mix_alpha: FloatRange = (0.1, 1.0)
    mix_partner: Choices = "instance"  # instance | balanced

    @model_validator(mode="after")
    def _ranges_ordered(self) -> SearchSpace:
        for name, value in self:
            if isinstance(value, tuple) and not value[0] <= value[1]:
                raise ValueError(f"search.{name}: range [{value[0]}, {value[1]}] is reversed")
            if isinstance(value, list) and not value:
                raise ValueError(f"search.{name}: needs at least one choice")
        if self.finetune is not None:
            for mode in [self.finetune] if isinstance(self.finetune, str) else self.finetune:
                if mode != "partial":
                    try:
                        parse_finetune(mode)
                    except ValueError as e:
                        raise ValueError(f"search.{e} (or partial: search the depth)") from None
        for name, allowed in (("mix", MIX_CHOICES), ("mix_partner", MIX_PARTNERS)):
            value = getattr(self, name)
            bad = sorted(set([value] if isinstance(value, str) else value) - set(allowed))
            if bad:
                raise ValueError(f"search.{name}: unknown {bad}; choose from {list(allowed)}")
        return self
