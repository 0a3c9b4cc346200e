"""Data-dependent settings are checked against the data before Ray starts (issue 10, C).

Every job is called in-process: the checks must fail fast, exit 2, name the field, and never
reach the job's ``init_ray`` (a tripwire replaces it), so Ray is neither started nor connected —
also when the suite's shared instance already runs in this process.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import make_test_bundle
from test_evaluate import write_tiny_shards

from imgpipe.config import ConfigError, TrainConfig, TuneJobConfig
from imgpipe.constants import TEST, TRAIN, VAL
from imgpipe.preflight import (
    check_evaluate_config,
    check_ranks_get_rows,
    check_search_against_classes,
    check_serve_overrides,
    check_train_against_counts,
    check_tune_config,
)

ROOT = Path(__file__).resolve().parents[1]
TEN = [50, 40, 30, 20, 10, 8, 6, 4, 2, 1]


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job_preflight", ROOT / "jobs" / f"{name}.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    if hasattr(job, "init_ray"):
        def tripwire(*args, **kwargs):
            raise AssertionError(f"jobs/{name}.py reached init_ray before refusing the input")

        job.init_ray = tripwire
    return job


@pytest.fixture(scope="module")
def ten_class_data(tmp_path_factory) -> str:
    """10 classes, like digits-lt (one class absent from val to exercise 'mass on absent')."""
    return write_tiny_shards(tmp_path_factory.mktemp("ten") / "data",
                             {TRAIN: [3] * 9 + [0], VAL: [1] * 10, TEST: [1] * 10}, size=8)


def assert_refused_before_ray(capsys, rc: int, field: str) -> None:
    err = capsys.readouterr().err
    assert rc == 2, err  # a reached tripwire would raise out of main(), not return 2
    assert field in err, err


@pytest.mark.parametrize(("flags", "field"), [
    (["--class-weights", "1,2,3"], "loss.class_weights"),  # the reported cases
    (["--sampler", "0.5,0.5"], "sampler.strategy"),
    (["--sampler", ",".join(["0.1"] * 10)], "sampler.strategy"),  # mass on the absent class
    (["--class-weights", ",".join(["1"] * 11)], "loss.class_weights"),
    # 27 train rows: more ranks than rows would leave one without data (a DDP hang)
    (["--num-workers", "30"], "num_workers: 30 workers but an epoch (sampler 'none') holds "
                              "about 27 rows"),
])
def test_train_job_refuses_vectors_that_do_not_fit_the_data(ten_class_data, capsys, flags,
                                                            field):
    rc = load_job("train").main(["--data", ten_class_data, "--out", "/tmp/unused", *flags])
    assert_refused_before_ray(capsys, rc, field)


def test_train_yaml_is_checked_the_same_way(ten_class_data, tmp_path, capsys):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(yaml.safe_dump({"data": ten_class_data, "out": str(tmp_path / "o"),
                                   "loss": {"class_weights": "1,2"}}))
    rc = load_job("train").main(["--config", str(cfg)])
    assert_refused_before_ray(capsys, rc, "loss.class_weights")


def test_right_lengths_pass():
    cfg = TrainConfig(loss={"class_weights": ",".join(["1"] * 10)},
                      sampler={"strategy": ",".join(["0.1"] * 9 + ["0"])})
    check_train_against_counts(cfg, TEN[:9] + [0], None)
    cfg = TrainConfig(loss={"name": "logit-adjusted", "class_weights": "power:0.5"})
    check_train_against_counts(cfg, TEN, None)


@pytest.mark.parametrize(("train", "search", "field"), [
    ({"loss": {"class_weights": "1,2,3"}}, {}, "train.loss.class_weights"),
    ({"sampler": {"strategy": "0.5,0.5"}}, {}, "train.sampler.strategy"),
    ({}, {"sampler": ["none", "0.5,0.5"]}, "search.sampler[1]"),
    ({}, {"sampler": "0.5,0.5"}, "search.sampler[0]"),
    ({}, {"sampler": ["none", "balanced"]}, "search.sampler[1]"),
    ({}, {"loss": ["ce", "focal-ish"]}, "search.loss[1]"),
    ({}, {"optimizer": ["lamb"]}, "search.optimizer[0]"),
    ({}, {"weight_family": ["free", "inverse"]}, "search.weight_family[1]"),
])
def test_tune_job_refuses_before_ray(ten_class_data, tmp_path, capsys, train, search, field):
    cfg = tmp_path / "tune.yaml"
    cfg.write_text(yaml.safe_dump({"data": ten_class_data, "out": str(tmp_path / "o"),
                                   "train": train, "search": search}))
    rc = load_job("tune").main(["--config", str(cfg)])
    assert_refused_before_ray(capsys, rc, field)


def test_tune_refuses_more_workers_per_trial_than_any_searched_epoch_has_rows(
        ten_class_data, tmp_path, capsys):
    cfg = tmp_path / "tune.yaml"
    cfg.write_text(yaml.safe_dump({"data": ten_class_data, "out": str(tmp_path / "o"),
                                   "workers_per_trial": 30,
                                   "search": {"sampler": ["none", "undersample"]}}))
    rc = load_job("tune").main(["--config", str(cfg)])
    assert_refused_before_ray(capsys, rc, "workers_per_trial: 30 workers but an epoch (sampler "
                                          "'none') holds about 27 rows")
    # undersampling TEN keeps 1 row per class: 10 rows, fewer than 12 workers
    check_ranks_get_rows(TEN, "none", 12, "workers_per_trial")
    with pytest.raises(ConfigError, match=r"'undersample'\) holds about 10 rows.*at most 10"):
        check_ranks_get_rows(TEN, "undersample", 12, "workers_per_trial")


def test_tune_without_prepared_data_checks_against_the_embedded_dataset(tmp_path):
    tcfg = TuneJobConfig(data=str(tmp_path / "fresh"), dataset="digits-lt",
                         search={"sampler": ",".join(["0.1"] * 10)})
    check_tune_config(tcfg)  # digits-lt has 10 classes: fits
    tcfg = TuneJobConfig(data=str(tmp_path / "fresh"), dataset="digits-lt",
                         train={"loss": {"class_weights": "1,2"}})
    with pytest.raises(ConfigError, match="train.loss.class_weights"):
        check_tune_config(tcfg)


def test_search_vector_lengths():
    check_search_against_classes({"sampler": ["none", "0.2,0.8"]}, 2)
    with pytest.raises(ConfigError, match=r"search.sampler\[0\].*has 3 value\(s\).*2 classes"):
        check_search_against_classes({"sampler": "0.2,0.3,0.5"}, 2)


@pytest.fixture(scope="module")
def four_class(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("four")
    data = write_tiny_shards(root / "data", {TRAIN: [3, 3, 2, 1], VAL: [1] * 4, TEST: [1] * 4},
                             size=8)
    bundle = make_test_bundle(root / "bundles", num_classes=4, train_class_counts=[3, 3, 2, 1])
    return str(bundle), data


@pytest.mark.parametrize(("prior", "field"), [("0.5,0.5", "prior"), ("1,1,1,-1", "prior"),
                                              ("0,0,0,0", "prior"), ("uniform", "prior")])
def test_evaluate_prior_checked_against_the_bundle(four_class, tmp_path, capsys, prior, field):
    bundle, data = four_class
    rc = load_job("evaluate").main(["--bundle", bundle, "--data", data, "--prior", prior,
                                    "--out", str(tmp_path / "e")])
    assert_refused_before_ray(capsys, rc, field)
    assert not (tmp_path / "e").exists()  # nothing was evaluated or written


def test_evaluate_refuses_data_with_other_classes(four_class, ten_class_data):
    bundle, _ = four_class
    with pytest.raises(ConfigError, match="^data: .* bundle was trained on"):
        check_evaluate_config(bundle, ten_class_data, TEST, None)
    with pytest.raises(ConfigError, match="^split: 'holdout'"):
        check_evaluate_config(bundle, four_class[1], "holdout", None)
    check_evaluate_config(bundle, four_class[1], TEST, "0.1,0.2,0.3,0.4")


def test_serve_overrides_checked_before_ray(four_class, tmp_path, capsys):
    bundle, _ = four_class
    with pytest.raises(ConfigError, match="^deployment_prior: the prior has 2 value"):
        check_serve_overrides(bundle, [0.5, 0.5], None)
    with pytest.raises(ConfigError, match="^decision_threshold: only for binary"):
        check_serve_overrides(bundle, None, 0.3)
    check_serve_overrides(bundle, "balanced", None)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"applications": [{"args": {
        "bundle": bundle, "deployment_prior": [0.5, 0.5]}}]}))
    rc = load_job("serve").main(["--config", str(cfg)])
    assert_refused_before_ray(capsys, rc, "deployment_prior")


def test_resume_from_a_checkpoint_of_other_classes(ten_class_data, tmp_path, capsys):
    import json

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text(json.dumps({"epoch": 3, "class_names": ["a", "b"]}))
    rc = load_job("train").main(["--data", ten_class_data, "--resume", str(ckpt),
                                 "--out", str(tmp_path / "o")])
    assert_refused_before_ray(capsys, rc, "resume")


def test_resume_with_no_epochs_left_is_refused(ten_class_data, tmp_path, capsys):
    """``--epochs`` is the run's total: a checkpoint that already ran that many leaves nothing
    to train (Ray Train would end with no checkpoint at all)."""
    import json

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    names = [f"class_{i}" for i in range(10)]
    (ckpt / "meta.json").write_text(json.dumps({"epoch": 2, "class_names": names}))
    job = load_job("train")
    for epochs in ("2", "3"):
        rc = job.main(["--data", ten_class_data, "--resume", str(ckpt), "--epochs", epochs,
                       "--out", str(tmp_path / "o")])
        assert_refused_before_ray(capsys, rc, "epochs")
    from imgpipe.preflight import check_train_config

    check_train_config(TrainConfig(data=ten_class_data, resume=str(ckpt), epochs=4))


DRIVER_PROBE = """
import importlib.util, json, sys
sys.path.insert(0, sys.argv[1])
spec = importlib.util.spec_from_file_location("train_job", f"{sys.argv[1]}/jobs/train.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))
import imgpipe.training.trainer
from imgpipe.config import TrainConfig, TuneJobConfig
from imgpipe.preflight import check_train_config, check_tune_config
for loss in ("ce", "focal", "logit-adjusted"):
    check_train_config(TrainConfig(data=sys.argv[2], **{"loss": {"name": loss,
                                                           "class_weights": "power:0.5"}}))
check_tune_config(TuneJobConfig(data=sys.argv[2], out=sys.argv[3]))
print(json.dumps(sorted(m for m in ("torch", "sklearn", "scipy") if m in sys.modules)))
"""


def test_the_train_jobs_driver_imports_no_torch(ten_class_data, tmp_path):
    """The train job's driver (its module, the run's set-up, and the preflight checks of every
    loss, which the tune job runs too) imports no torch, scikit-learn or SciPy: it only starts
    Ray work, and those imports cost seconds on a laptop before Ray starts. The kept checkpoint
    is scored in a Ray task (``imgpipe/training/scoring.py``). The tune job's driver imports
    torch to export the bundle."""
    proc = subprocess.run([sys.executable, "-c", DRIVER_PROBE, str(ROOT), ten_class_data,
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
