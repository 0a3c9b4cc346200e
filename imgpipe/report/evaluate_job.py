"""The evaluate job's work (``jobs/evaluate.py`` parses flags and calls ``run_evaluate_job``):
calibrate (optional), evaluate as served, report, score corruptions; and its console summary."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from imgpipe import storage
from imgpipe.config import EvaluateConfig
from imgpipe.config.specs import parse_prior
from imgpipe.console import format_table, per_class_table, write_json
from imgpipe.constants import TEST, VAL
from imgpipe.evaluate import (
    BEFORE_TEMPERATURE,
    METRICS_FILE,
    ShotThresholds,
    bundle_block,
    calibrate_bundle,
    evaluate_bundle,
)
from imgpipe.metrics import ECE, NLL
from imgpipe.report.bundle_docs import document_bundle
from imgpipe.report.labels import SUMMARY_METRICS
from imgpipe.report.write import write_report
from imgpipe.robustness import ROBUSTNESS_FILE, ROBUSTNESS_PLOT


def evaluate_run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Calibrate (optional), evaluate, report; return the results.json document."""
    started = time.perf_counter()
    prior = parse_prior(cfg.prior)
    calibration = None
    if cfg.calibrate:
        calibration = calibrate_bundle(cfg.bundle, cfg.data, deployment_prior=prior,
                                       threshold_mode=cfg.threshold_mode,
                                       target_recall=cfg.target_recall)
        prior = None  # stored in the bundle: from here on it is the bundle's own
    shots = ShotThresholds(cfg.many_threshold, cfg.few_threshold)
    robustness = None
    if cfg.report:
        common = {"split": cfg.split, "shot_thresholds": shots, "robustness": cfg.robustness,
                  "robustness_seed": cfg.robustness_seed}
        if prior is None:  # the bundle's own numbers: recorded in it, with its report and card
            document_bundle(cfg.bundle, cfg.data, cfg.out, calibrate=False, **common)
        else:
            write_report(cfg.bundle, cfg.data, cfg.out, prior=prior, **common)
        payload = json.loads((Path(cfg.out) / METRICS_FILE).read_text())
        if cfg.robustness:
            robustness = json.loads((Path(cfg.out) / ROBUSTNESS_FILE).read_text())
            robustness["plot"] = str(Path(cfg.out) / ROBUSTNESS_PLOT)
    else:
        payload = evaluate_bundle(cfg.bundle, cfg.data, cfg.split, cfg.out, prior=prior,
                                  shot_thresholds=shots,
                                  record=prior is None and cfg.split in (VAL, TEST))
        if cfg.robustness:
            robustness = run_robustness(cfg, prior)
    return {"config": cfg.model_dump(mode="json"), "calibration": calibration,
            "robustness": robustness,
            "wall_time_s": round(time.perf_counter() - started, 2),
            "evaluated": {k: v for k, v in payload.items() if k != "metrics"},
            cfg.split: bundle_block(payload["metrics"])}


def run_robustness(cfg: EvaluateConfig, prior: Any) -> dict[str, Any]:
    """Score corrupted copies of the split through the serving Predictor; write JSON + PNG."""
    from imgpipe.evaluate import load_predictor
    from imgpipe.robustness import write_robustness

    return write_robustness(load_predictor(cfg.bundle, prior), cfg.data, cfg.split,
                            Path(cfg.out), seed=cfg.robustness_seed)


def print_summary(results: dict[str, Any], split: str) -> None:
    m = results[split]
    ev = results["evaluated"]
    rows = [[label, m[key]] for key, label in SUMMARY_METRICS if key in m]
    before = m[BEFORE_TEMPERATURE]
    rows += [[f"NLL before temperature (T = 1 -> {ev['temperature']:.3f})", before[NLL]],
             ["ECE before temperature", before[ECE]]]
    print(f"\n{ev['name']} v{ev['version']} on {split} ({ev['num_rows']} images, prior "
          f"{ev['deployment_prior']}):")
    print(format_table(["metric", split], rows))
    print()
    print(per_class_table(ev["class_names"], ev["train_class_counts"], m))
    if results.get("robustness"):
        from imgpipe.robustness import ROBUSTNESS_HEADERS, robustness_rows

        rob = results["robustness"]
        print(f"\nRobustness on {split} (balanced accuracy; worst class recall at severity 3):")
        print(format_table(ROBUSTNESS_HEADERS, robustness_rows(rob)))
        print(f"mean over corruptions {rob['mean_corrupted_balanced_accuracy']:.4f}; worst "
              f"{rob['worst']['corruption']} s{rob['worst']['severity']} "
              f"{rob['worst']['value']:.4f}; plot {rob['plot']}")


def run_evaluate_job(cfg: EvaluateConfig) -> dict[str, Any]:
    """Run the job into ``cfg.out`` (local, or a URI that receives the finished folder), print
    the summary, write ``results.json``; return the results."""
    out = storage.absolute_location(cfg.out)
    with tempfile.TemporaryDirectory(prefix="imgpipe-eval-") as tmp:
        # Reports are written locally; a URI --out receives the finished folder.
        work = tmp if storage.is_uri(out) else out
        results = evaluate_run(cfg.model_copy(update={"out": work}))
        results["config"]["out"] = out
        print_summary(results, cfg.split)
        write_json(Path(work) / "results.json", results)
        if storage.is_uri(out):
            storage.upload_dir(work, out)
    print(f"\nwall time {results['wall_time_s']:.1f} s; results in "
          f"{storage.join(out, 'results.json')}"
          + (f", report in {storage.join(out, 'report.html')}" if cfg.report else ""))
    return results
