"""The app's Prometheus metrics, recorded with Ray Serve's own metrics API.

Each replica records into ``ray.serve.metrics`` counters, histograms and gauges; Serve adds the
``deployment``, ``replica`` and ``application`` labels and Ray's metrics agent on every node
exports them as ``ray_imgpipe_*`` next to Serve's own ``ray_serve_*`` series, where a
Prometheus server that scrapes Ray (``/tmp/ray/prom_metrics_service_discovery.json``) finds
them. The app's ``/metrics`` route gathers the same ``ray_imgpipe_*`` families from every
alive node's agent, so one scrape of the app shows every replica without a Prometheus server.
Values lag by up to Ray's ``metrics_report_interval_ms`` (10 s unless the cluster sets it).
"""

from __future__ import annotations

import asyncio
import math
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator

import ray
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray.serve import metrics

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
PREFIX = "ray_imgpipe_"
# Labels every Ray worker metric carries; they identify Ray's processes, not the traffic.
RAY_PROCESS_LABELS = frozenset({"Component", "SessionName", "Version", "WorkerId", "JobId",
                                "otel_scope_name", "otel_scope_schema_url", "otel_scope_version"})
SCRAPE_TIMEOUT_S = 5.0


class ReplicaMetrics:
    """One replica's instruments (create inside the replica: Serve reads its context)."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "imgpipe_http_requests", description="HTTP requests by endpoint, method and status",
            tag_keys=("endpoint", "method", "status"))
        self.latency = metrics.Histogram(
            "imgpipe_http_request_duration_seconds", description="Request latency inside the "
            "replica", boundaries=list(LATENCY_BUCKETS), tag_keys=("endpoint",))
        self.batch_size = metrics.Histogram(
            "imgpipe_batch_size", description="Images per model forward pass",
            boundaries=list(BATCH_BUCKETS))
        self.predicted = metrics.Counter(
            "imgpipe_predictions", description="Predicted label per image", tag_keys=("label",))
        # Cumulative log outcomes are counters (Ray keeps them); a gauge that is not set again
        # within two export intervals ages out of Ray's agent, so only the backlog is one.
        self.log_rows = metrics.Counter(
            "imgpipe_prediction_log_rows", description="Prediction log rows of this replica by "
            "outcome (logged, written, dropped, failed) and files written", tag_keys=("outcome",))
        self.log_buffered = metrics.Gauge(
            "imgpipe_prediction_log_buffered_rows", description="Rows waiting for the writer")
        self._log_seen: dict[str, int] = {}

    def request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "method": method, "status": str(status)})
        self.latency.observe(seconds, tags={"endpoint": endpoint})

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def predictions(self, labels: Iterable[str]) -> None:
        for label, n in Counter(labels).items():
            self.predicted.inc(n, tags={"label": label})

    def prediction_log(self, stats: dict[str, int]) -> None:
        """Publish a ``PredictionLogger.stats()`` snapshot (counters grow by what is new)."""
        for outcome, value in stats.items():
            if outcome == "buffered":
                self.log_buffered.set(value)
                continue
            new = value - self._log_seen.get(outcome, 0)
            if new > 0:
                self.log_rows.inc(new, tags={"outcome": outcome})
                self._log_seen[outcome] = value


def model_info(registry: CollectorRegistry, name: str, version: str) -> None:
    """``imgpipe_model_info{name,version} 1`` in ``registry``: static, so the app renders it
    itself (a Ray gauge that is never set again ages out of Ray's agent)."""
    Gauge("imgpipe_model_info", "The bundle being served", ["name", "version"],
          registry=registry).labels(name, version).set(1)


def merge_families(texts: Iterable[str], prefix: str = PREFIX) -> list[Metric]:
    """Prometheus text from several nodes' metrics agents → the ``prefix`` families, one per
    name, with Ray's per-process labels dropped (parsing: ``prometheus_client.parser``).

    Series that become identical once those labels are gone (one replica restarted in a new
    worker process) are summed for counters and histograms, and the last value kept for gauges.
    """
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple, float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if not family.name.startswith(prefix):
                continue
            merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            series = values.setdefault(family.name, {})
            for s in family.samples:
                labels = tuple(sorted((k, v) for k, v in s.labels.items()
                                      if k not in RAY_PROCESS_LABELS))
                key = (s.name, labels)
                summed = family.type != "gauge" and key in series
                series[key] = series.get(key, 0.0) + s.value if summed else s.value
    for name, family in merged.items():
        for (sample, labels), value in sorted(values[name].items(), key=_exposition_order):
            family.add_sample(sample, dict(labels), value)
    return list(merged.values())


def _exposition_order(item: tuple[tuple[str, tuple], float]) -> tuple:
    """One series after another, a histogram's buckets by ascending ``le`` (``+Inf`` last) and
    then its ``_count`` and ``_sum``, as the exposition format wants them."""
    (sample, labels), _ = item
    le = dict(labels).get("le")
    bound = math.inf if le in ("+Inf", "Inf") else float(le) if le is not None else 0.0
    part = 1 if sample.endswith("_count") else 2 if sample.endswith("_sum") else 0
    return tuple((k, v) for k, v in labels if k != "le"), part, bound, sample


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def render(families: list[Metric]) -> bytes:
    """Prometheus text exposition format (version 0.0.4) of parsed families."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


def _node_endpoints() -> list[str]:
    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]


def _scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as resp:  # noqa: S310
            return resp.read().decode()
    except OSError:  # a node going away must not fail /metrics for the others
        return ""


async def cluster_metrics() -> bytes:
    """The ``ray_imgpipe_*`` families of every alive node, merged (see ``merge_families``)."""
    urls = await asyncio.to_thread(_node_endpoints)
    texts = await asyncio.gather(*(asyncio.to_thread(_scrape, url) for url in urls))
    return render(merge_families(texts))
