"""The Ray Serve application: one model deployment (FastAPI ingress) and a metrics store.

``build_app`` is the typed builder ``serve run`` / ``serve deploy`` call with the ``args:`` of
``serving/config.yaml``. Replicas load the bundle weights-only and checksum-verified, batch
images across concurrent requests with ``@serve.batch``, and take live changes (batch size,
temperature, prior, threshold) through ``user_config`` → ``reconfigure``.
"""

# No ``from __future__ import annotations`` here: Serve reads build_app's annotation at runtime
# to validate ``args`` into ServeArgs, and a string annotation would skip that.

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prometheus_client import disable_created_metrics
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from imgpipe.bundle import BundleMeta, resolve_bundle_dir, validate_meta, verify_bundle
from imgpipe.data.transforms import ImageDecodeError
from imgpipe.inference import Predictor
from serving.errors import ApiError
from serving.inputs import check_image_header
from serving.metrics import MetricsBuffer, PrometheusMetrics
from serving.prediction_log import (
    LoggedForward,
    MonitorGauges,
    PredictionLogger,
    resolve_prediction_log,
)
from serving.schemas import MODEL_DEPLOYMENT, LiveConfig, ReplicaSettings, ServeArgs
from serving.security import resolve_token, warn_if_exposed

log = logging.getLogger(__name__)

METRICS_DEPLOYMENT = "MetricsStore"
FLUSH_INTERVAL_S = 1.0


@serve.deployment(name=METRICS_DEPLOYMENT, num_replicas=1, max_ongoing_requests=256,
                  ray_actor_options={"num_cpus": 0})
class MetricsStore:
    """Holds the Prometheus registry; model replicas send it their counts."""

    def __init__(self, model_name: str, model_version: str,
                 prediction_log: str | None = None) -> None:
        # ``*_created`` timestamp series only add noise to a dashboard; off in this process.
        disable_created_metrics()
        self._metrics = PrometheusMetrics(model_name, model_version)
        self._monitor = MonitorGauges(self._metrics.registry, prediction_log) if prediction_log \
            else None

    def record(self, delta: dict[str, Any]) -> None:
        self._metrics.apply(delta)
        if self._monitor is not None:
            self._monitor.apply(delta.get("prediction_log"))

    def render(self) -> bytes:
        if self._monitor is not None:
            self._monitor.refresh()
        return self._metrics.render()


