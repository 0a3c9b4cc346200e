"""Drill: SIGKILL one Ray Train worker mid-run, or the Tune trial actor that hosts a one-worker
run; the run restores itself from its latest checkpoint and finishes.

Also: ``--resume DIR`` reaches the workers through the run's storage, never the driver's path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import ray_actor_pids, registered_checkpoints

REPO = Path(__file__).resolve().parents[1]


def _kill_when(ready: Callable[[], bool], actor: str, min_live: int, killed: dict,
               timeout_s: float = 900) -> None:
    """Once ``ready()`` and at least ``min_live`` ``actor`` processes are up, SIGKILL the
    newest; its pid goes into ``killed``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            pids = ray_actor_pids(actor)
            if len(pids) >= min_live:
                os.kill(pids[-1], signal.SIGKILL)
                killed["pid"] = pids[-1]
                return
        time.sleep(0.05)


def _kill_a_worker_after(ray_results: Path, checkpoints: int, killed: dict) -> None:
    """Once Train has registered ``checkpoints`` checkpoints, SIGKILL one live Train worker."""
    _kill_when(lambda: any(registered_checkpoints(run) >= checkpoints
                           for run in ray_results.glob("*")), "RayTrainWorker", 2, killed)


@pytest.mark.slow
@pytest.mark.ray
def test_sigkilled_worker_is_restored_and_the_run_finishes(ray_session, tiny_digits, tmp_path):
    out = tmp_path / "run"
    killed: dict = {}
    killer = threading.Thread(target=_kill_a_worker_after,
                              args=(out / "ray_results", 1, killed), daemon=True)
    killer.start()
    proc = subprocess.run(
        [sys.executable, "jobs/train.py", "--data", tiny_digits, "--epochs", "5",
         "--num-workers", "2", "--image-size", "16", "--batch-size", "32", "--out", str(out),
         "--min-steps-per-epoch", "2",
         "--address", ray_session.get_runtime_context().gcs_address],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    killer.join(timeout=1)
    assert killed, f"no worker was killed:\n{proc.stdout[-3000:]}"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [h["epoch"] for h in res["history"]] == [0, 1, 2, 3, 4]
    assert len(res["restarts"]) == 1 and res["restarts"][0]["resumed_at_epoch"] >= 1
    assert "worker failure 1 of 3 allowed" in proc.stdout
    assert "restoring the latest checkpoint" in proc.stdout
    assert "recovered from 1 worker failure(s)" in proc.stdout
    # the last line names where the results are, absolutely
    assert proc.stdout.strip().splitlines()[-1].endswith(f"best checkpoint in {out / 'best'}")


ONE_WORKER_EPOCHS = 5


def _tune_registered(ray_results: Path) -> int:
    """Reports Tune has taken for the one trial of a Tune-hosted run (each carries a
    checkpoint; Tune appends it to ``result.json`` once it has processed it)."""
    return max((sum(1 for line in f.read_text().splitlines() if line)
                for f in ray_results.glob("train-*/run/result.json")), default=0)


def _kill_the_trial_actor_after(ray_results: Path, killed: dict) -> None:
    """SIGKILL the trial actor once a checkpoint is registered and epochs remain (an actor
    that reported its last epoch has finished the run)."""
    _kill_when(lambda: 1 <= _tune_registered(ray_results) < ONE_WORKER_EPOCHS - 1,
               "ImplicitFunc", 1, killed)


@pytest.mark.slow
@pytest.mark.ray
def test_sigkilled_trial_actor_of_a_one_worker_run_is_restored(ray_session, tiny_digits,
                                                               tmp_path):
    """A one-worker run trains in a Tune trial actor (no Ray Train worker): killing that
    process mid-run restarts it from the latest checkpoint, and the console says so."""
    out = tmp_path / "run"
    killed: dict = {}
    killer = threading.Thread(target=_kill_the_trial_actor_after,
                              args=(out / "ray_results", killed), daemon=True)
    killer.start()
    proc = subprocess.run(
        [sys.executable, "jobs/train.py", "--data", tiny_digits,
         "--epochs", str(ONE_WORKER_EPOCHS), "--num-workers", "1", "--image-size", "16",
         "--batch-size", "32", "--out", str(out), "--min-steps-per-epoch", "10",
         "--address", ray_session.get_runtime_context().gcs_address],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    killer.join(timeout=1)
    assert killed, f"no trial actor was killed:\n{proc.stdout[-3000:]}"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [h["epoch"] for h in res["history"]] == list(range(ONE_WORKER_EPOCHS))
    assert len(res["restarts"]) == 1 and res["restarts"][0]["resumed_at_epoch"] >= 1
    assert "worker failure 1 of 3 allowed (rank 0: " in proc.stdout
    assert "restoring the latest checkpoint" in proc.stdout
    assert "recovered from 1 worker failure(s)" in proc.stdout
    assert not list((out / "ray_results").glob("train-*/checkpoint_manager_snapshot.json"))


@pytest.mark.slow
@pytest.mark.ray
def test_ctrl_c_stops_a_one_worker_run_without_publishing_it(ray_session, tiny_digits, tmp_path):
    """Tune ends a trial it stops on SIGINT as if it had finished; the job must not score and
    publish it: it exits 130 and names the checkpoint --resume continues from."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "jobs/train.py", "--data", tiny_digits, "--epochs", "30",
         "--num-workers", "1", "--image-size", "16", "--batch-size", "32", "--out", str(out),
         "--min-steps-per-epoch", "10", "--address", ray_session.get_runtime_context().gcs_address],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while _tune_registered(out / "ray_results") < 1 and proc.poll() is None:
        assert time.monotonic() < deadline, "no epoch was reported"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "training interrupted after epoch" in stderr
    assert "of 30; continue it with --resume" in stderr
    assert "Tuner.restore" not in stdout + stderr  # Tune's Python advice, not for a CLI user
    resume = stderr.rsplit("--resume ", 1)[1].split()[0]
    assert (Path(resume) / "meta.json").is_file()
    assert not (out / "results.json").exists() and not (out / "best").exists()


def test_resume_dir_is_staged_into_run_storage(tmp_path):
    """A driver-only checkpoint folder is copied into the run storage; workers get a Checkpoint."""
    import torch

    from imgpipe.checkpoint import load_meta, save_checkpoint
    from imgpipe.models import create_model
    from imgpipe.training.recovery import stage_resume_checkpoint

    driver_only = tmp_path / "driver" / "ckpt"
    save_checkpoint(driver_only, create_model("cnn", 3, in_channels=1), {"epoch": 2},
                    torch.optim.SGD(create_model("cnn", 3, in_channels=1).parameters(), lr=0.1))
    storage = tmp_path / "shared-storage"
    ckpt = stage_resume_checkpoint(str(driver_only), f"file://{storage}", "train-x")
    assert ckpt.path.startswith(str(storage)) and str(driver_only) not in ckpt.path
    import shutil

    shutil.rmtree(driver_only)  # the workers never need it
    with ckpt.as_directory() as d:
        assert load_meta(d) == {"epoch": 2}


def test_resume_of_a_folder_that_is_not_a_checkpoint_is_a_user_error(tmp_path):
    from imgpipe.errors import UserError
    from imgpipe.training.recovery import stage_resume_checkpoint

    with pytest.raises(UserError, match="not a checkpoint"):
        stage_resume_checkpoint(str(tmp_path), str(tmp_path / "storage"), "train-x")
