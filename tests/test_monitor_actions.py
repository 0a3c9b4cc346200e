"""Acting on the monitor over real services: the estimated prior reaches a running,
config-deployed Serve app through Serve's REST API (and an imperatively deployed one is refused
with a clear error); the retraining trigger submits a real job to a real `ray start --head`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import make_test_bundle

from imgpipe.config import TuneJobConfig, resolve_config
from imgpipe.monitoring.actions import ApplyPriorError, apply_prior

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


def test_trigger_submits_a_retraining_job_to_a_real_head(tmp_path):
    from test_job_submit import local_head, wait_for_job

    bundle = make_test_bundle(tmp_path / "bundles", name="retrain", num_classes=3, mode="L")
    with local_head() as head:
        # A fresh process with the head's token settings, as a user runs the monitor (Ray's
        # token loader caches the first token a process sees: the shared test instance's).
        script = (
            "import json, sys; from pathlib import Path\n"
            "from imgpipe.bundle import load_bundle_meta\n"
            "from imgpipe.cluster import JOB_EXCLUDES\n"
            "from imgpipe.monitoring.actions import submit_retraining\n"
            "b = Path(sys.argv[1]); a = sys.argv[2:]\n"
            "info = submit_retraining(a[0], load_bundle_meta(b), b, a[1], Path(a[2]), ['--help'],\n"
            "    {'working_dir': '.', 'excludes': list(JOB_EXCLUDES)})\n"
            "print(json.dumps(info))\n")
        done = subprocess.run(
            [sys.executable, "-c", script, str(bundle), head.address, str(tmp_path / "data"),
             str(tmp_path / "out")], cwd=REPO, env={**head.env, "PYTHONPATH": str(REPO)},
            capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        info = json.loads(done.stdout.strip().splitlines()[-1])
        # --help: the real entrypoint and config path run on the head without a long search.
        assert wait_for_job(head, info["submission_id"], 300) == "SUCCEEDED"
    assert info["entrypoint"].startswith("python jobs/tune.py --config ")
    cfg = resolve_config(TuneJobConfig, info["config"])
    init = Path(cfg.train["model"]["weights"])
    assert init == (bundle / "model.safetensors").resolve() and init.is_file()
    assert cfg.data == str(tmp_path / "data") and cfg.bundle_name == "retrain"
