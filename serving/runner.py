"""Run the Serve app in the foreground (``jobs/serve.py``): start, wait for Ctrl-C, clean up."""

from __future__ import annotations

import io
import json
import logging
import signal
import threading
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from imgpipe.config import ConfigError, apply_overrides, format_validation_error, load_yaml
from serving.schemas import MODEL_DEPLOYMENT, ServeArgs
from serving.security import resolve_token

log = logging.getLogger(__name__)
DEFAULT_APP_NAME = "imgpipe"


def resolve_serve_args(config_path: str | Path | None,
                       overrides: dict[str, Any]) -> tuple[ServeArgs, dict[str, Any]]:
    """ServeArgs and http_options from: defaults < Serve config file < overrides (dotted keys
    such as ``prediction_log.location``; None values skipped).

    The config file is a Serve config (``serving/config.yaml``): its first application's
    ``args``, the model deployment's ``user_config`` and the ``http_options`` are used.

    Raises:
        ConfigError: naming every invalid field.
    """
    args: dict[str, Any] = {}
    http: dict[str, Any] = {}
    if config_path is not None:
        data = load_yaml(config_path)
        app = (data.get("applications") or [{}])[0]
        args = dict(app.get("args") or {})
        for dep in app.get("deployments") or []:
            if dep.get("name") == MODEL_DEPLOYMENT:  # its user_config keys are ServeArgs fields
                args.update(dep.get("user_config") or {})
        http = dict(data.get("http_options") or {})
    apply_overrides(args, overrides)
    try:
        return ServeArgs.model_validate(args), http
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "serve args")) from None


def check_gpu_fit(args: ServeArgs, cluster_gpus: float, local: bool) -> None:
    """Fail early when ``num_gpus`` cannot place ``min_replicas`` replicas (Serve would wait for
    them forever). On a cluster, GPUs may still join (an autoscaler): only a warning there.

    Raises:
        ConfigError: a local instance with fewer GPUs than ``num_gpus × min_replicas``.
    """
    need = args.num_gpus * args.min_replicas
    if need <= cluster_gpus:
        if args.num_gpus * args.max_replicas > cluster_gpus:
            log.warning("num_gpus %g × max_replicas %d is more than the %g GPU(s) here: replicas "
                        "beyond %d wait for GPUs", args.num_gpus, args.max_replicas,
                        cluster_gpus, int(cluster_gpus // args.num_gpus))
        return
    msg = (f"num_gpus: {args.min_replicas} replicas (min_replicas) × {args.num_gpus:g} GPU need "
           f"{need:g} GPU(s), and the Ray instance has {cluster_gpus:g}; lower --num-gpus "
           f"(0.5 puts two replicas on one GPU) or --min-replicas")
    if local:
        raise ConfigError(msg)
    log.warning("%s (waiting for the cluster to add GPUs)", msg)


def _request(url: str, token: str | None, body: bytes | None = None,
             content_type: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if content_type:
        headers["Content-Type"] = content_type
    req = urllib.request.Request(url, data=body, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _probe_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (128, 128, 128)).save(buf, "PNG")  # within any max_image_pixels
    return buf.getvalue()


def smoke_check(base_url: str, args: ServeArgs, predict: bool = False) -> dict[str, Any]:
    """Hit the readiness probe and the model card, and with ``predict`` one prediction; the card
    is returned.

    The prediction is a grey 1×1 PNG through ``POST /v1/predict``, so decoding, resizing,
    batching and the forward pass (on the replica's device) all run once. Only ``--smoke`` asks
    for it: a service that stays up must not count a probe image in its metrics and prediction
    log (a ``--smoke`` run with a prediction log configured logs that one probe).

    Raises:
        RuntimeError: not ready, or the prediction's probabilities do not sum to 1.
        urllib.error.HTTPError: an endpoint answered with an error status.
    """
    token = resolve_token(args.token)
    secret = token.get_secret_value() if token else None
    if not _request(f"{base_url}/v2/health/ready", None).get("ready"):
        raise RuntimeError(f"{base_url} is not ready")
    card = _request(f"{base_url}/v1/models", secret)["models"][0]
    if not predict:
        return card
    top = _request(f"{base_url}/v1/predict?top_k={len(card['class_names'])}", secret,
                   _probe_png(), "image/png")["predictions"][0]["top_k"]
    total = sum(e["probability"] for e in top)
    if not abs(total - 1.0) <= 1e-3:  # NaN fails too
        raise RuntimeError(f"smoke prediction's probabilities sum to {total}, not 1")
    print(f"smoke: POST /v1/predict answered: {top[0]['label']} p={top[0]['probability']:.3f}",
          flush=True)
    return card


def _stop_on_signal() -> threading.Event:
    """An event set by SIGINT/SIGTERM, installed before the job says it is serving: a Ctrl-C
    right after that line is a clean stop, not a KeyboardInterrupt."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def run_foreground(args: ServeArgs, host: str = "127.0.0.1", port: int = 8000,
                   app_name: str = DEFAULT_APP_NAME, smoke: bool = False,
                   ingress: str | None = None) -> dict[str, Any]:
    """Start Serve on ``host:port`` with the app, block until SIGINT/SIGTERM, then tear down.

    Connects to ``$RAY_ADDRESS`` when set, else starts a local Ray instance. On exit the app
    is deleted, Serve is shut down when no other application is left, and Ray is disconnected.
    ``smoke=True`` checks the endpoints once and returns instead of waiting. ``ingress`` (the
    ``serving.ingress`` mode the instance was started with, if known) is only reported.
    """
    import ray

    if not ray.is_initialized():
        ray.init(configure_logging=False)
    try:
        start_app(args, host, port, app_name)
        base_url = f"http://{host}:{port}"
        card = smoke_check(base_url, args, predict=smoke)
        stop = None if smoke else _stop_on_signal()
        via = f", ingress {ingress}" if ingress else ""
        print(f"serving {card['name']} v{card['version']} at {base_url} "
              f"(docs {base_url}/docs{via}); Ctrl-C to stop", flush=True)
        while stop is not None and not stop.wait(0.5):
            pass
        return card
    finally:
        print("shutting down ...", flush=True)
        shutdown_app(app_name)
        ray.shutdown()


def start_app(args: ServeArgs, host: str = "127.0.0.1", port: int = 8000,
              app_name: str = DEFAULT_APP_NAME) -> None:
    """Start Serve's HTTP proxy on ``host:port`` and deploy the app (Ray must be initialised).

    The builder warns if ``host`` is not loopback and no token is set (it sees Serve's host).
    """
    from ray import serve

    from serving.app import build_app

    serve.start(http_options={"host": host, "port": port},
                logging_config={"enable_access_log": args.access_log})
    serve.run(build_app(args), name=app_name, route_prefix="/")


def shutdown_app(app_name: str) -> None:
    """Delete ``app_name``; shut Serve down entirely when it was the last application."""
    from ray import serve

    try:
        serve.delete(app_name)
        if not serve.status().applications:
            serve.shutdown()
    except Exception as e:  # Serve never started or is already gone: nothing left to stop
        log.debug("serve shutdown: %s", e)
