"""The main job, end to end: data (prepared if missing) → search → verified bundle → report."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from imgpipe import storage
from imgpipe.bundle import update_staged_meta
from imgpipe.checkpoint import load_meta
from imgpipe.config import PrepareConfig, TuneJobConfig
from imgpipe.console import format_table, write_json
from imgpipe.constants import TEST, TRAIN, VAL, val_key
from imgpipe.data.manifest import Manifest, ManifestNotFoundError, load_manifest
from imgpipe.data.prepare import ensure_prepared
from imgpipe.report import document_bundle
from imgpipe.tuning.export import best_checkpoint_dir, export_bundle
from imgpipe.tuning.tuner import TuneOutcome, plan_search, run_search

DEFAULT_DATASET = "digits-lt"
_NO_SHARDS = ("{data} holds no prepared shards (no manifest.json). Prepare your images first: "
              "python jobs/prepare_data.py --image-folder PATH --out {data} (or --manifest "
              "FILE.csv); or pass --dataset digits-lt to fill it with the embedded demo data")


def resolve_data(tcfg: TuneJobConfig) -> Manifest:
    """Load the shards at ``data``; prepare embedded data there only when that was asked for.

    Embedded data is prepared into a folder without a manifest only with an explicit
    ``dataset`` or at the default ``data`` path (a fresh clone running ``jobs/tune.py``); any
    other folder without a manifest is a typo or an unprepared folder, and filling it with
    digits would silently train (and name a bundle) on the wrong data.

    Raises:
        ManifestNotFoundError: no manifest and nothing to prepare; says how to prepare it.
    """
    try:
        return load_manifest(tcfg.data)
    except ManifestNotFoundError:
        dataset = tcfg.dataset or (DEFAULT_DATASET if _is_default_data(tcfg.data) else None)
        if dataset is None:
            raise ManifestNotFoundError(_NO_SHARDS.format(data=tcfg.data)) from None
    print(f"no shards at {tcfg.data}: preparing {dataset} (seed {tcfg.seed})", flush=True)
    return ensure_prepared(PrepareConfig(dataset=dataset, out=tcfg.data, seed=tcfg.seed))


def check_data_source(tcfg: TuneJobConfig) -> None:
    """Fail early (no Ray, nothing prepared) when ``data`` has no manifest and none may be made.

    Raises:
        ManifestNotFoundError: as ``resolve_data``.
    """
    if tcfg.dataset or _is_default_data(tcfg.data):
        return
    try:
        load_manifest(tcfg.data)
    except ManifestNotFoundError:
        raise ManifestNotFoundError(_NO_SHARDS.format(data=tcfg.data)) from None


def _is_default_data(data: str) -> bool:
    default = TuneJobConfig.model_fields["data"].default
    return storage.absolute_location(data) == storage.absolute_location(default)


def run_tune_job(tcfg: TuneJobConfig) -> dict[str, Any]:
    """Run the whole search and export; returns the results written to ``<out>/results.json``.

    ``out`` and ``bundle_root`` may be local folders or URIs: with a URI the job works in a
    local temporary folder and uploads it at the end.
    """
    started = time.perf_counter()
    plan = plan_search(tcfg)  # fail on an impossible plan before touching data
    print(f"resource plan: {plan.summary()}", flush=True)
    manifest = resolve_data(tcfg)
    tcfg = resolve_refit(tcfg, manifest)
    out = storage.absolute_location(tcfg.out)
    with tempfile.TemporaryDirectory(prefix="imgpipe-tune-") as tmp:
        work = Path(tmp) if storage.is_uri(out) else Path(out)
        if tcfg.candidates:
            from imgpipe.tuning.candidates import choose_candidates

            tcfg = choose_candidates(tcfg, manifest, work / "rank")
        outcome = run_search(tcfg, manifest)
        results = _export_and_report(tcfg, outcome, work)
        results.update(config=tcfg.model_dump(mode="json"), resource_plan=plan.summary(),
                       wall_time_s=round(time.perf_counter() - started, 2))
        write_json(work / "results.json", results)
        if storage.is_uri(out):
            storage.upload_dir(work, out)
    results["results_file"] = storage.join(out, "results.json")
    return results


def _export_and_report(tcfg: TuneJobConfig, outcome: TuneOutcome, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    outcome.ranking.to_csv(work / "trials.csv", index=False)
    print("\ntrials ranked by val " + tcfg.metric + ":")
    print(ranking_table(outcome.ranking, tcfg.metric))
    if outcome.failed_trials:
        print(f"{len(outcome.failed_trials)} trial(s) failed after their retries and are left "
              f"out of the ranking: {', '.join(outcome.failed_trials)}", flush=True)
    ckpt = best_checkpoint_dir(outcome.best_checkpoint, work / "best_checkpoint")
    name = tcfg.bundle_name or Path(tcfg.data.rstrip("/")).name
    extra: dict[str, Any] = {"search_params": outcome.best_params,
                             "trial_id": outcome.best_trial_id}
    refit = None
    if tcfg.refit:
        from imgpipe.tuning.refit import run_refit  # a Train run: only when it helps

        refit = run_refit(ckpt, tcfg.data, work, outcome.best_trial_id, tcfg.metric)
        ckpt, extra["refit"] = refit.checkpoint, refit.info
    history = load_meta(ckpt).get("history", [])
    report_dir = work / "report"

    def finish(staged: Path) -> None:
        if refit is not None:  # val is in-sample for the refit model: keep the held-out fit
            update_staged_meta(staged, temperature=refit.temperature,
                               decision_threshold=refit.decision_threshold)
        if tcfg.report:  # calibrated and reported before publication: a version is complete
            document_bundle(staged, tcfg.data, report_dir, history=history, robustness=True,
                            calibrate=refit is None)

    bundle, metrics = export_bundle(ckpt, tcfg.data, tcfg.bundle_root, name, extra,
                                    finish=finish)
    val_note = " (in-sample: refit on train+val)" if refit is not None else ""
    print(f"\nbundle {bundle} verified: val {tcfg.metric} {metrics['val'][tcfg.metric]:.4f}"
          f"{val_note}, test balanced accuracy {metrics[TEST]['balanced_accuracy']:.4f}, "
          f"test macro-F1 {metrics[TEST]['macro_f1']:.4f}", flush=True)
    report = storage.join(storage.absolute_location(tcfg.out), "report", "report.html")
    return {
        "search_wall_time_s": round(outcome.wall_time_s, 2),
        "experiment_path": outcome.experiment_path,
        "best_trial_id": outcome.best_trial_id,
        "best_params": outcome.best_params,
        "bundle": bundle,
        "report": report if tcfg.report else None,
        "refit": refit.info if refit is not None else None,
        "num_trials": len(outcome.ranking),
        "failed_trials": outcome.failed_trials,
        "val": metrics["val"],
        "test": metrics[TEST],
    }


def val_outnumbers_train(manifest: Manifest, max_named: int = 5) -> str | None:
    """The classes of which val holds more images than train, as one phrase (``"2 class(es):
    8 (1 train / 20 val), 9 (1 train / 20 val)"``), or None when there are none.

    Those are the classes a model learns least about, and they gain the most from a refit on
    train+val (``benchmarks/headroom_bench.py``: recall of two one-image digits classes from
    0.59 and 0.31 to 0.97 and 0.84).
    """
    if VAL not in manifest.counts or TRAIN not in manifest.counts:
        return None
    pairs = [(name, manifest.counts[TRAIN][name], manifest.counts[VAL][name])
             for name in manifest.class_names]
    short = [(n, t, v) for n, t, v in pairs if v > t]
    if not short:
        return None
    named = ", ".join(f"{n} ({t} train / {v} val)" for n, t, v in short[:max_named])
    more = f" and {len(short) - max_named} more" if len(short) > max_named else ""
    return f"{len(short)} class(es): {named}{more}"


def resolve_refit(tcfg: TuneJobConfig, manifest: Manifest) -> TuneJobConfig:
    """``refit`` decided: as given, else on exactly when val holds more images than train of
    some class (:func:`val_outnumbers_train`). Prints the decision when it was not given."""
    if tcfg.refit is not None:
        return tcfg
    short = val_outnumbers_train(manifest)
    if short is None:
        print("refit: off (train holds at least as many images as val of every class; "
              "--refit retrains the chosen configuration on train+val anyway)", flush=True)
    else:
        print(f"refit: on, since val holds more images than train of {short}. The chosen "
              "configuration is retrained on train+val for the bundle; test stays unseen "
              "(--no-refit bundles the chosen trial's own model)", flush=True)
    return tcfg.model_copy(update={"refit": short is not None})


def ranking_table(ranking, metric: str, max_rows: int = 20) -> str:
    # "name[a|b]" columns are Optuna's names for restricted choices; "name" holds the value.
    shown = [c for c in ranking.columns if c.startswith("config/") and "[" not in c]
    cols = ["trial_id", val_key(metric), "training_iteration", *shown]
    rows = ranking[cols].head(max_rows).values.tolist()
    headers = [c.removeprefix("config/") for c in cols]
    return format_table(headers, [["" if v != v else v for v in r] for r in rows])
