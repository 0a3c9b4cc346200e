"""The cluster path end to end on one machine: a real `ray start --head`, `ray job submit
--working-dir .` of a tiny tuning run, then the bundle published the way cluster/README.md does.

Slow (minutes) and separate from the shared test Ray instance: it starts its own head on free
ports with its own temp dir and stops exactly the processes it started (never `ray stop`, which
kills every Ray process on the machine, the shared test instance and other people's included).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imgpipe.cluster import JOB_EXCLUDES

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 720
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# The smallest run that still exercises Tune + Train + export on 2 cores (shared notes: workers
# at 0.45 CPU leave Ray Data its whole free CPU on a 4-logical-CPU head).
TINY_TUNE = ["--num-samples", "2", "--max-concurrent", "1", "--workers-per-trial", "1",
             "--cpus-per-worker", "0.45", "--epochs", "1", "--seed", "0", "--no-report"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (REPO / "jobs" / "tune.py").exists(),
                       reason="jobs/tune.py does not exist yet; this test submits it"),
    pytest.mark.skipif(not shutil.which("sh"), reason="needs a POSIX shell for the job chain"),
]


@dataclass(frozen=True)
class Head:
    address: str  # dashboard / Jobs API, http://127.0.0.1:<port>
    env: dict[str, str]  # token settings shared by the head, the CLI and this test
    token: str


def _free_ports(n: int) -> list[int]:
    """n distinct ports free right now (held open together so none repeats)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _head_command(temp_dir: str, ports: list[int]) -> list[str]:
    gcs, dash, client, agent, agent_grpc, metrics, runtime_env = ports
    # Every port with a fixed default is set: a second Ray instance (the shared test session)
    # may already hold 52365, 10001 or 6379 on this machine.
    return [
        RAY, "start", "--head", "--block", f"--port={gcs}", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}", f"--temp-dir={temp_dir}",
        "--num-cpus=4", "--num-gpus=0", "--object-store-memory=500000000",
        "--disable-usage-stats",
    ]


