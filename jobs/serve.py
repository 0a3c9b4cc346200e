"""Serve a model bundle over HTTP on Ray Serve (foreground; Ctrl-C shuts down cleanly).

    python jobs/serve.py --bundle bundles/digits-lt/v1 --host 127.0.0.1 --port 8000
    python jobs/serve.py --config serving/config.yaml --bundle bundles/digits-lt
    IMGPIPE_SERVE_TOKEN=... python jobs/serve.py --bundle ... --host 0.0.0.0
    python jobs/serve.py --bundle ... --ingress proxy      # Serve's Python proxy, not HAProxy

Endpoints: /v1/predict, /v1/models, /v2/... (KServe Open Inference Protocol), /metrics, /docs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import ray

from imgpipe import storage
from imgpipe.config import ConfigError
from imgpipe.config.cli import add_job_flag, config_parser, parse_job_flags
from imgpipe.errors import run_job
from imgpipe.preflight import check_serve_overrides
from imgpipe.runtime import init_ray
from serving.ingress import INGRESS_CHOICES, ingress_for_instance
from serving.runner import DEFAULT_APP_NAME, check_gpu_fit, resolve_serve_args, run_foreground
from serving.schemas import TOKEN_ENV, ServeArgs

# Flags kept from before they were generated from ServeArgs (--help lists every field).
RENAMED = {"prediction-log": "prediction-log.location",
           "prediction-log-sample-rate": "prediction-log.sample-rate"}


def get_args_parser() -> argparse.ArgumentParser:
    p = config_parser(ServeArgs, __doc__, renamed=RENAMED,
                      config_help="Serve config YAML (serving/config.yaml: its first "
                                  "application's args); flags override it")
    add_job_flag(p, "--host", help="bind address (default: the config's, else 127.0.0.1)")
    add_job_flag(p, "--port", type=int, help="HTTP port (default: the config's, else 8000)")
    add_job_flag(p, "--app-name", default=DEFAULT_APP_NAME, help="Serve application name")
    add_job_flag(p, "--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    add_job_flag(p, "--ingress", choices=INGRESS_CHOICES,
                 help="HTTP ingress of a Ray instance this job starts: haproxy (Ray Serve's "
                      "high-throughput mode, the default) or proxy (Serve's Python proxy); "
                      "see serving/ingress.py")
    add_job_flag(p, "--smoke", action="store_true", help="start, check the endpoints, stop")
    return p


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config_file, overrides, job = parse_job_flags(get_args_parser(), argv)
    if "token" in overrides:  # argv is visible to every user of the machine (ps, /proc)
        raise ConfigError(f"--token: do not pass the token on the command line; set ${TOKEN_ENV} "
                          "or put it in the --config file")
    args, http = resolve_serve_args(config_file, overrides)
    host = job["host"] or http.get("host", "127.0.0.1")
    port = job["port"] or int(http.get("port", 8000))
    check_serve_overrides(args.bundle, args.deployment_prior, args.decision_threshold)
    ingress = ingress_for_instance(job["ingress"], job["address"])
    local = init_ray(job["address"])  # a dead --address/RAY_ADDRESS fails here within seconds
    check_gpu_fit(args, ray.cluster_resources().get("GPU", 0), local=local)
    card = run_foreground(args, host, port, job["app_name"], smoke=job["smoke"], ingress=ingress)
    print(json.dumps({"served": {"name": card["name"], "version": card["version"],
                                 "bundle": storage.absolute_location(str(args.bundle))},
                      "url": f"http://{host}:{port}"}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(lambda: _main(argv), "serve")


if __name__ == "__main__":
    sys.exit(main())
