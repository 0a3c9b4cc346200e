"""``jobs/tune.py --candidates``: rank starting weights by transferability, search the top-k."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from imgpipe.bundle import load_bundle
from imgpipe.config import ConfigError, TuneJobConfig, resolve_config
from imgpipe.config.search import SearchSpace
from imgpipe.tuning.candidates import NoUsableCandidateError, top_candidates
from imgpipe.tuning.space import candidate_overrides, params_to_overrides


def test_candidate_specs_become_model_fields(tmp_path):
    existing = tmp_path / "a=b.safetensors"  # an '=' inside a real path is a path
    existing.write_bytes(b"")
    assert candidate_overrides("random:resnet18") == {"name": "resnet18", "weights": None}
    assert candidate_overrides("cnn=zoo/x.safetensors") == {"name": "cnn",
                                                            "weights": "zoo/x.safetensors"}
    assert candidate_overrides("bundles/shapes/v2") == {"name": None,
                                                        "weights": "bundles/shapes/v2"}
    assert candidate_overrides(str(existing)) == {"name": None, "weights": str(existing)}
    params = {"lr": 0.01, "optimizer": "adam", "weight_decay": 0.0, "beta1": 0.9,
              "sampler": "none", "weight_family": "none", "loss": "ce", "weights": "x"}
    assert not any(k.startswith("model.") for k in params_to_overrides(params, 3))


def _doc(*rows):
    return {"primary": "logme", "candidates": [
        {"candidate": c, "status": s, "reason": r, "scores": {"logme": v} if s == "ok" else {}}
        for c, s, v, r in rows]}


def test_top_candidates_skip_failed_and_unscored_ones():
    doc = _doc(("a", "ok", 2.0, None), ("b", "ok", None, None), ("c", "ok", 1.0, None),
               ("d", "failed", None, "no such file"))
    assert top_candidates(doc, 2) == ["a", "c"]
    assert top_candidates(doc, 5) == ["a", "c"]
    with pytest.raises(NoUsableCandidateError, match="d: no such file"):
        top_candidates(_doc(("d", "failed", None, "no such file")), 2)


@pytest.mark.parametrize("fields, message", [
    ({"rank_score": "accuracy"}, "rank_score: unknown score 'accuracy'"),
    ({"train": {"model": {"weights": "w.pt"}}}, "train.model.weights is set too"),
    ({"train": {"model": {"name": "resnet18"}}}, "train.model.name is set too"),
    ({"search": {"weights": ["a"]}}, "search.weights is set too"),
])
def test_candidates_conflicts_fail_with_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(TuneJobConfig, None, {"candidates": ["a", "b"], **fields})


def test_search_space_draws_weights_only_when_given():
    import optuna

    from imgpipe.tuning.space import define_space

    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    assert "weights" not in define_space(trial, SearchSpace(), 3)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    assert define_space(trial, SearchSpace(weights=["a", "b"]), 3)["weights"] in ("a", "b")


@pytest.mark.slow
@pytest.mark.ray
def test_tune_ranks_candidates_and_searches_the_top_k(ray_session, tiny_digits, tmp_path):
    """Three candidates (a bundle of another size, a random init, a missing file): the broken
    one is reported and skipped, the search draws its weights from the top two only, and the
    exported bundle says which weights its best trial started from."""
    from helpers import make_test_bundle

    from imgpipe.training.defaults import MIN_SIDE
    from imgpipe.tuning.job import run_tune_job

    source = make_test_bundle(tmp_path / "zoo", num_classes=4, image_size=16)
    candidates = [str(source), "random:cnn", str(tmp_path / "missing")]
    tcfg = resolve_config(TuneJobConfig, None, {
        "data": tiny_digits, "out": str(tmp_path / "run"), "bundle_root": str(tmp_path / "b"),
        "num_samples": 3, "epochs": 1, "grace_period": 1, "max_concurrent": 1,
        "report": False, "candidates": candidates, "top_k": 2, "seed": 3,
        "train": {"batch_size": 32}})
    res = run_tune_job(tcfg)
    ranking = json.loads((tmp_path / "run" / "rank" / "ranking.json").read_text())
    rows = {r["candidate"]: r for r in ranking["candidates"]}
    assert rows[candidates[2]]["status"] == "failed" and rows[candidates[2]]["rank"] is None
    assert {rows[c]["rank"] for c in candidates[:2]} == {1, 2}
    trials = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert len(trials) == 3 and set(trials["config/weights"]) <= set(candidates[:2])
    assert res["best_params"]["weights"] in candidates[:2]
    meta, _ = load_bundle(Path(res["bundle"]))
    # a trial from the 16 px bundle trains at 16 px; one from random:cnn at the size the
    # data's native 8 px resolve to (raised to MIN_SIDE)
    expected = 16 if res["best_params"]["weights"] == str(source) else MIN_SIDE
    assert meta.preprocess.image_size == expected
