"""The Ray Serve application: one model deployment with a FastAPI ingress.

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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry, generate_latest
from ray import serve
from ray.serve import Application

from imgpipe.bundle import BundleMeta, resolve_bundle_dir, verify_bundle
from imgpipe.data.transforms import ImageDecodeError
from imgpipe.inference import Predictor
from serving.budget import DecodeBudget, decoded_bytes
from serving.errors import ApiError
from serving.inputs import check_image_header
from serving.live import LiveState, apply_live_config
from serving.metrics import ReplicaMetrics, cluster_metrics, model_info
from serving.prediction_log import (
    LoggedForward,
    MonitorGauges,
    PredictionLogger,
    resolve_prediction_log,
)
from serving.schemas import MODEL_DEPLOYMENT, LiveConfig, MiB, ReplicaSettings, ServeArgs
from serving.security import resolve_token, warn_if_exposed

log = logging.getLogger(__name__)

LOG_STATS_INTERVAL_S = 1.0


@serve.deployment(name=MODEL_DEPLOYMENT)
@serve.ingress()
class ImgpipeModel:
    """One replica: a loaded ``Predictor`` behind the HTTP API of ``serving.routes``.

    Per request: the route reads ``self.live`` once (an immutable ``LiveState``), reserves the
    decode budget for its images, and sends each image into the batcher, where decoding and the
    forward pass run together in one worker-thread hop per batch. The batcher returns logits
    only; the request turns them into probabilities and labels with its own ``LiveState``.
    """

    def __init__(self, settings: ReplicaSettings) -> None:
        torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.predictor = Predictor.load(settings.bundle, device=settings.device)
        self.bundle_meta: BundleMeta = self.predictor.meta  # as written; overrides start here
        self.live = LiveState.create(self.bundle_meta, LiveConfig())
        self.budget = DecodeBudget(settings.decode_budget_bytes, settings.decode_wait_s)
        self.metrics = ReplicaMetrics()
        pre = self.bundle_meta.preprocess
        self._probe = torch.zeros(1, pre.channels, pre.image_size, pre.image_size)
        # Prediction log (off unless configured): the forward pass also queues its logits and
        # penultimate features for a background Parquet writer; never blocks a request.
        self.prediction_log = PredictionLogger(settings.prediction_log) \
            if settings.prediction_log else None
        self._predict_logits = LoggedForward(self.predictor, self.prediction_log) \
            if self.prediction_log else self.predictor.predict_logits
        self._log_stats_at = 0.0
        # Rendered by this replica itself on /metrics: the bundle served, and the monitor
        # job's latest estimates (read from the log folder when /metrics is asked).
        self._own_metrics = CollectorRegistry()
        model_info(self._own_metrics, self.bundle_meta.name, str(self.bundle_meta.version))
        self._monitor = MonitorGauges(self._own_metrics, settings.prediction_log.location) \
            if settings.prediction_log else None

    def __del__(self) -> None:
        # Serve calls __del__ on graceful replica shutdown: flush the log's last rows.
        if getattr(self, "prediction_log", None) is not None:
            self.prediction_log.close()

    def __serve_build_asgi_app__(self):
        # Built per replica after __init__, so routes close over this replica's state.
        from serving.routes import create_api

        return create_api(self)

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Apply ``user_config`` (a LiveConfig); invalid values leave the replica unchanged.

        The new ``LiveState`` is complete before it is published with one assignment, so a
        request in flight keeps the snapshot it started with.
        """
        config = LiveConfig.model_validate(user_config or {})
        state = LiveState.create(self.bundle_meta, config)
        self._batched_logits.set_max_batch_size(config.max_batch_size)
        self._batched_logits.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.live = state
        # The prediction log records the calibration in effect from the predictor's metadata
        # (requests never read it: they use their own LiveState).
        self.predictor.meta = state.meta
        log.info("reconfigured: %s", config.model_dump())

    async def check_health(self) -> None:
        """Serve's periodic probe: the model still runs and gives finite logits."""
        logits = await asyncio.to_thread(self.predictor.predict_logits, self._probe)
        if not torch.isfinite(logits).all():
            raise RuntimeError("model produced non-finite logits on the health probe")

    async def logits_for_images(self, images: list[bytes], live: LiveState) -> np.ndarray:
        """Encoded images → float32 logits ``(N, C)``.

        Headers are checked (pixel limit) and the decode budget reserved before any pixel is
        decoded. Raises ApiError: 400 for an unusable image, 413/503 from the budget.
        """
        whats = [f"image {i}" if len(images) > 1 else "image" for i in range(len(images))]
        sizes = [check_image_header(data, self.settings.max_image_pixels, what)
                 for data, what in zip(images, whats, strict=True)]
        need = sum(decoded_bytes(*wh) for wh in sizes if wh is not None)
        async with self.budget.reserve(need):
            return await self._logits(list(zip(images, whats, strict=True)), live)

    async def logits_for_tensor(self, x: torch.Tensor, live: LiveState) -> np.ndarray:
        """Preprocessed ``(N, C, S, S)`` → float32 logits ``(N, C)``."""
        return await self._logits([(row, "") for row in x], live)

    async def _logits(self, items: list[tuple[bytes | torch.Tensor, str]],
                      live: LiveState) -> np.ndarray:
        if live.config.max_batch_size == 1:
            rows = await asyncio.to_thread(self._forward, items)
        else:
            # One batch item per image: a request with many images fills batches like many
            # single-image requests would, and max_batch_size counts images.
            rows = await asyncio.gather(*(self._batched_logits(item) for item in items))
        for row in rows:
            if isinstance(row, ApiError):
                raise row
        return np.stack(rows)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched_logits(self, items: list[tuple[bytes | torch.Tensor, str]]
                              ) -> list[np.ndarray | ApiError]:
        # Decode and forward run off the event loop in ONE thread hop per batch, so requests
        # keep arriving (and queueing for the next batch) while this one computes.
        return await asyncio.to_thread(self._forward, items)

    def _forward(self, items: list[tuple[bytes | torch.Tensor, str]]
                 ) -> list[np.ndarray | ApiError]:
        """Decode (bytes) or take (tensors) each item, one forward pass over the usable ones;
        an unusable image yields its ApiError(400) in its slot (only its request fails)."""
        out: list[np.ndarray | ApiError | None] = [None] * len(items)
        good, tensors = [], []
        for i, (item, what) in enumerate(items):
            if isinstance(item, torch.Tensor):
                tensors.append(item.unsqueeze(0))
                good.append(i)
                continue
            try:
                tensors.append(self.predictor.preprocess([item]))  # the shared preprocessing
                good.append(i)
            except ImageDecodeError as e:
                out[i] = ApiError(400, f"{what}: {e}")
        if tensors:
            logits = self._predict_logits(torch.cat(tensors)).numpy()
            self.metrics.batch(len(tensors))
            for i, row in zip(good, logits, strict=True):
                out[i] = row
        return out

    def observe_predictions(self, live: LiveState, probs: np.ndarray, labels: list[str]) -> None:
        """Called once per answered inference request (the per-request hook: metrics now)."""
        self.metrics.predictions(labels)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.metrics.request(endpoint, method, status, seconds)
        now = time.monotonic()
        if self.prediction_log is not None and now - self._log_stats_at >= LOG_STATS_INTERVAL_S:
            self._log_stats_at = now
            self.metrics.prediction_log(self.prediction_log.stats())

    async def render_metrics(self) -> bytes:
        """Prometheus text: every replica's ``ray_imgpipe_*`` series (from Ray's metrics agents),
        the served bundle and the monitor job's gauges."""
        if self.prediction_log is not None:
            self.metrics.prediction_log(self.prediction_log.stats())
        text = await cluster_metrics()
        if self._monitor is not None:  # a file read, maybe from s3://: off the event loop
            await asyncio.to_thread(self._monitor.refresh)
        return text + generate_latest(self._own_metrics)


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
        # Ray sets CUDA_VISIBLE_DEVICES to the replica's own GPU, so "cuda" is always that one.
        device="cuda" if args.num_gpus > 0 else "cpu",
        max_body_bytes=args.max_body_bytes, max_images_per_request=args.max_images_per_request,
        max_image_pixels=args.max_image_pixels, token=token,
        decode_budget_bytes=args.decode_budget_bytes, decode_wait_s=args.decode_wait_s,
        prediction_log=resolve_prediction_log(args.prediction_log),
    )
    return ImgpipeModel.options(
        autoscaling_config={
            "min_replicas": args.min_replicas, "initial_replicas": args.min_replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
        },
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus,
                           "memory": args.replica_memory_mb * MiB},
        logging_config={"enable_access_log": args.access_log},
        user_config=live.model_dump(),
        health_check_period_s=args.health_check_period_s,
        health_check_timeout_s=args.health_check_timeout_s,
    ).bind(settings)
