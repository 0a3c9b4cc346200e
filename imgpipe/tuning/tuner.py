"""Ray Tune + OptunaSearch + ASHA over training trials.

Each trial is a Tune *function* (``trial.run_trial``). A one-worker trial runs the training
loop in its own actor, reused from trial to trial, and reports to Tune directly; a trial of
several workers builds and fits a Ray Train ``TorchTrainer`` (DDP), whose metrics flow back
through ``TuneReportCallback`` (Train V2's Tune integration).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import ray.train
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule
from ray.tune.search.optuna import OptunaSearch

from imgpipe import storage
from imgpipe.config import ConfigError, TrainConfig, TuneJobConfig
from imgpipe.config.search import SearchSpace
from imgpipe.constants import METRIC_MODES, val_key
from imgpipe.data.manifest import Manifest, load_manifest
from imgpipe.errors import ImgpipeError, ImgpipeFailure
from imgpipe.models.weights import load_model_weights, resolve_model_config
from imgpipe.runtime import DRIVER_CPU, ResourcePlan, plan_resources, train_worker_runtime_env
from imgpipe.training.defaults import resolve_input_size
from imgpipe.training.trainer import DecodedSplits, build_decoded_splits
from imgpipe.training.trial_run import trial_error_line
from imgpipe.tuning.space import candidate_overrides, define_space
from imgpipe.tuning.trial import run_trial, trains_in_trial_actor
from imgpipe.tuning.warm_start import warm_start_points


def base_train_config(tcfg: TuneJobConfig) -> TrainConfig:
    """The TrainConfig every trial starts from (validated before anything runs)."""
    overrides = {
        # Tune runs each trial in its own working directory: relative paths must not leak in.
        "data": absolute(tcfg.data), "epochs": tcfg.epochs, "num_workers": tcfg.workers_per_trial,
        "cpus_per_worker": tcfg.cpus_per_worker, "gpus_per_worker": tcfg.gpus_per_worker,
        "use_gpu": tcfg.use_gpu, "seed": tcfg.seed, "metric": tcfg.metric,
        "out": absolute(tcfg.out), "progress": False,
    }
    try:
        return TrainConfig.model_validate({**tcfg.train, **overrides})
    except Exception as e:
        raise ConfigError(f"train: {e}") from None


def absolute(location: str) -> str:
    return location if "://" in location else str(Path(location).resolve())


class TrialLine(tune.Callback):
    """One concise line per finished trial instead of Tune's periodic tables."""

    def __init__(self, metric: str, total: int) -> None:
        self.metric, self.total, self.done = metric, total, 0

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        r = trial.last_result or {}
        print(f"[{self.done}/{self.total}] trial {trial.trial_id} finished: "
              f"epochs {r.get('training_iteration', '?')}  {self.metric} "
              f"{r.get(self.metric, float('nan')):.4f}  best {r.get('best', float('nan')):.4f}",
              flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] trial {trial.trial_id} FAILED after its retries "
              f"(finished trials are kept): {trial.error_file}", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        print(f"trial {trial.trial_id} failed ({trial_error_line(trial)}); Tune retries it "
              "from its latest checkpoint", flush=True)


def build_scheduler(tcfg: TuneJobConfig):
    if tcfg.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=tcfg.epochs,
                             grace_period=tcfg.effective_grace_period,
                             reduction_factor=tcfg.reduction_factor)
    if tcfg.scheduler == "median":
        return MedianStoppingRule(time_attr="training_iteration",
                                  grace_period=tcfg.effective_grace_period)
    return FIFOScheduler()


def build_searcher(tcfg: TuneJobConfig, num_classes: int) -> OptunaSearch:
    space = SearchSpace.model_validate(tcfg.search)
    if tcfg.warm_start:
        names = list(warm_start_points(space, num_classes))
        line = (f"{', '.join(names)} first, then TPE" if names
                else "no standard recipe fits the search space")
        print(f"warm start: {line}", flush=True)
    return tpe_searcher(space, num_classes,
                        metric=val_key(tcfg.metric), mode=METRIC_MODES[tcfg.metric],
                        seed=tcfg.seed, num_samples=tcfg.num_samples,
                        warm_start=tcfg.warm_start)