@serve.deployment(name=MODEL_DEPLOYMENT)
@serve.ingress()
class ImgpipeModel:
    """One replica: a loaded ``Predictor`` behind the HTTP API of ``serving.routes``."""

    def __init__(self, settings: ReplicaSettings, metrics_store: DeploymentHandle) -> None:
        torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.predictor = Predictor.load(settings.bundle)
        self.bundle_meta: BundleMeta = self.predictor.meta  # as written; overrides start here
        self.live = LiveConfig()
        self.metrics = MetricsBuffer()
        self._store = metrics_store
        self._flusher: asyncio.Task | None = None
        pre = self.bundle_meta.preprocess
        self._probe = torch.zeros(1, pre.channels, pre.image_size, pre.image_size)
        # Prediction log (off unless configured): the forward pass also queues its logits and
        # penultimate features for a background Parquet writer; never blocks a request.
        self.prediction_log = PredictionLogger(settings.prediction_log) \
            if settings.prediction_log else None
        self._forward = LoggedForward(self.predictor, self.prediction_log) \
            if self.prediction_log else self.predictor.predict_logits

    def __del__(self) -> None:
        # Serve calls __del__ on graceful replica shutdown: flush the log's last rows.
        if getattr(self, "prediction_log", None) is not None:
            self.prediction_log.close()

    def __serve_build_asgi_app__(self):
        # Built per replica after __init__, so routes close over this replica's state.
        from serving.routes import create_api

        return create_api(self)

    @property
    def meta(self) -> BundleMeta:
        """The metadata in effect (bundle plus live overrides)."""
        return self.predictor.meta

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Apply ``user_config`` (a LiveConfig); invalid values leave the replica unchanged."""
        live = LiveConfig.model_validate(user_config or {})
        self.predictor.meta = apply_live_config(self.bundle_meta, live)
        self._batched_probabilities.set_max_batch_size(live.max_batch_size)
        self._batched_probabilities.set_batch_wait_timeout_s(live.batch_wait_timeout_s)
        self.live = live
        log.info("reconfigured: %s", live.model_dump())

    async def check_health(self) -> None:
        """Serve's periodic probe: the model still runs and gives finite logits."""
        logits = await asyncio.to_thread(self.predictor.predict_logits, self._probe)
        if not torch.isfinite(logits).all():
            raise RuntimeError("model produced non-finite logits on the health probe")

    async def probabilities_for_images(self, images: list[bytes]) -> np.ndarray:
        """Encoded images → adjusted probabilities ``(N, C)``; bad images → ApiError(400)."""
        x = await asyncio.to_thread(self._preprocess, images)
        return await self.probabilities_for_tensor(x)

    def _preprocess(self, images: list[bytes]) -> torch.Tensor:
        out = []
        for i, data in enumerate(images):
            what = f"image {i}" if len(images) > 1 else "image"
            check_image_header(data, self.settings.max_image_pixels, what)
            try:
                out.append(self.predictor.preprocess([data]))  # the shared preprocessing
            except ImageDecodeError as e:
                raise ApiError(400, f"{what}: {e}") from None
        return torch.cat(out)

    async def probabilities_for_tensor(self, x: torch.Tensor) -> np.ndarray:
        """Preprocessed ``(N, C, S, S)`` → probabilities, batched across requests if enabled."""
        if self.live.max_batch_size == 1:
            logits = await asyncio.to_thread(self._forward, x)
            self.metrics.batch(len(x))
            probs = self.predictor.probabilities(logits)
        else:
            # One batch item per image: a request with many images fills batches like many
            # single-image requests would, and max_batch_size counts images.
            rows = await asyncio.gather(*(self._batched_probabilities(img) for img in x))
            probs = np.stack(rows)
        self.metrics.predictions(self.labels(probs))
        return probs

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched_probabilities(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        x = torch.stack(images)
        # The forward pass runs off the event loop, so requests keep arriving (and queueing
        # for the next batch) while this one computes.
        logits = await asyncio.to_thread(self._forward, x)
        self.metrics.batch(len(images))
        return list(self.predictor.probabilities(logits))

    def labels(self, probs: np.ndarray) -> list[str]:
        """The decision per row: argmax, or the binary threshold when the bundle has one."""
        names = self.meta.class_names
        return [names[i] for i in self.predictor.predict_labels(probs)]

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.metrics.request(endpoint, method, status, seconds)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def flush_metrics(self) -> None:
        delta = self.metrics.take()
        if delta is not None and self.prediction_log is not None:
            delta["prediction_log"] = (self.prediction_log.replica, self.prediction_log.stats())
        if delta is not None:
            await self._store.record.remote(delta)

    async def render_metrics(self) -> bytes:
        """Prometheus text for all replicas (this replica's latest counts included)."""
        await self.flush_metrics()
        return await self._store.render.remote()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            try:
                await self.flush_metrics()
            except Exception as e:  # a lost delta is better than a dead replica
                log.warning("could not ship metrics to %s: %s", METRICS_DEPLOYMENT, e)


def apply_live_config(meta: BundleMeta, live: LiveConfig) -> BundleMeta:
    """The bundle's metadata with the live calibration overrides applied (validated).

    Raises BundleError when an override does not fit the bundle (e.g. a prior of the wrong
    length, a threshold on a multi-class model).
    """
    fields = meta.model_dump()
    for key in ("temperature", "deployment_prior", "decision_threshold"):
        value = getattr(live, key)
        if value is not None:
            fields[key] = value
    return validate_meta(fields, f"{meta.name} v{meta.version} with user_config")


def _serve_http_host() -> str | None:
    """Host the Serve proxies bind to, if a Serve instance is reachable (best effort)."""
    with contextlib.suppress(Exception):
        from ray.serve.context import _get_global_client

        return _get_global_client(raise_if_no_controller_running=False).http_config.host
    return None


def build_app(args: ServeArgs) -> Application:
    """The application for ``serve run``/``serve deploy``/``serve.run`` (typed builder).

    Resolves the bundle to one fixed version folder (a replica restarted later loads the same
    weights even if a newer version appears), verifies its checksum, checks live overrides
    against it, resolves the token (args, else ``$IMGPIPE_SERVE_TOKEN``) and warns if Serve is
    exposed without one.

    Raises:
        BundleError / BundleChecksumError: the bundle is missing, invalid or corrupted.
        pydantic.ValidationError: invalid args.
    """
    if not isinstance(args, ServeArgs):
        args = ServeArgs.model_validate(args)
    bundle_dir = resolve_bundle_dir(Path(args.bundle).expanduser().resolve())
    meta = verify_bundle(bundle_dir)  # fail here, not in every replica's constructor
    live = args.live_config()
    apply_live_config(meta, live)
    token = resolve_token(args.token)
    warn_if_exposed(_serve_http_host(), token)
    settings = ReplicaSettings(
        bundle=str(bundle_dir), torch_threads=args.torch_threads,
        max_body_bytes=args.max_body_bytes, max_images_per_request=args.max_images_per_request,
        max_image_pixels=args.max_image_pixels, token=token,
        prediction_log=resolve_prediction_log(args.prediction_log),
    )
    store = MetricsStore.bind(meta.name, str(meta.version),
                              settings.prediction_log.location if settings.prediction_log else None)
    return ImgpipeModel.options(
        autoscaling_config={
            "min_replicas": args.min_replicas, "initial_replicas": args.min_replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
        },
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        ray_actor_options={"num_cpus": args.num_cpus},
        user_config=live.model_dump(),
        health_check_period_s=args.health_check_period_s,
        health_check_timeout_s=args.health_check_timeout_s,
    ).bind(settings, store)
