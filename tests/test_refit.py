"""Refit on train+val after a search (``imgpipe.tuning.refit``, ``TrainConfig.refit``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgpipe.config import ConfigError, TrainConfig, TuneJobConfig, resolve_config
from imgpipe.data.manifest import load_manifest
from imgpipe.report.card import refit_lines


def test_refit_refuses_early_stopping_on_the_split_it_trains_on():
    with pytest.raises(ConfigError, match="patience"):
        resolve_config(TrainConfig, None, {"refit": True, "patience": 3})


def test_search_trials_may_not_train_on_val():
    with pytest.raises(ConfigError, match=r"train\.refit.*--refit"):
        resolve_config(TuneJobConfig, None, {"train": {"refit": True}})


def test_model_card_says_val_is_in_sample():
    lines = refit_lines({"splits": ["train", "val"], "epochs": 7, "selected_trial": "t1",
                         "selected_epoch": 6, "selected_val_macro_f1": 0.8123})
    text = "\n".join(lines)
    assert "train + val for 7 epochs" in text and "`t1`" in text
    assert "val_macro_f1 0.8123 at epoch 7" in text and "in-sample" in text
    assert refit_lines(None) == []


@pytest.mark.ray
def test_refit_streams_val_rows_and_counts_them(ray_session, tiny_digits):
    from imgpipe.constants import LOCAL_STREAM
    from imgpipe.training.trainer import prepare_inputs

    manifest = load_manifest(tiny_digits)
    both = [t + v for t, v in zip(manifest.counts_vector("train"), manifest.counts_vector("val"),
                                  strict=True)]
    cfg = resolve_config(TrainConfig, None, {"data": tiny_digits, "num_workers": 1,
                                             "model": {"name": "cnn", "image_size": 16}})
    for refit, counts in ((False, manifest.counts_vector("train")), (True, both)):
        inputs = prepare_inputs(cfg.model_copy(update={"refit": refit}))
        try:
            assert inputs.loop_config["train_counts"] == counts
            assert inputs.loop_config[LOCAL_STREAM]["decoded"].count() == sum(counts)
        finally:
            inputs.close()


@pytest.mark.slow
@pytest.mark.ray
def test_tune_refit_bundles_the_train_val_model_with_held_out_calibration(
        ray_session, tiny_digits, tmp_path):
    from imgpipe.bundle import BundleError, load_bundle_meta
    from imgpipe.config import RebalanceConfig
    from imgpipe.decoupled.stage import rebalance_classifier
    from imgpipe.evaluate.calibration import calibrate_bundle
    from imgpipe.monitoring.reference import REFERENCE_INFO, init_reference
    from imgpipe.tuning.job import run_tune_job
    from imgpipe.tuning.refit import held_out_calibration

    tcfg = resolve_config(TuneJobConfig, None, {
        "data": tiny_digits, "out": str(tmp_path / "run"), "bundle_root": str(tmp_path / "b"),
        "num_samples": 1, "epochs": 2, "grace_period": 1, "refit": True,
        "train": {"model": {"image_size": 16}, "batch_size": 32}})
    res = run_tune_job(tcfg)
    meta = load_bundle_meta(res["bundle"])
    refit = meta.hyperparameters["refit"]
    assert res["refit"] == refit and refit["selected_trial"] == res["best_trial_id"]
    assert refit["epochs"] == refit["selected_epoch"] + 1 == meta.hyperparameters["epoch"] + 1
    manifest = load_manifest(tiny_digits)
    both = [t + v for t, v in zip(manifest.counts_vector("train"), manifest.counts_vector("val"),
                                  strict=True)]
    assert meta.train_class_counts == both
    # the temperature is the chosen trial's, fitted on held-out val, not re-fitted in-sample
    selected = Path(tmp_path / "run" / "best_checkpoint")
    assert meta.temperature == pytest.approx(held_out_calibration(selected, tiny_digits)[0])
    card = (Path(res["bundle"]) / "model_card.md").read_text()
    assert "in-sample" in card
    assert "in-sample" in Path(res["report"]).read_text()
    # every later step that would fit or estimate on val refuses it, or uses test instead
    with pytest.raises(BundleError, match=r"refit on train\+val.*calibrating"):
        calibrate_bundle(res["bundle"], tiny_digits)
    with pytest.raises(BundleError, match="re-balanced head.*--no-refit"):
        rebalance_classifier(RebalanceConfig(bundle=res["bundle"], data=tiny_digits,
                                             out=str(tmp_path / "rb")))
    reference = init_reference(res["bundle"], tiny_digits)
    info = json.loads((reference.parent / REFERENCE_INFO).read_text())
    assert info["split"] == "test"


def test_the_tune_job_refits_by_default_exactly_when_val_outnumbers_train(tiny_digits, capsys):
    from imgpipe.tuning.job import resolve_refit, val_outnumbers_train

    manifest = load_manifest(tiny_digits)
    train = manifest.counts["train"]
    names = list(manifest.class_names)

    def with_val(val: dict[str, int]):
        return manifest.model_copy(update={"counts": {**manifest.counts, "val": val}})

    tcfg = TuneJobConfig(data=tiny_digits)
    assert tcfg.refit is None  # the default: decided from the data
    as_many = with_val({n: train[n] for n in names})
    assert val_outnumbers_train(as_many) is None
    assert resolve_refit(tcfg, as_many).refit is False
    assert "refit: off" in capsys.readouterr().out
    tail = {n: train[n] + 20 for n in names[-2:]}  # the digits-lt case: 1 train, 20 val
    short = with_val({**{n: 1 for n in names}, **tail})
    assert resolve_refit(tcfg, short).refit is True
    line = capsys.readouterr().out
    assert "refit: on" in line and "2 class(es)" in line and "--no-refit" in line
    for n in names[-2:]:
        assert f"{n} ({train[n]} train / {train[n] + 20} val)" in line
    for given in (True, False):  # --refit / --no-refit win over the data
        assert resolve_refit(tcfg.model_copy(update={"refit": given}), short).refit is given
        assert resolve_refit(tcfg.model_copy(update={"refit": given}), as_many).refit is given
    many = val_outnumbers_train(with_val({n: train[n] + 1 for n in names}), max_named=3)
    assert f"{len(names)} class(es)" in many and f"and {len(names) - 3} more" in many