def tpe_searcher(space: SearchSpace, num_classes: int, *, metric: str, mode: str, seed: int,
                 num_samples: int, warm_start: bool = True) -> OptunaSearch:
    """OptunaSearch with multivariate, grouped TPE over ``define_space``, warm-started.

    ``warm_start`` runs the standard long-tail recipes that fit ``space`` first
    (``imgpipe.tuning.warm_start``). TPE models the space after ``n_startup_trials`` random
    draws (the queued recipes count among them); Optuna's default of 10 would leave 2 guided
    trials out of a default 12, so it is a third of the budget here (at least 4, at most 20).
    """
    points = list(warm_start_points(space, num_classes).values()) if warm_start else []
    with warnings.catch_warnings():  # Optuna flags group=True as experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True,
            n_startup_trials=max(4, len(points), min(num_samples // 3, 20)))
    # metric/mode must sit on OptunaSearch itself with a define-by-run space.
    return OptunaSearch(
        space=partial(define_space, space=space, num_classes=num_classes),
        metric=metric, mode=mode,
        # group=True: multivariate TPE on a conditional (define-by-run) space models each
        # group of co-occurring parameters jointly instead of falling back to independent
        # sampling for most draws.
        sampler=sampler, points_to_evaluate=points or None,
    )


@dataclass
class TuneOutcome:
    experiment_path: str
    train_storage: str
    ranking: pd.DataFrame
    best_trial_id: str
    best_checkpoint: ray.train.Checkpoint  # the best trial's best epoch, by the search metric
    best_params: dict[str, Any]
    plan: ResourcePlan
    wall_time_s: float
    failed_trials: list[str]


def storage_root(tcfg: TuneJobConfig) -> str:
    if tcfg.storage_path:
        return storage.absolute_location(tcfg.storage_path)
    return storage.join(storage.absolute_location(tcfg.out), "ray_results")


def plan_search(tcfg: TuneJobConfig) -> ResourcePlan:
    return plan_resources(tcfg.workers_per_trial, tcfg.cpus_per_worker, tcfg.use_gpu,
                          tcfg.gpus_per_worker, concurrent_runs=tcfg.max_concurrent)


def candidate_bases(tcfg: TuneJobConfig, manifest: Manifest) -> tuple[dict[str, dict[str, Any]],
                                                                      list[DecodedSplits]]:
    """The base TrainConfig of each starting-weights choice, and train/val decoded once per
    distinct preprocessing among them (every trial reads the same cached blocks).

    Returns ``({choice or "": base config as JSON}, [DecodedSplits, ...])``.
    """
    space = SearchSpace.model_validate(tcfg.search)
    choices = ([space.weights] if isinstance(space.weights, str) else space.weights) or [""]
    bases: dict[str, dict[str, Any]] = {}
    decoded: list[DecodedSplits] = []
    for spec in choices:
        cfg = base_train_config(tcfg)
        if spec:
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(
                update=candidate_overrides(spec))})
        cfg, size_line = resolve_input_size(cfg, manifest)
        model = cfg.model
        arch = model.name or (f"the architecture of {model.weights}" if model.weights else "cnn")
        print(f"{spec + ': ' if spec else ''}{arch}: {size_line}", flush=True)
        bases[spec] = cfg.model_dump(mode="json")
        _, pre = resolve_model_config(cfg.model, manifest.preprocess,
                                      load_model_weights(cfg.model))
        if all(d.preprocess != pre for d in decoded):
            # decoded in the runtime env of the processes that stream in the trials (the trial
            # actor's, or its Ray Train workers'): their streams reuse the warm decode workers
            decoded.append(build_decoded_splits(
                cfg, manifest, pre, runtime_env=train_worker_runtime_env(
                    tune_trial=True,
                    ray_train=not trains_in_trial_actor(tcfg.workers_per_trial))))
    return bases, decoded


def run_search(tcfg: TuneJobConfig, manifest: Manifest | None = None) -> TuneOutcome:
    """Plan, search (or resume), and rank the trials. Raises ResourcePlanError up front."""
    started = time.perf_counter()
    plan = plan_search(tcfg)
    manifest = manifest or load_manifest(tcfg.data)
    num_classes = len(manifest.class_names)
    bases, decoded = candidate_bases(tcfg, manifest)
    root = storage_root(tcfg)
    exp_path = f"{root.rstrip('/')}/{tcfg.name}"
    train_storage = f"{root.rstrip('/')}/{tcfg.name}-trials"
    in_actor = trains_in_trial_actor(tcfg.workers_per_trial)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, bases=bases, num_classes=num_classes,
                             train_storage=train_storage, decoded=decoded),
        trial_resources(tcfg))
    if tcfg.resume and tune.Tuner.can_restore(exp_path):
        print(f"resuming {exp_path}", flush=True)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        if tcfg.resume:
            print(f"nothing to resume at {exp_path}; starting a new search", flush=True)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=val_key(tcfg.metric), mode=METRIC_MODES[tcfg.metric],
                search_alg=build_searcher(tcfg, num_classes), scheduler=build_scheduler(tcfg),
                num_samples=tcfg.num_samples, max_concurrent_trials=tcfg.max_concurrent,
                time_budget_s=tcfg.time_budget_s,
                # a trial that trains in its actor leaves torch imported for the next one
                reuse_actors=in_actor),
            run_config=tune.RunConfig(name=tcfg.name, storage_path=root, verbose=0,
                                      checkpoint_config=tune.CheckpointConfig(
                                          num_to_keep=2,
                                          checkpoint_score_attribute=val_key(tcfg.metric),
                                          checkpoint_score_order=METRIC_MODES[tcfg.metric]),
                                      failure_config=tune.FailureConfig(
                                          max_failures=tcfg.trial_max_failures),
                                      callbacks=[TrialLine(val_key(tcfg.metric),
                                                           tcfg.num_samples)]),
        )
    results = tuner.fit()
    _check_not_interrupted(results, tcfg, started)
    ranking = rank_trials(results, tcfg)
    if ranking.empty:
        errors = [str(r.error).strip().splitlines()[-1] for r in results if r.error][:3]
        raise SearchFailed(f"no trial finished with a result; first errors: {errors}")
    best = ranking.iloc[0]
    # "name[a|b]" keys are Optuna's names for restricted choices; "name" holds the value.
    params = {k[len("config/"):]: v for k, v in best.items()
              if k.startswith("config/") and "[" not in k and pd.notna(v)}
    failed = failed_trial_ids(results)
    best_id = str(best["trial_id"])
    ckpt = best_trial_checkpoint(results, best_id, train_storage, tcfg.metric, in_actor)
    return TuneOutcome(exp_path, train_storage, ranking, best_id, ckpt, params, plan,
                       time.perf_counter() - started, failed)


