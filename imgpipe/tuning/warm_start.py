"""Warm start: the field's standard long-tail recipes are a search's first trials.

A dozen trials over a wide conditional space is mostly a lottery: Optuna's TPE draws its first
``n_startup_trials`` at random, and on class-imbalanced data many random points (a large SGD lr,
a free per-class weight vector, no correction at all) collapse to the head classes. Evaluating
known-good recipes first gives ASHA a strong incumbent at every rung and TPE a good region to
model. Auto-ML tools do the same (AutoGluon and Ludwig try their default configurations first);
Optuna's ``enqueue_trial``, through ``OptunaSearch(points_to_evaluate=...)``, is the mechanism.

A recipe is adapted to the user's search space by running ``define_space`` on it: parameters
the recipe does not name take the first choice / the middle of the range, values the user
pinned win, and a recipe that contradicts the space (a value outside a range or choice list) is
left out, so a point is always one the space could have produced.
"""

from __future__ import annotations

import math
from typing import Any

from imgpipe.config.search import SearchSpace
from imgpipe.tuning.space import define_space

# Logical parameter → value. Sources: logit adjustment with tau = 1 (Menon et al., "Long-tail
# learning via logit adjustment", ICLR 2021); class-balanced resampling with plain CE (Kang et
# al., "Decoupling representation and classifier", ICLR 2020, the joint-training baseline).
# AdamW with lr 1e-3 and weight decay 1e-4 is the usual small-CNN setting (Loshchilov & Hutter).
RECIPES: dict[str, dict[str, Any]] = {
    "logit-adjusted": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "beta1": 0.9,
                       "sampler": "none", "weight_family": "none", "loss": "logit-adjusted",
                       "tau": 1.0},
    "class-balanced resampling": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4,
                                  "beta1": 0.9, "sampler": "oversample", "weight_family": "none",
                                  "loss": "ce"},
}
_MISSING = object()


def _logical(name: str) -> str:
    """Optuna's parameter name → the recipe's: ``loss[ce|focal]`` → ``loss``, ``lr_adam`` → ``lr``."""
    name = name.split("[", 1)[0]
    return "lr" if name.startswith("lr_") else name


class _RecipeTrial:
    """Answers ``define_space``'s suggestions from a recipe and records Optuna's names."""

    def __init__(self, recipe: dict[str, Any]) -> None:
        self.recipe = recipe
        self.params: dict[str, Any] = {}
        self.fits = True

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        value = self.recipe.get(_logical(name), _MISSING)
        if value is _MISSING or value not in choices:
            self.fits = self.fits and value is _MISSING
            value = choices[0]
        self.params[name] = value
        return value

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        value = self.recipe.get(_logical(name), _MISSING)
        if value is _MISSING or not low <= value <= high:
            self.fits = self.fits and value is _MISSING
            value = math.sqrt(low * high) if log else (low + high) / 2
        self.params[name] = float(value)
        return float(value)


def warm_start_points(space: SearchSpace, num_classes: int,
                      recipes: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The recipes that fit ``space``, by name, as Optuna parameter dicts for
    ``points_to_evaluate`` (in order, without duplicates).

    A recipe fits when none of its values is outside the space and the user's pinned values
    agree with it; what a recipe does not name (batch mixing, starting weights, ...) follows
    the space.
    """
    points: dict[str, dict[str, Any]] = {}
    for name, recipe in (RECIPES if recipes is None else recipes).items():
        trial = _RecipeTrial(recipe)
        resolved = define_space(trial, space, num_classes)
        pinned_agree = all(resolved[k] == v for k, v in recipe.items()
                           if k in resolved and k != "lr" and not isinstance(v, float))
        if trial.fits and pinned_agree and trial.params not in points.values():
            points[name] = trial.params
    return points
