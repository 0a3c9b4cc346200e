"""Tune + Optuna: the search space, resource planning, a real tiny search, interruption + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from imgpipe.bundle import load_bundle
from imgpipe.config import ConfigError, TrainConfig, TuneJobConfig, resolve_config
from imgpipe.config.search import SearchSpace
from imgpipe.config.specs import parse_class_weights
from imgpipe.data.rebalance import class_weights
from imgpipe.runtime import ResourcePlanError, plan_resources, train_worker_runtime_env
from imgpipe.tuning.space import define_space, params_to_overrides

REPO = Path(__file__).resolve().parents[1]
COUNTS = [104, 62, 37, 22, 13, 8, 4, 2, 1, 1]


def sample(space: SearchSpace, n: int, num_classes: int = 10, seed: int = 0) -> list[dict]:
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                                                   group=True))
    out = []
    for _ in range(n):
        trial = study.ask()
        params = define_space(trial, space, num_classes)
        study.tell(trial, float(np.random.default_rng(len(out)).random()))
        out.append(params)
    return out


@pytest.mark.parametrize("family", ["none", "power", "effective", "free"])
def test_every_weight_family_samples_valid_normalised_vectors(family):
    space = SearchSpace(weight_family=family, sampler="none")
    for params in sample(space, 15):
        cfg = resolve_config(TrainConfig, None, params_to_overrides(params, 10))
        w = class_weights(COUNTS, cfg.loss.class_weights)
        assert w.shape == (10,) and np.all(w >= 0) and np.isfinite(w).all()
        assert w.mean() == pytest.approx(1.0, abs=1e-4)
        spec = parse_class_weights(cfg.loss.class_weights)
        assert spec.scheme == {"free": "explicit"}.get(family, family)
        if family == "power":
            assert 0 <= spec.beta <= 1
        if family == "effective":
            assert 0.9 <= spec.beta <= 0.9999


def test_default_space_gives_valid_configs_and_never_stacks_corrections():
    for params in sample(SearchSpace(), 40):
        cfg = resolve_config(TrainConfig, None, params_to_overrides(params, 10))
        lo, hi = {"sgd": (1e-2, 0.3), "rmsprop": (1e-4, 3e-3)}.get(cfg.optim.name, (3e-4, 1e-2))
        assert lo <= cfg.optim.lr <= hi  # each optimizer searches the lr range that fits it
        if cfg.sampler.strategy in ("oversample", "undersample"):
            assert cfg.loss.class_weights == "none" and cfg.loss.name != "logit-adjusted"


def test_free_vector_only_for_small_class_counts():
    for params in sample(SearchSpace(sampler="none"), 20, num_classes=50):
        assert params["weight_family"] != "free"


def test_pinned_values_and_yaml_ranges(tmp_path):
    f = tmp_path / "tune.yaml"
    f.write_text("search:\n  lr: 0.01\n  optimizer: [sgd]\n  loss: focal\n  focal_gamma: [1, 1.5]\n")
    tcfg = resolve_config(TuneJobConfig, f)
    space = SearchSpace.model_validate(tcfg.search)
    for params in sample(space, 8):
        assert params["lr"] == 0.01 and params["optimizer"] == "sgd"
        assert params["loss"] == "focal" and 1 <= params["focal_gamma"] <= 1.5


@pytest.mark.parametrize(("search", "field"), [({"lr": [0.1, 0.01]}, "search.lr"),
                                               ({"nope": 1}, "search"),
                                               ({"optimizer": []}, "search.optimizer")])
def test_bad_search_space_fails_with_field(search, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        resolve_config(TuneJobConfig, None, {"search": search})


def test_missing_data_is_prepared_only_when_asked_for(tmp_path, monkeypatch):
    from imgpipe.errors import UserError
    from imgpipe.tuning.job import resolve_data

    root = tmp_path / "fresh" / "digits-lt"
    manifest = resolve_data(resolve_config(TuneJobConfig, None, {"data": str(root),
                                                                 "dataset": "digits-lt"}))
    assert (root / "manifest.json").is_file() and manifest.num_rows["train"] == 254
    # a folder without a manifest (a typo, or not prepared yet) is never filled with digits
    with pytest.raises(UserError, match="prepare_data.py --image-folder PATH --out .*mine"):
        resolve_data(TuneJobConfig(data=str(tmp_path / "data" / "mine")))
    assert not (tmp_path / "data" / "mine").exists()
    # the default path of a fresh clone is prepared without asking
    monkeypatch.chdir(tmp_path)
    assert resolve_data(TuneJobConfig()).num_rows["train"] == 254
    assert (tmp_path / "data" / "digits-lt" / "manifest.json").is_file()


def test_tune_job_without_manifest_exits_2_before_starting_ray(tmp_path):
    proc = subprocess.run([sys.executable, "jobs/tune.py", "--data", str(tmp_path / "mine"),
                           "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no prepared shards" in proc.stderr and "prepare_data.py" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mine").exists()


def test_decode_tasks_get_the_runtime_env_of_train_workers_and_tune_trials(monkeypatch):
    # what Ray 2.60's Train adds to its actors, and Tune to a trial's: an upgrade that moves
    # these internals leaves {} and fails here, not silently colder runs
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    train = train_worker_runtime_env()["env_vars"]
    assert train.items() >= {("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"),
                             ("RAY_WARN_BLOCKING_GET_INSIDE_ASYNC", "0")}
    trial = train_worker_runtime_env(tune_trial=True)["env_vars"]
    assert trial.items() >= train.items() and trial["PL_DISABLE_FORK"] == "1"
    # a one-worker trial trains in the trial actor itself: Tune's variables (it propagates
    # Train's RAY_TRAIN_* too), not those Train adds to its own actors
    actor = train_worker_runtime_env(tune_trial=True, ray_train=False)["env_vars"]
    assert actor["PL_DISABLE_FORK"] == "1" and "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC" not in actor


def test_impossible_plan_names_the_flags():
    with pytest.raises(ResourcePlanError, match="--max-concurrent"):
        plan_resources(2, 0.45, False, concurrent_runs=4, cluster={"CPU": 4})
    with pytest.raises(ResourcePlanError, match="GPUs"):
        plan_resources(1, 1, True, cluster={"CPU": 8, "GPU": 0})
    plan = plan_resources(1, 0.45, False, concurrent_runs=2, cluster={"CPU": 4})
    assert plan.cpus_needed == pytest.approx(1.92)


@pytest.mark.ray
def test_impossible_plan_fails_before_starting(ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.run(
        [sys.executable, "jobs/tune.py", "--data", str(tmp_path / "nothing"),
         "--dataset", "digits-lt", "--workers-per-trial", "4", "--max-concurrent", "4",
         "--out", str(tmp_path),
         "--address", address], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "resource plan does not fit" in proc.stderr and "--workers-per-trial" in proc.stderr
    assert not (tmp_path / "nothing").exists()  # no data was prepared: it failed first


TRIAL_PROBE = """
import json, sys
from imgpipe.tuning.trial import run_trial  # what Tune imports in every trial actor
print(json.dumps([m for m in ("torch", "sklearn", "scipy", "optuna") if m in sys.modules]))
"""


def test_the_trial_module_imports_no_torch():
    """Tune imports ``run_trial``'s module in every trial actor it starts, including a DDP
    trial's, which only drives its Ray Train run: that import stays cheap."""
    proc = subprocess.run([sys.executable, "-c", TRIAL_PROBE], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def _actors(*class_names: str) -> set[str]:
    """This Ray session's worker processes that hosted an actor of these classes, alive or dead.

    Read from the session's logs: a worker writes ``:actor_name:<class>`` to its
    ``worker-*.out`` when it creates an actor. The State API cannot be trusted here: after a
    full test session it lists at most 10,000 actors, not necessarily the newest ones.
    """
    import re

    from ray._private.worker import _global_node

    out = set()
    for log in Path(_global_node.get_logs_dir_path()).glob("worker-*.out"):
        with log.open(errors="ignore") as f:
            names = {m.group(1) for line in f if (m := re.match(r":actor_name:(\S+)", line))}
        if names & set(class_names):
            out.add(log.name)
    return out


# Tune's function-trainable actor: its worker logs ImplicitFunc, then the trainable's name.
TRIAL_ACTOR = ("ImplicitFunc", "run_trial")


@pytest.mark.slow
@pytest.mark.ray
def test_one_worker_trials_train_in_one_reused_actor_and_ddp_trials_in_ray_train(
        ray_session, tiny_digits, tmp_path):
    """A one-worker trial runs the loop in Tune's trial actor, which the next trial reuses: no
    Ray Train controller or worker starts, and one actor serves a one-at-a-time search. A
    trial of two workers is a Ray Train run with two workers. Both export a verified bundle."""
    from imgpipe.tuning.job import run_tune_job

    kinds = {"controller": ("TrainController",), "worker": ("RayTrainWorker",),
             "trial": TRIAL_ACTOR}

    def search(name: str, **fields):
        before = {k: _actors(*c) for k, c in kinds.items()}
        res = run_tune_job(resolve_config(TuneJobConfig, None, {
            "data": tiny_digits, "out": str(tmp_path / name), "bundle_root": str(tmp_path / "b"),
            "bundle_name": name, "epochs": 2, "grace_period": 1, "max_concurrent": 1,
            "report": False, "train": {"model": {"image_size": 16}, "batch_size": 32,
                                       "min_steps_per_epoch": 2}, **fields}))
        assert Path(res["bundle"]).is_dir() and res["num_trials"] == fields["num_samples"]
        return {k: len(_actors(*c) - before[k]) for k, c in kinds.items()}

    assert search("one", num_samples=3) == {"controller": 0, "worker": 0, "trial": 1}
    ddp = search("ddp", num_samples=1, workers_per_trial=2, scheduler="fifo")
    assert ddp["controller"] == 1 and ddp["worker"] == 2


def tune_cmd(data: str, out: Path, address: str, *extra: str) -> list[str]:
    return [sys.executable, "jobs/tune.py", "--data", data, "--out", str(out),
            "--bundle-root", str(out / "bundles"), "--epochs", "2", "--grace-period", "1",
            "--max-concurrent", "1", "--address", address, "--no-report", *extra]


@pytest.mark.slow
@pytest.mark.ray
def test_tiny_search_exports_a_verified_bundle(ray_session, tiny_digits, tmp_path):
    from imgpipe.tuning.job import run_tune_job

    tcfg = resolve_config(TuneJobConfig, None, {
        "data": tiny_digits, "out": str(tmp_path / "run"), "bundle_root": str(tmp_path / "b"),
        "num_samples": 2, "epochs": 2, "grace_period": 1, "max_concurrent": 2,
        "train": {"model": {"image_size": 16}, "batch_size": 32}})
    res = run_tune_job(tcfg)
    bundle = Path(res["bundle"])
    assert bundle == tmp_path / "b" / "digits-lt" / "v1"
    meta, _ = load_bundle(bundle)  # checksum verified, weights-only
    assert meta.metrics.val["macro_f1"] == pytest.approx(res["val"]["macro_f1"])
    # test metrics recorded in the bundle (by export, then by the calibrated report: argmax and
    # so balanced accuracy are unchanged by temperature scaling)
    assert meta.metrics.test["balanced_accuracy"] == pytest.approx(res["test"]["balanced_accuracy"])
    ranking = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert len(ranking) == 2 and ranking["val_macro_f1"].is_monotonic_decreasing
    assert ranking["trial_id"].iloc[0] == res["best_trial_id"]
    # the report was written for the best bundle, calibrated on val
    assert Path(res["report"]).name == "report.html" and Path(res["report"]).is_file()
    assert (bundle / "model_card.md").is_file()
    # a second export never overwrites: it becomes v2
    res2 = run_tune_job(tcfg.model_copy(update={"resume": True, "report": False}))
    assert Path(res2["bundle"]).name == "v2"


def result_lines(exp: Path) -> dict[str, int]:
    """Trial id → number of results Tune recorded for it."""
    out = {}
    for f in exp.glob("*/result.json"):
        lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if lines:
            out[lines[0]["trial_id"]] = len(lines)
    return out


@pytest.mark.slow
@pytest.mark.ray
def test_interrupted_search_resumes_without_repeating_trials(ray_session, tiny_digits, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    out = tmp_path / "run"
    cmd = tune_cmd(tiny_digits, out, address, "--num-samples", "3")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    seen: list[str] = []
    deadline = time.time() + 400
    for line in proc.stdout:
        seen.append(line)
        if "[1/3] trial" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=300)
    log = "".join(seen) + rest
    assert proc.returncode == 130, log[-3000:]
    assert "--resume" in log and "Tuner.restore" not in log
    exp = out / "ray_results" / "tune"
    before = result_lines(exp)
    finished_first = [line.split()[2] for line in seen if "] trial " in line and "finished" in line]
    assert finished_first, log[-3000:]

    proc2 = subprocess.run([*cmd, "--resume"], cwd=REPO, capture_output=True, text=True,
                           timeout=600, env=env)
    assert proc2.returncode == 0, (proc2.stdout + proc2.stderr)[-3000:]
    after = result_lines(exp)
    assert len(after) == 3
    for trial_id in finished_first:  # finished trials were not run again
        assert after[trial_id] == before[trial_id]
    res = json.loads((out / "results.json").read_text())
    assert res["num_trials"] == 3


class _ResultsOf:
    """What ``rank_trials`` reads of a ``tune.ResultGrid``: its results, and ``get_dataframe``
    (one row per trial, here each trial's only report)."""

    def __init__(self, results: list) -> None:
        self._results = results

    def __iter__(self):
        return iter(self._results)

    def get_dataframe(self, filter_metric: str, filter_mode: str) -> pd.DataFrame:
        return pd.DataFrame([r.metrics for r in self._results])


def test_a_trial_that_failed_after_its_retries_is_never_ranked(tmp_path):
    """Its last report may beat every finished trial (the tune drill's killed trial did): it
    still is not the best, since its run never finished."""
    from ray.train import Result

    from imgpipe.constants import val_key
    from imgpipe.tuning.tuner import failed_trial_ids, rank_trials

    tcfg = TuneJobConfig(data="d")
    key = val_key(tcfg.metric)

    def result(trial_id: str, score: float, error: Exception | None) -> Result:
        return Result(metrics={"trial_id": trial_id, key: score, "config/loss": "ce"},
                      checkpoint=None, error=error, path=str(tmp_path / trial_id))

    grid = _ResultsOf([result("done", 0.5, None), result("killed", 0.9, RuntimeError("kill")),
                       result("stopped", 0.4, None)])
    assert failed_trial_ids(grid) == ["killed"]
    assert list(rank_trials(grid, tcfg)["trial_id"]) == ["done", "stopped"]
    only_failed = _ResultsOf([result("killed", 0.9, RuntimeError("kill"))])
    assert rank_trials(only_failed, tcfg).empty
    # a trial that failed before its first report is named by its folder
    silent = Result(metrics=None, checkpoint=None, error=RuntimeError("x"),
                    path=str(tmp_path / "train-silent"))
    assert failed_trial_ids([silent]) == ["train-silent"]
