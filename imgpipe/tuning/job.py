"""The main job, end to end: data (prepared if missing) → search → verified bundle → report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from imgpipe.config import PrepareConfig, TuneJobConfig
from imgpipe.console import format_table, write_json
from imgpipe.constants import TEST, val_key
from imgpipe.data.prepare import ensure_prepared
from imgpipe.data.shards import Manifest, load_manifest
from imgpipe.report import write_report
from imgpipe.training.checkpoint import load_meta
from imgpipe.tuning.export import best_checkpoint_dir, export_bundle
from imgpipe.tuning.tuner import plan_search, run_search


def resolve_data(tcfg: TuneJobConfig) -> Manifest:
    """Use the shards at ``data``; prepare the embedded dataset there when they are missing."""
    try:
        return load_manifest(tcfg.data)
    except FileNotFoundError:
        if tcfg.dataset is None:
            raise
    print(f"no shards at {tcfg.data}: preparing {tcfg.dataset} (seed {tcfg.seed})", flush=True)
    return ensure_prepared(PrepareConfig(dataset=tcfg.dataset, out=tcfg.data, seed=tcfg.seed))


def run_tune_job(tcfg: TuneJobConfig) -> dict[str, Any]:
    """Run the whole search and export; returns the results written to ``<out>/results.json``."""
    started = time.perf_counter()
    plan = plan_search(tcfg)  # fail on an impossible plan before touching data
    print(f"resource plan: {plan.summary()}", flush=True)
    manifest = resolve_data(tcfg)
    outcome = run_search(tcfg, manifest)
    out = Path(tcfg.out)
    out.mkdir(parents=True, exist_ok=True)
    outcome.ranking.to_csv(out / "trials.csv", index=False)
    print("\ntrials ranked by val " + tcfg.metric + ":")
    print(ranking_table(outcome.ranking, tcfg.metric))
    ckpt = best_checkpoint_dir(outcome.train_storage, outcome.best_trial_id, tcfg.metric,
                               out / "best_checkpoint")
    name = tcfg.bundle_name or Path(tcfg.data.rstrip("/")).name
    bundle, metrics = export_bundle(ckpt, tcfg.data, tcfg.bundle_root, name,
                                    {"search_params": outcome.best_params,
                                     "trial_id": outcome.best_trial_id})
    print(f"\nbundle {bundle} verified: val {tcfg.metric} {metrics['val'][tcfg.metric]:.4f}, "
          f"test balanced accuracy {metrics[TEST]['balanced_accuracy']:.4f}, "
          f"test macro-F1 {metrics[TEST]['macro_f1']:.4f}", flush=True)
    history = load_meta(ckpt).get("history", [])
    report = _write_report(tcfg, bundle, history) if tcfg.report else None
    results = {
        "config": tcfg.model_dump(mode="json"),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "search_wall_time_s": round(outcome.wall_time_s, 2),
        "resource_plan": plan.summary(),
        "experiment_path": outcome.experiment_path,
        "best_trial_id": outcome.best_trial_id,
        "best_params": outcome.best_params,
        "bundle": str(bundle),
        "report": str(report) if report else None,
        "num_trials": len(outcome.ranking),
        "val": metrics["val"],
        "test": metrics[TEST],
    }
    write_json(out / "results.json", results)
    return results


def ranking_table(ranking, metric: str, max_rows: int = 20) -> str:
    # "name[a|b]" columns are Optuna's names for restricted choices; "name" holds the value.
    shown = [c for c in ranking.columns if c.startswith("config/") and "[" not in c]
    cols = ["trial_id", val_key(metric), "training_iteration", *shown]
    rows = ranking[cols].head(max_rows).values.tolist()
    headers = [c.removeprefix("config/") for c in cols]
    return format_table(headers, [["" if v != v else v for v in r] for r in rows])


def _write_report(tcfg: TuneJobConfig, bundle: Path, history: list[dict]) -> Path:
    """Calibrate the bundle on val (temperature, binary threshold) and write the report."""
    return write_report(bundle, tcfg.data, Path(tcfg.out) / "report", history=history)