def _api(head: Head, path: str, timeout: float = 10.0) -> dict | str:
    req = urllib.request.Request(f"{head.address}{path}",
                                 headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = resp.read().decode()
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        return body


def _wait_for_dashboard(head: Head, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(OSError, urllib.error.URLError):
            _api(head, "/api/version", timeout=5)
            return
        time.sleep(2)
    pytest.fail(f"dashboard not up after {HEAD_START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop the head's process group, then any process still naming our unique temp dir."""
    import psutil

    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the group `ray start` leads (new session)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # Workers may have left the group; only processes started for this head carry temp_dir.
    ours = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and temp_dir in " ".join(p.info["cmdline"] or []):
                ours.append(p)
    for p in ours:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(ours, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


@contextlib.contextmanager
def local_head() -> Iterator[Head]:
    """A private single-node Ray cluster with token auth, dashboard on 127.0.0.1."""
    # Short path: Ray's Unix sockets live under the temp dir and must stay under ~107 chars.
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")
    token = secrets.token_hex(32)
    token_file = Path(temp_dir) / "auth_token"
    token_file.write_text(token)
    # The job runs `python ...` through the raylet's PATH: put this interpreter's bin first so
    # it is the project's environment even when the venv is not activated.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    ports = _free_ports(7)
    head = Head(f"http://127.0.0.1:{ports[1]}", env, token)
    log = Path(temp_dir) / "ray-start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_head_command(temp_dir, ports), env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_dashboard(head, proc, log)
        yield head
    finally:
        _stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _job_chain(work: Path) -> str:
    """The README's three steps, sized for one CPU-only machine (no scale_up: no autoscaler).

    Outputs go to durable absolute locations: relative ones would land in Ray's temporary copy
    of the working dir (the jobs refuse them, see the test below).
    """
    data, out, bundles = work / "data" / "digits-lt", str(work / "runs" / "e2e"), str(work / "b")
    tune = ["python", "jobs/tune.py", "--data", str(data), "--dataset", "digits-lt",
            *TINY_TUNE, "--storage-path", str(work / "ray-results"), "--out", out,
            "--bundle-root", bundles]
    publish = ["python", "cluster/publish.py", "--dest", str(work / "published"),
               "--runs", out, "--bundles", bundles]
    prepare = ["python", "jobs/prepare_data.py", "--dataset", "digits-lt", "--out", str(data)]
    return " && ".join(shlex.join(c) for c in (prepare, tune, publish))


def submit(head: Head, chain: str) -> str:
    """`ray job submit --working-dir .` from the repository root, as in cluster/README.md."""
    submission_id = f"imgpipe-e2e-{uuid.uuid4().hex[:8]}"
    runtime_env = json.dumps({"excludes": list(JOB_EXCLUDES)})
    cmd = [RAY, "job", "submit", "--address", head.address, "--working-dir", ".",
           "--runtime-env-json", runtime_env, "--submission-id", submission_id, "--no-wait",
           "--", "sh", "-c", chain]
    done = subprocess.run(cmd, cwd=REPO, env=head.env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"ray job submit failed:\n{done.stdout}\n{done.stderr}"
    return submission_id


def wait_for_job(head: Head, submission_id: str, timeout_s: float = JOB_TIMEOUT_S) -> str:
    """Poll the Jobs API until the job ends; fail with its logs on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = _api(head, f"/api/jobs/{submission_id}")["status"]
        if status in TERMINAL:
            return status
        time.sleep(5)
    with contextlib.suppress(OSError, urllib.error.URLError):
        urllib.request.urlopen(urllib.request.Request(
            f"{head.address}/api/jobs/{submission_id}/stop", method="POST",
            headers={"Authorization": f"Bearer {head.token}"}), timeout=10)
    pytest.fail(f"job {submission_id} not finished after {timeout_s} s:\n{_logs(head, submission_id)}")


def _logs(head: Head, submission_id: str) -> str:
    with contextlib.suppress(OSError, urllib.error.URLError, KeyError, TypeError):
        return _api(head, f"/api/jobs/{submission_id}/logs")["logs"][-6000:]
    return "(no logs)"


def test_tune_job_submitted_to_a_local_head_publishes_a_loadable_bundle(tmp_path):
    from ray._private.runtime_env.packaging import unzip_package

    from imgpipe.bundle import load_bundle

    with local_head() as head:
        # Relative outputs would vanish with the session: refused at once, with the fix.
        lost = submit(head, shlex.join(["python", "jobs/tune.py", *TINY_TUNE]))
        assert wait_for_job(head, lost) == "FAILED"
        assert "would be lost" in _logs(head, lost) and "s3://" in _logs(head, lost)
        job = submit(head, _job_chain(tmp_path))
        status = wait_for_job(head, job)
        assert status == "SUCCEEDED", _logs(head, job)
        # the tune job's last line names the absolute location it wrote
        assert f"results in {tmp_path / 'runs' / 'e2e' / 'results.json'}" in _logs(head, job)
    assert (tmp_path / "runs" / "e2e" / "results.json").is_file()  # in the user's folder

    stamps = list((tmp_path / "published").iterdir())
    assert len(stamps) == 1, stamps
    manifest = json.loads((stamps[0] / "published.json").read_text())
    results = json.loads((stamps[0] / "runs" / "e2e" / "results.json").read_text())
    assert "macro_f1" in results["val"]
    assert manifest["bundles"], "the tuning job exported no bundle"
    for key, uri in manifest["bundles"].items():
        # Unpack the way Ray unpacks a Serve runtime_env working_dir, then load as serving does.
        zip_copy = tmp_path / "dl.zip"
        shutil.copy(uri, zip_copy)
        workdir = tmp_path / f"wd-{key.replace('/', '-')}"
        unzip_package(str(zip_copy), str(workdir), remove_top_level_directory=True,
                      unlink_zip=True)
        meta, weights = load_bundle(workdir / "bundles" / key)  # verifies the sha256
        assert weights and meta
