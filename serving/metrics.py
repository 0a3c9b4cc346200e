"""Prometheus metrics for the app's ``/metrics`` route, aggregated over all replicas.

Each replica counts into a ``MetricsBuffer`` and ships the deltas (about once a second, and
right before answering ``/metrics``) to one ``MetricsStore`` deployment that owns the
Prometheus registry. So a scrape that lands on any replica sees the totals of all of them,
instead of one replica's counters jumping between scrapes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class MetricsBuffer:
    """Per-replica counts since the last flush (plain Python, cheap to update)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._requests: Counter[tuple[str, str, str]] = Counter()
        self._latency: list[tuple[str, float]] = []
        self._batches: list[int] = []
        self._predictions: Counter[str] = Counter()

    def request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self._requests[(endpoint, method, str(status))] += 1
        self._latency.append((endpoint, seconds))

    def batch(self, size: int) -> None:
        self._batches.append(size)

    def predictions(self, labels: Iterable[str]) -> None:
        self._predictions.update(labels)

    def take(self) -> dict[str, Any] | None:
        """The deltas so far (picklable), resetting the buffer; None when there are none."""
        if not (self._requests or self._batches or self._predictions):
            return None
        delta = {
            "requests": list(self._requests.items()),
            "latency": self._latency,
            "batches": self._batches,
            "predictions": list(self._predictions.items()),
        }
        self._reset()
        return delta


class PrometheusMetrics:
    """The registry behind ``/metrics``: requests, latency, batch sizes, predictions."""

    def __init__(self, model_name: str, model_version: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = PromCounter(
            "imgpipe_http_requests", "HTTP requests by endpoint, method and status",
            ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram(
            "imgpipe_http_request_duration_seconds", "Request latency inside the replica",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(
            "imgpipe_batch_size", "Images per model forward pass", buckets=BATCH_BUCKETS,
            registry=self.registry)
        self.predictions = PromCounter(
            "imgpipe_predictions", "Predicted label per image", ["label"], registry=self.registry)
        info = Gauge("imgpipe_model_info", "The bundle being served", ["name", "version"],
                     registry=self.registry)
        info.labels(model_name, model_version).set(1)

    def apply(self, delta: dict[str, Any]) -> None:
        """Add one replica's deltas (the output of ``MetricsBuffer.take``)."""
        for (endpoint, method, status), n in delta["requests"]:
            self.requests.labels(endpoint, method, status).inc(n)
        for endpoint, seconds in delta["latency"]:
            self.latency.labels(endpoint).observe(seconds)
        for size in delta["batches"]:
            self.batch_size.observe(size)
        for label, n in delta["predictions"]:
            self.predictions.labels(label).inc(n)

    def render(self) -> bytes:
        """Prometheus text exposition format (version 0.0.4)."""
        return generate_latest(self.registry)
