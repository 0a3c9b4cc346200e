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
from helpers import ray_actor_pids

REPO = Path(__file__).resolve().parents[1]
# max_concurrent 1: one trial actor (Tune's function trainable, where a one-worker trial
# trains) is alive at a time.
TRIAL_ACTOR = "ImplicitFunc"
EPOCHS = 5  # epochs of ~10 steps: the killer has time to act between checkpoints


def _checkpoint_dirs(trial_dir: Path) -> list[Path]:
    return [p for p in trial_dir.glob("checkpoint_*") if p.is_dir()]


def _trials_in_order(experiment: Path) -> list[Path]:
    """Trial folders in the order Tune created them (``run_trial_<id>_<n>_<params>``)."""
    trials = [p for p in experiment.glob("run_trial_*") if p.is_dir()]
    return sorted(trials, key=lambda p: int(p.name.split("_")[3]))


def registered_checkpoints(trial_dir: Path) -> int:
    """Checkpoints Tune has registered for a trial: every report carries one, and Tune appends
    the report to ``result.json`` when it processes it. A ``checkpoint_*`` folder exists as soon
    as the trial has persisted it, before Tune has taken the report; a kill in between restarts
    from the previous one instead."""
    try:
        return sum(1 for line in (trial_dir / "result.json").read_text().splitlines() if line)
    except OSError:
        return 0


def _killer(trials_root: Path, kills_per_trial: list[int], done: dict, timeout_s: float) -> None:
    """Kill the n-th trial's actor ``kills_per_trial[n]`` times, each after a new checkpoint and
    before its last epoch (a trial that reported its last epoch has finished: a kill then hits
    the idle actor Tune keeps for the next trial, not the trial)."""
    seen: dict[str, int] = {}  # trial dir -> checkpoints when it was last killed
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        trials = _trials_in_order(trials_root)
        for n, trial in enumerate(trials[: len(kills_per_trial)]):
            kills = done.setdefault(trial.name, 0)
            registered = registered_checkpoints(trial)
            if (kills >= kills_per_trial[n] or registered <= seen.get(trial.name, 0)
                    or registered >= EPOCHS):
                continue
            drivers = ray_actor_pids(TRIAL_ACTOR)
            if len(drivers) == 1:
                os.kill(drivers[0], signal.SIGKILL)
                done[trial.name] = kills + 1
                seen[trial.name] = registered
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
        out / "ray_results" / "tune", [1, 2], done, 600))
    killer.start()
    proc = subprocess.run(
        [sys.executable, "jobs/tune.py", "--data", tiny_digits, "--out", str(out),
         "--bundle-root", str(out / "bundles"), "--epochs", str(EPOCHS), "--scheduler", "fifo",
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
    # the retried trial resumed from its checkpoint: its checkpoints hold every epoch once
    from imgpipe.checkpoint import load_meta

    first = _trials_in_order(out / "ray_results" / "tune")[0]
    latest = max(_checkpoint_dirs(first), key=lambda p: load_meta(p)["epoch"])
    meta = load_meta(latest)
    assert [h["epoch"] for h in meta["history"]] == list(range(EPOCHS))
    assert len(meta["restarts"]) == 1


def _tiny_train_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "tune.yaml"
    path.write_text("train: {batch_size: 32, min_steps_per_epoch: 10, model: {image_size: 16}}\n")
    return path
