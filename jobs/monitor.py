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

from imgpipe.config import ConfigError, MonitorConfig, resolve_config
from imgpipe.config.cli import add_job_flag, config_parser, parse_job_flags
from imgpipe.errors import run_job
from imgpipe.monitoring.job import run_monitor
from imgpipe.monitoring.reference import init_reference

# Short names for the alert criteria (``--help`` lists all flags).
SHORTCUTS = {"trigger.drift-p-below": "trigger-drift-p", "trigger.prior-tv-above": "trigger-prior-tv",
             "trigger.balanced-accuracy-below": "trigger-balanced-accuracy"}


def get_args_parser() -> argparse.ArgumentParser:
    p = config_parser(MonitorConfig, __doc__, shortcuts=SHORTCUTS)
    add_job_flag(p, "--init-reference", metavar="DATA",
                 help="write the bundle's monitor reference from DATA's val split (test for a "
                      "bundle refit on train+val), then stop unless --log is given")
    return p


def _main(argv: list[str] | None) -> int:
    config_file, args, job = parse_job_flags(get_args_parser(), argv)
    init_data = job["init_reference"]
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