def trial_resources(tcfg: TuneJobConfig) -> dict[str, float]:
    """What each trial's actor holds: a one-worker trial trains there (the worker's CPU and
    GPU); a DDP trial's actor only drives its Ray Train run, whose workers hold their own."""
    if not trains_in_trial_actor(tcfg.workers_per_trial):
        return {"CPU": DRIVER_CPU}
    resources = {"CPU": tcfg.cpus_per_worker}
    if tcfg.use_gpu:
        resources["GPU"] = tcfg.gpus_per_worker
    return resources


def best_trial_checkpoint(results: tune.ResultGrid, trial_id: str, train_storage: str,
                          metric: str, in_actor: bool) -> ray.train.Checkpoint:
    """The best-scored checkpoint of one trial: Tune's own (the trial trained in its actor),
    else that of the trial's Ray Train run (``<train_storage>/train-<trial_id>``).

    Raises:
        SearchFailed: the trial has no checkpoint scored by the metric.
    """
    key, mode = val_key(metric), METRIC_MODES[metric]
    if in_actor:
        result = next((r for r in results
                       if str((r.metrics or {}).get("trial_id")) == trial_id), None)
    else:
        result = ray.train.Result.from_path(f"{train_storage.rstrip('/')}/train-{trial_id}")
    ckpt = result.get_best_checkpoint(key, mode) if result is not None else None
    if ckpt is None:
        raise SearchFailed(f"trial {trial_id} has no checkpoint scored by {key}")
    return ckpt


class SearchFailed(ImgpipeFailure):
    """Every trial failed: there is nothing to rank or export."""


class SearchInterrupted(ImgpipeError):
    """The search stopped before all trials ended (Ctrl-C); ``--resume`` continues it."""


def _check_not_interrupted(results: tune.ResultGrid, tcfg: TuneJobConfig, started: float) -> None:
    ended = results.num_terminated + results.num_errors
    out_of_time = tcfg.time_budget_s is not None and (
        time.perf_counter() - started >= tcfg.time_budget_s)
    if ended < tcfg.num_samples and not out_of_time:
        raise SearchInterrupted(
            f"search interrupted after {ended} of {tcfg.num_samples} trials ended; "
            f"continue it with --resume --name {tcfg.name} (same --out/--storage-path)")


def failed_trial_ids(results: tune.ResultGrid) -> list[str]:
    """Trials that ended in an error after their retries (Tune's ``Result.error``)."""
    return [str((r.metrics or {}).get("trial_id") or Path(r.path).name) for r in results if r.error]


def rank_trials(results: tune.ResultGrid, tcfg: TuneJobConfig) -> pd.DataFrame:
    """One row per trial that finished, best epoch's objective first; parameters as
    ``config/...`` columns. A trial that failed after its retries is left out, whatever it
    reported before failing: its run never finished, so it is neither ranked nor exported."""
    key, mode = val_key(tcfg.metric), METRIC_MODES[tcfg.metric]
    df = results.get_dataframe(filter_metric=key, filter_mode=mode)
    if df.empty or key not in df:
        return pd.DataFrame()
    df = df[~df["trial_id"].astype(str).isin(failed_trial_ids(results))]
    if df.empty:
        return pd.DataFrame()
    keep = ["trial_id", key, val_key("balanced_accuracy"), val_key("macro_f1"),
            val_key("accuracy"), "epoch", "training_iteration", "time_total_s"]
    keep = list(dict.fromkeys(c for c in keep if c in df))
    cfg_cols = [c for c in df.columns if c.startswith("config/")]
    df = df[keep + cfg_cols].sort_values(key, ascending=(mode == "min"), kind="stable")
    return df.reset_index(drop=True)

