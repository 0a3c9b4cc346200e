"""The define-by-run search over a ``SearchSpace`` (``config.search``): Optuna suggestions per
trial (``define_space``), and sampled parameters → dotted TrainConfig overrides
(``params_to_overrides``, ``candidate_overrides``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imgpipe.config.search import (
    FREE_VECTOR_MAX_CLASSES,
    Choices,
    FloatRange,
    SearchSpace,
)


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
