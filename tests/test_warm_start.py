"""Warm start: the standard long-tail recipes run first, adapted to (or dropped by) the space."""

from __future__ import annotations

import optuna
import pytest

from imgpipe.config import TrainConfig, resolve_config
from imgpipe.config.search import SearchSpace
from imgpipe.tuning.space import define_space, params_to_overrides
from imgpipe.tuning.tuner import tpe_searcher
from imgpipe.tuning.warm_start import RECIPES, warm_start_points


def replay(space: SearchSpace, point: dict) -> dict:
    """What a real Optuna trial resolves to when the point is enqueued (as OptunaSearch does)."""
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(point)
    return define_space(study.ask(), space, 10)


def test_default_space_starts_with_both_recipes_exactly():
    space = SearchSpace()
    points = warm_start_points(space, 10)
    assert list(points) == list(RECIPES) and len(points) == 2
    for point, recipe in zip(points.values(), RECIPES.values(), strict=True):
        resolved = replay(space, point)
        assert {k: resolved[k] for k in recipe} == recipe
        # a valid trial config: no double correction, every field accepted
        cfg = resolve_config(TrainConfig, None, params_to_overrides(resolved, 10))
        assert cfg.loss.name == recipe["loss"] and cfg.sampler.strategy == recipe["sampler"]
        assert cfg.optim.lr == pytest.approx(1e-3)


@pytest.mark.parametrize("space, kept", [
    (SearchSpace(loss=["ce", "focal"]), ["class-balanced resampling"]),  # LA outside choices
    (SearchSpace(sampler="oversample"), ["class-balanced resampling"]),  # pinned sampler wins
    (SearchSpace(optimizer="sgd"), []),  # pinned optimizer contradicts both
    (SearchSpace(lr_adam=(1e-2, 3e-2)), []),  # lr outside the range
    (SearchSpace(weight_decay=0.0), list(RECIPES)),  # a pinned float simply wins
])
def test_recipes_that_contradict_the_space_are_left_out(space, kept):
    points = warm_start_points(space, 10)
    assert list(points) == kept
    for name, point in points.items():
        resolved = replay(space, point)
        assert resolved["loss"] == RECIPES[name]["loss"]
        assert resolved["sampler"] in (RECIPES[name]["sampler"], space.sampler)


def test_unnamed_parameters_take_the_first_choice():
    space = SearchSpace(weights=["bundles/a/v1", "resnet18"], finetune=["full", "partial"])
    for point in warm_start_points(space, 10).values():
        resolved = replay(space, point)
        assert resolved["weights"] == "bundles/a/v1" and resolved["finetune"] == "full"


def test_what_the_recipes_leave_open_follows_the_space():
    # batch mixing is not part of the long-tail recipes: a pinned mix keeps them, a searched
    # one starts from its first choice
    assert list(warm_start_points(SearchSpace(mix="mixup"), 10)) == list(RECIPES)
    for point in warm_start_points(SearchSpace(mix=["cutmix", "none"]), 10).values():
        assert replay(SearchSpace(mix=["cutmix", "none"]), point)["mix"] == "cutmix"


def test_the_job_searcher_suggests_the_recipes_first_and_can_be_switched_off():
    def suggestions(warm: bool) -> list[dict]:
        searcher = tpe_searcher(SearchSpace(), 10, metric="val_macro_f1", mode="max", seed=0,
                                num_samples=12, warm_start=warm)
        return [searcher.suggest(f"t{i}") for i in range(3)]

    warm = suggestions(True)
    for s, recipe in zip(warm[:2], RECIPES.values(), strict=True):
        assert {k: s[k] for k in recipe} == recipe
    assert suggestions(True) == warm  # same seed, same search
    cold = suggestions(False)[0]
    assert {k: cold.get(k) for k in RECIPES["logit-adjusted"]} != RECIPES["logit-adjusted"]
