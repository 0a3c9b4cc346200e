"""Acting on the monitor over real services: the estimated prior reaches a running,
config-deployed Serve app through Serve's REST API (and an imperatively deployed one is refused
with a clear error); the retraining trigger submits a real job to a real `ray start --head`."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest
from helpers import make_test_bundle

from imgpipe.bundle import load_bundle_meta
from imgpipe.config import TuneJobConfig, resolve_config
from imgpipe.monitoring.actions import ApplyPriorError, apply_prior, submit_retraining

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
def test_apply_prior_reconfigures_the_running_app(ray_session, tmp_path):
    from ray import serve
    from ray._private.worker import get_dashboard_url
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from serving.app import build_app

    bundle = make_test_bundle(tmp_path, name="prior", num_classes=3, mode="L")
    dashboard = f"http://{get_dashboard_url()}"
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"bundle": str(bundle), "num_cpus": 0.25}), name="imperative",
                  route_prefix="/imperative")
        with pytest.raises(ApplyPriorError, match="Python API"):
            apply_prior(dashboard, "imperative", [0.2, 0.3, 0.5])
        serve.delete("imperative")
        ServeSubmissionClient(dashboard).deploy_applications({
            "http_options": {"host": "127.0.0.1", "port": port}, "applications": [{
                "name": "prior-app", "route_prefix": "/", "import_path": "serving.app:build_app",
                "args": {"bundle": str(bundle), "num_cpus": 0.25},
                "deployments": [{"name": "ImgpipeModel", "user_config": {"max_batch_size": 4}}],
            }]})
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            app = serve.status().applications.get("prior-app")
            if app is not None and app.status == "RUNNING":
                break
            time.sleep(1)
        with pytest.raises(ApplyPriorError, match="no Serve application"):
            apply_prior(dashboard, "nope", [0.2, 0.3, 0.5])
        user_config = apply_prior(dashboard, "prior-app", [0.2, 0.3, 0.5])
        assert user_config == {"max_batch_size": 4, "deployment_prior": [0.2, 0.3, 0.5]}
        while time.monotonic() < deadline:
            cal = httpx.get(f"{url}/v1/models", timeout=30).json()["models"][0]["calibration"]
            if cal["deployment_prior"] == [0.2, 0.3, 0.5]:
                break
            time.sleep(1)
        assert cal["deployment_prior"] == [0.2, 0.3, 0.5]
    finally:
        serve.shutdown()


def test_trigger_submits_a_retraining_job_to_a_real_head(tmp_path, monkeypatch):
    from test_job_submit import local_head, wait_for_job

    from imgpipe.cluster import JOB_EXCLUDES

    bundle = make_test_bundle(tmp_path / "bundles", name="retrain", num_classes=3, mode="L")
    meta = load_bundle_meta(bundle)
    with local_head() as head:
        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
            monkeypatch.setenv(key, head.env[key])
        monkeypatch.chdir(REPO)
        # --help: the real entrypoint and config path run on the head without a long search.
        info = submit_retraining(head.address, meta, bundle, str(tmp_path / "data"),
                                 tmp_path / "out", ["--help"],
                                 {"working_dir": ".", "excludes": list(JOB_EXCLUDES)})
        assert wait_for_job(head, info["submission_id"], 300) == "SUCCEEDED"
    assert info["entrypoint"].startswith("python jobs/tune.py --config ")
    cfg = resolve_config(TuneJobConfig, info["config"])
    init = Path(cfg.train["model"]["init_checkpoint"])
    assert init == (bundle / "model.safetensors").resolve() and init.is_file()
    assert cfg.data == str(tmp_path / "data") and cfg.bundle_name == "retrain"
