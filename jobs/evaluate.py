"""Evaluate a model bundle on one split of prepared shards; optionally calibrate it first.

    python jobs/evaluate.py --bundle bundles/digits-lt/v1 --data data/digits-lt --split test \
        --out reports/x [--calibrate] [--prior balanced]

Writes metrics.json, predictions.parquet, results.json, the PNG figures and a self-contained
report.html into --out, and model_card.md (+ report.html, val/test metrics) into the bundle
when it is evaluated with its own deployment prior.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from imgpipe import storage
from imgpipe.config import choices, resolve_config
from imgpipe.console import format_table, per_class_table, write_json
from imgpipe.constants import TEST, VAL
from imgpipe.errors import run_job
from imgpipe.evaluate import (
    BEFORE_TEMPERATURE,
    METRICS_FILE,
    EvaluateConfig,
    ShotThresholds,
    bundle_block,
    calibrate_bundle,
    evaluate_bundle,
    parse_prior,
)
from imgpipe.metrics import ECE, NLL
from imgpipe.preflight import check_evaluate_config
from imgpipe.report import SUMMARY_METRICS, document_bundle, write_report
from imgpipe.robustness import ROBUSTNESS_FILE, ROBUSTNESS_PLOT


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="YAML file (EvaluateConfig fields); flags override it")
    p.add_argument("--bundle", help="bundle version folder, or bundles/<name> for the latest")
    p.add_argument("--data", help="prepared shard folder (local, s3://, gs://)")
    p.add_argument("--split", help="split to evaluate (default test)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--prior", help="deployment prior: model | balanced | train | p1,p2,...\n"
                   "(default: the bundle's; with --calibrate it is stored in the bundle)")
    p.add_argument("--calibrate", action="store_true", default=None,
                   help="fit temperature (and binary threshold) on val, store in the bundle")
    p.add_argument("--threshold-mode", choices=choices(EvaluateConfig, "threshold_mode"),
                   help="binary decision threshold: max F1 or a target recall")
    p.add_argument("--target-recall", type=float, help="with --threshold-mode recall")
    p.add_argument("--many-threshold", type=int, help="many-shot: training count above this")
    p.add_argument("--few-threshold", type=int, help="few-shot: training count below this")
    p.add_argument("--no-report", dest="report", action="store_false", default=None,
                   help="only metrics.json and predictions.parquet")
    p.add_argument("--robustness", action="store_true", default=None,
                   help="balanced accuracy and per-class recall under 7 corruptions x 3\n"
                   "severities: robustness.json, robustness.png, a table")
    p.add_argument("--robustness-seed", type=int, help="seeds the corruptions (0)")
    return p


def run(cfg: EvaluateConfig) -> dict[str, Any]:
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


def _main(argv: list[str] | None) -> int:
    args = vars(get_args_parser().parse_args(argv))
    config_file = args.pop("config")
    overrides = {k.replace("-", "_"): v for k, v in args.items()}
    cfg = resolve_config(EvaluateConfig, config_file, overrides)
    check_evaluate_config(cfg.bundle, cfg.data, cfg.split, cfg.prior)  # before any decoding
    storage.check_durable({"--out": cfg.out})
    out = storage.absolute_location(cfg.out)
    with tempfile.TemporaryDirectory(prefix="imgpipe-eval-") as tmp:
        # Reports are written locally; a URI --out receives the finished folder.
        work = tmp if storage.is_uri(out) else out
        results = run(cfg.model_copy(update={"out": work}))
        results["config"]["out"] = out
        print_summary(results, cfg.split)
        write_json(Path(work) / "results.json", results)
        if storage.is_uri(out):
            storage.upload_dir(work, out)
    print(f"\nwall time {results['wall_time_s']:.1f} s; results in "
          f"{storage.join(out, 'results.json')}"
          + (f", report in {storage.join(out, 'report.html')}" if cfg.report else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(lambda: _main(argv), "evaluate")


if __name__ == "__main__":
    sys.exit(main())
