"""The prediction log: over real HTTP on the shared Ray instance, and the writer on its own.

One row per served image (single and multi-image requests, batched), values equal to the
offline ``Predictor``, flushed on replica shutdown; a full buffer drops and counts instead of
waiting; the monitor's status file shows up as gauges on ``/metrics``.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import encode_image, make_test_bundle
from prometheus_client.parser import text_string_to_metric_families
from scipy.special import softmax

from imgpipe.inference import Predictor
from imgpipe.prediction_log_format import LOG_SCHEMA, MONITOR_DIR, MONITOR_STATUS_FILE, PART_NAME
from serving.prediction_log import PredictionLogger, PredictionLogSettings

APP = "imgpipe-predlog-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_log(location: Path):
    files = sorted(p for p in location.iterdir() if p.is_file() and PART_NAME.match(p.name))
    return files, [pq.read_table(f) for f in files]


# ----- the writer on its own (no Ray) ------------------------------------------------------------


def test_full_buffer_drops_and_counts_and_close_flushes(tmp_path):
    bundle = make_test_bundle(tmp_path / "b", num_classes=3, mode="L")
    pred = Predictor.load(bundle)
    # A writer that never wakes on its own: everything stays buffered until close().
    logger = PredictionLogger(PredictionLogSettings(
        location=str(tmp_path / "log"), max_buffer_rows=10, flush_rows=10**6,
        flush_interval_s=3600), replica="t")
    for _ in range(5):
        logits = torch.randn(4, 3)
        logger.record(logits, torch.randn(4, 128), pred.meta)  # returns at once, never raises
    stats = logger.stats()
    # 4 + 4 fit, the third batch would pass 10 rows: it and the rest are dropped whole.
    assert (stats["logged"], stats["dropped"], stats["buffered"]) == (8, 12, 8)
    logger.close()
    files, tables = _read_log(tmp_path / "log")
    assert len(files) == 1 and tables[0].num_rows == 8 and logger.stats()["written"] == 8
    assert tables[0].schema.equals(LOG_SCHEMA, check_metadata=False)


def test_sampling_rate_is_seeded_and_roughly_right(tmp_path):
    bundle = make_test_bundle(tmp_path / "b", num_classes=3, mode="L")
    meta = Predictor.load(bundle).meta
    counts = []
    for _ in range(2):
        logger = PredictionLogger(PredictionLogSettings(
            location=str(tmp_path / "log"), sample_rate=0.25, seed=3, embedding=False,
            flush_interval_s=3600), replica="same")
        for _ in range(40):
            logger.record(torch.randn(10, 3), None, meta)
        counts.append(logger.stats()["logged"])
        logger.close()
    assert counts[0] == counts[1]  # same seed and replica → same sample
    assert 60 <= counts[0] <= 140  # Binomial(400, 0.25): mean 100, sd 8.7


def test_unwritable_location_counts_failures_never_raises(tmp_path):
    bundle = make_test_bundle(tmp_path / "b", num_classes=3, mode="L")
    meta = Predictor.load(bundle).meta
    logger = PredictionLogger(PredictionLogSettings(location=str(tmp_path / "log"),
                                                    flush_interval_s=3600), replica="x")
    (tmp_path / "log").rmdir()
    (tmp_path / "log").write_text("a file where the folder was")
    logger.record(torch.randn(3, 3), torch.randn(3, 128), meta)
    logger.close()
    assert logger.stats()["failed"] == 3 and logger.stats()["written"] == 0


# ----- over HTTP ---------------------------------------------------------------------------------


def _logged_rows(metrics_text: str) -> float:
    """Rows this app's replicas logged, summed over replicas, from /metrics."""
    return sum(s.value for family in text_string_to_metric_families(metrics_text)
               for s in family.samples
               if s.name == "ray_imgpipe_prediction_log_rows_total"
               and s.labels.get("outcome") == "logged" and s.labels.get("application") == APP)


@pytest.mark.ray
@pytest.mark.slow
def test_one_row_per_served_image_and_gauges(ray_session, tmp_path):
    from ray import serve

    from serving.app import build_app

    bundle = make_test_bundle(tmp_path / "bundles", name="logged", mode="RGB",
                              train_class_counts=[100, 30, 5], temperature=1.5,
                              deployment_prior="balanced")
    location = tmp_path / "predictions"
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"bundle": str(bundle), "max_batch_size": 8, "batch_wait_timeout_s": 0.01,
            "num_cpus": 0.25, "max_ongoing_requests": 32,
            "prediction_log": {"location": str(location), "flush_interval_s": 0.5}}
    serve.run(build_app(args), name=APP, route_prefix="/")
    images = [encode_image(i) for i in range(24)]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            def one(i: int) -> httpx.Response:
                return client.post("/v1/predict", content=images[i],
                                   headers={"Content-Type": "image/png"})

            with ThreadPoolExecutor(8) as pool:  # concurrent → batched forward passes
                assert all(r.status_code == 200 for r in pool.map(one, range(16)))
            many = [{"b64": base64.b64encode(im).decode()} for im in images[16:]]
            assert client.post("/v1/predict", json={"instances": many}).status_code == 200
            # The monitor's status file becomes gauges on /metrics.
            (location / MONITOR_DIR).mkdir()
            (location / MONITOR_DIR / MONITOR_STATUS_FILE).write_text(json.dumps({
                "estimated_prior": {"em": {"class_0": 0.7, "class_1": 0.2, "class_2": 0.1}},
                "drift_statistic": 0.01, "drift_p_value": 0.42, "alert": 0}))
            # The replicas' log counters are Ray metrics: exported every few seconds, one
            # series per replica (the default is two replicas).
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                text = client.get("/metrics").text
                if _logged_rows(text) == 24:
                    break
                time.sleep(0.5)
            assert 'imgpipe_monitor_estimated_prior{label="class_0",method="em"} 0.7' in text
            assert "imgpipe_monitor_drift_p_value 0.42" in text
            assert _logged_rows(text) == 24, text
    finally:
        serve.delete(APP)  # graceful replica shutdown flushes the last rows
        serve.shutdown()
    files, tables = _read_log(location)
    rows = sum(t.num_rows for t in tables)
    assert rows == len(images)
    assert not [p for p in location.iterdir() if p.name.startswith("_tmp-")]
    table = pa.concat_tables(tables)
    pred = Predictor.load(bundle)
    logits = np.concatenate([pred.predict_logits(pred.preprocess([im])).numpy() for im in images])

    def rows(a: np.ndarray) -> np.ndarray:  # order-free comparison of per-image rows
        a = np.round(np.asarray(a, dtype=np.float64), 4)
        return a[np.lexsort(a.T[::-1])]

    calibrated = softmax(logits / 1.5, axis=1)  # temperature only: the model's own prior
    np.testing.assert_allclose(rows(table["probabilities"].to_pylist()), rows(calibrated),
                               atol=2e-4)
    served = pred.predict_images(images)  # temperature + balanced prior, as served
    np.testing.assert_allclose(np.sort(table["served_probability"].to_numpy()),
                               np.sort(served.max(1)), atol=1e-5)
    emb = table["embedding"].to_pylist()
    assert all(len(e) == 128 for e in emb)
    assert set(table["model_version"].to_pylist()) == {"1"}
    assert set(table["deployment_prior"].to_pylist()) == {'"balanced"'}
