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
from imgpipe.config import EvaluateConfig
from imgpipe.config.cli import config_parser, parse_job_args
from imgpipe.errors import run_job
from imgpipe.preflight import check_evaluate_config
from imgpipe.report.evaluate_job import run_evaluate_job


def get_args_parser() -> argparse.ArgumentParser:
    return config_parser(EvaluateConfig, __doc__)


def _main(argv: list[str] | None) -> int:
    cfg, _ = parse_job_args(EvaluateConfig, get_args_parser(), argv)
    check_evaluate_config(cfg.bundle, cfg.data, cfg.split, cfg.prior)  # before any decoding
    storage.check_durable({"--out": cfg.out})
    run_evaluate_job(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(lambda: _main(argv), "evaluate")


if __name__ == "__main__":
    sys.exit(main())
