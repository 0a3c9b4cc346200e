"""The define-by-run search space: it only declares parameters (no computation here).

Each parameter is either a range/list of choices (searched) or a single value (pinned), all
overridable from the ``search:`` section of a tune YAML. Sampled parameters map onto dotted
TrainConfig fields by ``params_to_overrides``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    optimizer: Choices = Field(default_factory=lambda: ["sgd", "adam", "adamw", "rmsprop"])
    momentum: FloatRange = (0.8, 0.99)
    beta1: FloatRange = (0.8, 0.95)
    weight_decay: FloatRange = (1e-6, 1e-2)
    weight_family: Choices = Field(
        default_factory=lambda: ["none", "power", "effective", "free"])
    power_beta: FloatRange = (0.0, 1.0)
    effective_beta: FloatRange = (0.9, 0.9999)
    free_log_weight: FloatRange = (-2.0, 2.0)
    loss: Choices = Field(default_factory=lambda: ["ce", "focal", "logit-adjusted"])
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
            from imgpipe.models.finetune import parse_finetune

            for mode in [self.finetune] if isinstance(self.finetune, str) else self.finetune:
                if mode != "partial":
                    try:
                        parse_finetune(mode)
                    except ValueError as e:
                        raise ValueError(f"search.{e} (or partial: search the depth)") from None
        for name, allowed in (("mix", MIX_CHOICES), ("mix_partner", ("instance", "balanced"))):
            value = getattr(self, name)
            bad = sorted(set([value] if isinstance(value, str) else value) - set(allowed))
            if bad:
                raise ValueError(f"search.{name}: unknown {bad}; choose from {list(allowed)}")
        return self


def _float(trial, name: str, value: FloatRange, log: bool = False) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    lo, hi = value
    if lo == hi:
        return float(lo)
    return trial.suggest_float(name, lo, hi, log=log and lo > 0)


def _choice(trial, name: str, value: Choices, allowed: list[str] | None = None) -> str:
    full = [value] if isinstance(value, str) else list(value)
    options = full if allowed is None else ([o for o in full if o in allowed] or full[:1])
    if len(options) == 1:
        return options[0]
    # Optuna refuses a categorical whose choices change between trials: a restricted
    # set gets its own parameter name.
    key = name if options == full else f"{name}[{'|'.join(options)}]"
    return trial.suggest_categorical(key, options)


def _lr(trial, space: SearchSpace, optimizer: str) -> float:
    """The lr, searched on a log scale in the range that fits ``optimizer``."""
    if space.lr is not None:
        return _float(trial, "lr", space.lr, log=True)
    family = "adam" if optimizer in ("adam", "adamw") else optimizer
    return _float(trial, f"lr_{family}", getattr(space, f"lr_{family}"), log=True)


def define_space(trial, space: SearchSpace, num_classes: int) -> dict[str, Any]:
    """Optuna define-by-run: conditional parameters only appear when they matter.

    Returns every resolved value (searched or pinned) so a trial's config is complete;
    Ray merges the returned dict with what Optuna sampled.
    """
    r: dict[str, Any] = {}
    r["optimizer"] = _choice(trial, "optimizer", space.optimizer)
    r["lr"] = _lr(trial, space, r["optimizer"])
    r["weight_decay"] = _float(trial, "weight_decay", space.weight_decay, log=True)
    if r["optimizer"] in ("sgd", "rmsprop"):
        r["momentum"] = _float(trial, "momentum", space.momentum)
    else:
        r["beta1"] = _float(trial, "beta1", space.beta1)
    r["sampler"] = _choice(trial, "sampler", space.sampler)
    # Full resampling already balances the classes: stacking inverse weights or logit
    # adjustment on top would correct the imbalance twice over (see config validation).
    balanced = r["sampler"] in ("oversample", "undersample")
    families = ["none"] if balanced else ["none", "power", "effective", "free"]
    if num_classes > FREE_VECTOR_MAX_CLASSES:
        families = [f for f in families if f != "free"]
    family = r["weight_family"] = _choice(trial, "weight_family", space.weight_family, families)
    if family == "power":
        r["power_beta"] = _float(trial, "power_beta", space.power_beta)
    elif family == "effective":
        r["effective_beta"] = _float(trial, "effective_beta", space.effective_beta)
    elif family == "free":
        for i in range(num_classes):
            r[f"log_w{i}"] = _float(trial, f"log_w{i}", space.free_log_weight)
    loss = r["loss"] = _choice(trial, "loss", space.loss, ["ce", "focal"] if balanced else None)
    if loss == "focal":
        r["focal_gamma"] = _float(trial, "focal_gamma", space.focal_gamma)
    elif loss == "logit-adjusted":
        r["tau"] = _float(trial, "tau", space.tau)
    _define_finetune(trial, space, r)
    mix = r["mix"] = _choice(trial, "mix", space.mix)
    if mix != "none":
        r["mix_alpha"] = _float(trial, "mix_alpha", space.mix_alpha)
        r["mix_partner"] = _choice(trial, "mix_partner", space.mix_partner)
    return r


def _define_finetune(trial, space: SearchSpace, r: dict[str, Any]) -> None:
    if space.weights is not None:
        r["weights"] = _choice(trial, "weights", space.weights)
    if space.finetune is not None:
        mode = r["finetune"] = _choice(trial, "finetune", space.finetune)
        if mode == "partial":
            r["freeze_fraction"] = _float(trial, "freeze_fraction", space.freeze_fraction)
    if space.head_lr_ratio is not None:
        r["head_lr_ratio"] = _float(trial, "head_lr_ratio", space.head_lr_ratio, log=True)
    if space.layer_decay is not None:
        r["layer_decay"] = _float(trial, "layer_decay", space.layer_decay)


def free_weight_vector(params: dict[str, Any], num_classes: int) -> list[float]:
    w = np.exp([float(params[f"log_w{i}"]) for i in range(num_classes)])
    return list(w * num_classes / w.sum())


def candidate_overrides(spec: str) -> dict[str, Any]:
    """A candidate spec → the ``model.*`` fields of a trial that starts from it.

    ``random:ARCH`` is a fresh ``ARCH``; ``ARCH=PATH`` a bare weights file of ``ARCH``; any
    other spec is a ``--weights`` value whose architecture the weights say.
    """
    from pathlib import Path

    if spec.startswith("random:"):
        return {"name": spec.removeprefix("random:"), "weights": None}
    if "=" in spec and not Path(spec).expanduser().exists():
        arch, path = spec.split("=", 1)
        return {"name": arch, "weights": path}
    return {"name": None, "weights": spec}


def params_to_overrides(params: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """A trial's resolved parameters (``define_space``'s output) → dotted TrainConfig overrides.

    ``weights`` is left out: a trial's starting weights choose its whole base config
    (``imgpipe.tuning.tuner.candidate_bases``), not a single field.
    """
    p = params
    out: dict[str, Any] = {"optim.lr": p["lr"], "optim.name": p["optimizer"],
                           "optim.weight_decay": p["weight_decay"],
                           "sampler.strategy": p["sampler"], "loss.name": p["loss"]}
    if p["optimizer"] in ("sgd", "rmsprop"):
        out["optim.momentum"] = p["momentum"]
    else:
        out["optim.beta1"] = p["beta1"]
    family = p["weight_family"]
    if family == "power":
        out["loss.class_weights"] = f"power:{p['power_beta']}"
    elif family == "effective":
        out["loss.class_weights"] = f"effective:{p['effective_beta']}"
    elif family == "free":
        out["loss.class_weights"] = ",".join(f"{w:.6g}" for w in free_weight_vector(p, num_classes))
    else:
        out["loss.class_weights"] = "none"
    if p["loss"] == "focal":
        out["loss.focal_gamma"] = p["focal_gamma"]
    elif p["loss"] == "logit-adjusted":
        out["loss.tau"] = p["tau"]
    if "finetune" in p:
        out["model.finetune"] = (f"partial:{p['freeze_fraction']:.4f}" if p["finetune"] == "partial"
                                 else p["finetune"])
    if "head_lr_ratio" in p:
        out["optim.head_lr"] = min(p["lr"] * p["head_lr_ratio"], 10.0)
    if "layer_decay" in p:
        out["optim.layer_decay"] = p["layer_decay"]
    mix = p.get("mix", "none")  # absent in searches saved before mixing existed
    if mix != "none":
        alpha = p["mix_alpha"]
        out["mix.mixup_alpha"] = alpha if mix in ("mixup", "both") else 0.0
        out["mix.cutmix_alpha"] = alpha if mix in ("cutmix", "both") else 0.0
        out["mix.partner"] = p["mix_partner"]
    return out
