"""Drill: SIGKILL Tune trial drivers mid-trial. A trial killed once is retried from its latest
checkpoint and finishes; a trial killed past its retries fails alone: the finished trials are
kept, ranked and exported. (Driver kill + ``--resume``: tests/test_tuning.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import ray_actor_pids, registered_checkpoints

REPO = Path(__file__).resolve().parents[1]
# max_concurrent 1: one trial driver (Tune's function-trainable actor) is alive at a time.
TRIAL_ACTOR = "ImplicitFunc"


def _checkpoint_dirs(trial_dir: Path) -> list[Path]:
    # Train V2 also writes checkpoint_manager_snapshot.json beside the checkpoint folders.
    return [p for p in trial_dir.glob("checkpoint_*") if p.is_dir()]


def _killer(trials_root: Path, kills_per_trial: list[int], done: dict, timeout_s: float) -> None:
    """Kill the n-th trial's driver ``kills_per_trial[n]`` times, each after a new checkpoint."""
    seen: dict[str, int] = {}  # trial dir -> checkpoints when it was last killed
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        trials = sorted(trials_root.glob("train-*"), key=lambda p: p.stat().st_mtime)
        for n, trial in enumerate(trials[: len(kills_per_trial)]):
            kills = done.setdefault(trial.name, 0)
            if kills >= kills_per_trial[n] or registered_checkpoints(trial) <= seen.get(trial.name, 0):
                continue
            drivers = ray_actor_pids(TRIAL_ACTOR)
            if len(drivers) == 1:
                os.kill(drivers[0], signal.SIGKILL)
                done[trial.name] = kills + 1
                seen[trial.name] = registered_checkpoints(trial)
        if all(done.get(t.name, 0) >= k for t, k in zip(trials, kills_per_trial, strict=False)) \
                and len(trials) >= len(kills_per_trial):
            return
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.ray
def test_trial_failures_are_retried_and_never_lose_finished_trials(ray_session, tiny_digits,
                                                                    tmp_path):
    out = tmp_path / "run"
    done: dict[str, int] = {}
    # trial 1: killed once (retried, finishes); trial 2: killed twice (> 1 retry: it fails)
    killer = threading.Thread(target=_killer, daemon=True, args=(
        out / "ray_results" / "tune-trials", [1, 2], done, 600))
    killer.start()
    proc = subprocess.run(
        [sys.executable, "jobs/tune.py", "--data", tiny_digits, "--out", str(out),
         "--bundle-root", str(out / "bundles"), "--epochs", "3", "--scheduler", "fifo",
         "--num-samples", "2", "--max-concurrent", "1", "--trial-max-failures", "1",
         "--no-report", "--address", ray_session.get_runtime_context().gcs_address,
         "--config", str(_tiny_train_yaml(tmp_path))],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    killer.join(timeout=1)
    log = proc.stdout + proc.stderr
    assert sorted(done.values()) == [1, 2], (done, log[-3000:])
    assert proc.returncode == 0, log[-4000:]
    assert log.count("Tune retries it from its latest checkpoint") >= 2
    assert "FAILED after its retries (finished trials are kept)" in log
    res = json.loads((out / "results.json").read_text())
    assert len(res["failed_trials"]) == 1
    assert Path(res["bundle"]).is_dir() and res["best_trial_id"] not in res["failed_trials"]
    # the retried trial resumed from its checkpoint: its Train run holds every epoch once
    from imgpipe.checkpoint import load_meta

    first = sorted((out / "ray_results" / "tune-trials").glob("train-*"),
                   key=lambda p: p.stat().st_mtime)[0]
    latest = max(_checkpoint_dirs(first), key=lambda p: load_meta(p)["epoch"])
    meta = load_meta(latest)
    assert [h["epoch"] for h in meta["history"]] == [0, 1, 2]
    assert len(meta["restarts"]) == 1


def _tiny_train_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "tune.yaml"
    path.write_text("train: {batch_size: 32, min_steps_per_epoch: 2, model: {image_size: 16}}\n")
    return path
