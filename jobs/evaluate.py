"""Evaluate a model bundle on one split of prepared shards; optionally calibrate it first.

    python jobs/evaluate.py --bundle bundles/digits-lt/v1 --data data/digits-lt --split test \
        --out reports/x [--calibrate] [--prior balanced]

Writes metrics.json, predictions.parquet, results.json, the PNG figures and a self-contained
report.html into --out, and model_card.md (+ report.html, val/test metrics) into the bundle
when it is evaluated with its own deployment prior.
"""

from __future__ import annotations

import argparse
import sys

from imgpipe import storage
from imgpipe.config import choices, resolve_config
from imgpipe.errors import run_job
from imgpipe.evaluate import EvaluateConfig
from imgpipe.preflight import check_evaluate_config
from imgpipe.report.evaluate_job import run_evaluate_job


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


def _main(argv: list[str] | None) -> int:
    args = vars(get_args_parser().parse_args(argv))
    config_file = args.pop("config")
    overrides = {k.replace("-", "_"): v for k, v in args.items()}
    cfg = resolve_config(EvaluateConfig, config_file, overrides)
    check_evaluate_config(cfg.bundle, cfg.data, cfg.split, cfg.prior)  # before any decoding
    storage.check_durable({"--out": cfg.out})
    run_evaluate_job(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(lambda: _main(argv), "evaluate")


if __name__ == "__main__":
    sys.exit(main())
