"""Serve a model bundle over HTTP on Ray Serve (foreground; Ctrl-C shuts down cleanly).

    python jobs/serve.py --bundle bundles/digits-lt/v1 --host 127.0.0.1 --port 8000
    python jobs/serve.py --config serving/config.yaml --bundle bundles/digits-lt
    IMGPIPE_SERVE_TOKEN=... python jobs/serve.py --bundle ... --host 0.0.0.0

Endpoints: /v1/predict, /v1/models, /v2/... (KServe Open Inference Protocol), /metrics, /docs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from imgpipe import storage
from imgpipe.errors import run_job
from imgpipe.preflight import check_serve_overrides
from imgpipe.runtime import init_ray
from serving.runner import DEFAULT_APP_NAME, resolve_serve_args, run_foreground


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="Serve config YAML (serving/config.yaml); flags override it")
    p.add_argument("--bundle", help="bundle version folder, or bundles/<name> for the latest")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument("--app-name", default=DEFAULT_APP_NAME)
    p.add_argument("--max-batch-size", type=int, help="1 turns dynamic batching off")
    p.add_argument("--batch-wait-timeout-s", type=float)
    p.add_argument("--min-replicas", type=int)
    p.add_argument("--max-replicas", type=int)
    p.add_argument("--target-ongoing-requests", type=float)
    p.add_argument("--num-cpus", type=float, help="logical CPUs per replica")
    p.add_argument("--max-body-bytes", type=int)
    p.add_argument("--prediction-log", metavar="LOGDIR",
                   help="log every served image (Parquet) under LOGDIR: local path, s3://, gs://")
    p.add_argument("--prediction-log-sample-rate", type=float, metavar="R",
                   help="fraction of images logged (default 1.0)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p.add_argument("--smoke", action="store_true", help="start, check the endpoints, stop")
    return p


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ns = get_args_parser().parse_args(argv)
    overrides = {k: getattr(ns, k) for k in (
        "bundle", "max_batch_size", "batch_wait_timeout_s", "min_replicas", "max_replicas",
        "target_ongoing_requests", "num_cpus", "max_body_bytes")}
    if ns.prediction_log:
        overrides["prediction_log"] = {"location": ns.prediction_log}
        if ns.prediction_log_sample_rate is not None:
            overrides["prediction_log"]["sample_rate"] = ns.prediction_log_sample_rate
    args, http = resolve_serve_args(ns.config, overrides)
    host = ns.host or http.get("host", "127.0.0.1")
    port = ns.port or int(http.get("port", 8000))
    check_serve_overrides(args.bundle, args.deployment_prior, args.decision_threshold)
    init_ray(ns.address)  # a dead --address/RAY_ADDRESS fails here within seconds
    card = run_foreground(args, host, port, ns.app_name, smoke=ns.smoke)
    print(json.dumps({"served": {"name": card["name"], "version": card["version"],
                                 "bundle": storage.absolute_location(str(args.bundle))},
                      "url": f"http://{host}:{port}"}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(lambda: _main(argv), "serve")


if __name__ == "__main__":
    sys.exit(main())
