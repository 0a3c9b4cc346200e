"""Drill: a Ray head killed with SIGKILL leaves its address in Ray's temp folder. Jobs that ask
for it fail within a bounded time naming it and the fix; jobs that ask for no address start a
fresh local instance instead of retrying the dead one forever.

Starts its own head in its own RAY_TMPDIR and kills only the processes it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
pytestmark = pytest.mark.slow


def _free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _kill_everything_started_in(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGKILL the head's process group and any process naming our private temp dir."""
    import psutil

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    ours = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and temp_dir in " ".join(p.info["cmdline"] or []):
                ours.append(p)
    for p in ours:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(ours, timeout=10)


@pytest.fixture(scope="module")
def dead_head():
    """(env with RAY_TMPDIR holding a stale ray_current_cluster, the dead GCS address)."""
    tmp = tempfile.mkdtemp(prefix="rdead-", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    gcs, client, agent, agent_grpc, metrics, runtime_env = _free_ports(6)
    cmd = [RAY, "start", "--head", "--block", f"--port={gcs}", "--include-dashboard=false",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={runtime_env}", "--num-cpus=1",
           "--object-store-memory=100000000", "--disable-usage-stats"]
    address_file = Path(tmp) / "ray" / "ray_current_cluster"
    log = Path(tmp) / "ray-start.log"
    for _attempt in range(3):  # a raylet may miss Ray's fixed 30 s start window on a busy host
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not address_file.is_file() and proc.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(1)
            if address_file.is_file():
                address = address_file.read_text().strip()
                time.sleep(2)  # let the head finish starting: we kill a live head
                break
        finally:
            _kill_everything_started_in(proc, tmp)  # kill -9: no clean-up runs
    else:
        pytest.fail(f"ray start --head never came up:\n{log.read_text()[-3000:]}")
    assert address_file.read_text().strip() == address  # the dead address stays recorded
    yield env, address
    shutil.rmtree(tmp, ignore_errors=True)


def _run(env: dict, argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    # The timeout is the bound under test: a job retrying the dead GCS forever would hit it.
    # It is generous because importing torch + Ray alone took minutes on an overloaded host;
    # the probe itself gives up after runtime.CONNECT_TIMEOUT_S.
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_train_with_address_auto_names_the_dead_head(dead_head, tiny_digits, tmp_path):
    env, address = dead_head
    proc = _run(env, ["jobs/train.py", "--address", "auto", "--data", tiny_digits,
                      "--out", str(tmp_path / "o"), "--epochs", "1"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert address in proc.stderr and "recorded in Ray's temp folder" in proc.stderr
    assert "ray start --head" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_with_a_dead_ray_address_names_it(dead_head, tmp_path):
    from helpers import make_test_bundle

    env, address = dead_head
    bundle = make_test_bundle(tmp_path, name="dead-drill")
    proc = _run({**env, "RAY_ADDRESS": address},
                ["jobs/serve.py", "--bundle", str(bundle), "--port", str(_free_ports(1)[0])])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"no Ray cluster answers at {address}" in proc.stderr
    assert "without --address" in proc.stderr


def test_no_address_starts_a_fresh_local_instance(dead_head):
    env, address = dead_head
    code = ("import ray; from imgpipe.runtime import init_ray; init_ray(num_cpus=1); "
            "print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()")
    proc = _run(env, ["-c", code])
    assert proc.returncode == 0, proc.stderr[-3000:]
    started = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("GCS")]
    assert started and started[0] != address
