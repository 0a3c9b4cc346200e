"""Watch a served model: label shift (BBSE, EM), embedding drift, expected accuracy, alerts.

    python jobs/monitor.py --bundle bundles/digits-lt/v1 --init-reference data/digits-lt  # once
    python jobs/monitor.py --bundle bundles/digits-lt/v1 --log logs/predictions --window 1h \\
        --out runs/monitor [--every 10m] [--apply-prior] [--active-learning 50]

Writes monitor.json, monitor.html and history.jsonl in --out; the app's /metrics shows the
latest estimates. Exit 2 on a bad flag/config, a missing log or a bundle without reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from imgpipe.config import ConfigError, choices, resolve_config
from imgpipe.errors import run_job
from imgpipe.monitoring.job import MonitorConfig, run_monitor
from imgpipe.monitoring.reference import init_reference


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="MonitorConfig YAML; flags override it")
    p.add_argument("--bundle", help="bundle version folder (or bundles/<name> for the latest)")
    p.add_argument("--init-reference", metavar="DATA",
                   help="write the bundle's monitor reference from DATA's val split, then stop "
                        "unless --log is given")
    p.add_argument("--log", help="prediction log folder (local, s3://, gs://)")
    p.add_argument("--window", help="30m | 1h | 2d | N rows (default 1h)")
    p.add_argument("--out", help="output folder (default runs/monitor)")
    p.add_argument("--every", help="periodic mode: one pass every DURATION (e.g. 10m)")
    p.add_argument("--passes", type=int, help="periodic mode: stop after N passes")
    p.add_argument("--alpha", type=float, help="false-alarm budget per pass (0.05)")
    p.add_argument("--bootstrap", type=int, help="bootstrap replicates for the CIs (200)")
    p.add_argument("--permutations", type=int, help="drift test permutations (500)")
    p.add_argument("--seed", type=int)
    p.add_argument("--apply-prior", action="store_true", default=None,
                   help="push the estimated prior to the running app (user_config)")
    p.add_argument("--prior-method", choices=choices(MonitorConfig, "prior_method"))
    p.add_argument("--serve-address", help="Ray dashboard URL (default http://127.0.0.1:8265)")
    p.add_argument("--app-name", help="Serve application (default imgpipe)")
    p.add_argument("--trigger-drift-p", type=float, dest="trigger.drift_p_below")
    p.add_argument("--trigger-prior-tv", type=float, dest="trigger.prior_tv_above")
    p.add_argument("--trigger-balanced-accuracy", type=float,
                   dest="trigger.balanced_accuracy_below")
    p.add_argument("--retrain-address", help="Ray Jobs API address: submit tune.py on alert")
    p.add_argument("--retrain-data", help="prepared data the retraining job trains on")
    p.add_argument("--retrain-working-dir", help="upload this checkout with the job")
    p.add_argument("--active-learning", type=int, metavar="K", help="queue the K most "
                   "informative images (per-class quota) with a manifest.csv")
    p.add_argument("--active-learning-score", choices=choices(MonitorConfig, "active_learning_score"))
    return p


def _main(argv: list[str] | None) -> int:
    args = vars(get_args_parser().parse_args(argv))
    config_file, init_data = args.pop("config"), args.pop("init_reference")
    try:
        if init_data:
            if not args.get("bundle"):
                raise ConfigError("--init-reference needs --bundle")
            path = init_reference(args["bundle"], init_data)
            print(f"reference written: {path}")
            if not args.get("log"):
                return 0
        cfg = resolve_config(MonitorConfig, config_file, args)
        # user mistakes (ConfigError, BundleError, ReferenceError, ApplyPriorError, ...) are
        # UserErrors: run_job prints them and exits 2; anything else is a bug with a traceback
        result = run_monitor(cfg)
    except KeyboardInterrupt:
        return 130
    print(json.dumps({"shift_detected": result["shift_detected"],
                      "alert": result["alert"]["triggered"],
                      "out": str(Path(cfg.out).resolve())}))  # where monitor.json was written
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(lambda: _main(argv), "monitor")


if __name__ == "__main__":
    sys.exit(main())
