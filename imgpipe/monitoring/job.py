"""The monitor job (``jobs/monitor.py``): config, one pass, and the periodic loop."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from imgpipe.bundle import load_bundle_meta, resolve_bundle_dir
from imgpipe.cluster import JOB_EXCLUDES
from imgpipe.config import StrictModel
from imgpipe.monitoring.actions import (
    TriggerCriteria,
    apply_prior,
    evaluate_trigger,
    save_active_learning_queue,
    submit_retraining,
    write_alert,
)
from imgpipe.monitoring.analyze import AnalysisSettings, analyze
from imgpipe.monitoring.log_reader import parse_window, read_window
from imgpipe.monitoring.reference import load_reference
from imgpipe.monitoring.report import console_summary, save_outputs


class MonitorConfig(StrictModel):
    """``jobs/monitor.py`` settings (flags or ``--config monitor.yaml``)."""

    bundle: str
    log: str = Field(description="prediction log folder: local path, s3://, gs://")
    window: str = Field("1h", description="duration (30m, 1h, 2d) or a row count (500)")
    out: str = "runs/monitor"
    every: str | None = Field(None, description="periodic mode: run a pass this often (10m)")
    passes: int | None = Field(None, ge=1, description="periodic mode: stop after N passes")
    alpha: float = Field(0.05, gt=0, lt=1)
    bootstrap: int = Field(200, ge=0)
    permutations: int = Field(500, ge=19)
    seed: int = 0
    low_confidence: float = Field(0.5, gt=0, lt=1)
    apply_prior: bool = False
    prior_method: Literal["em", "bbse"] = "em"
    serve_address: str = Field("http://127.0.0.1:8265", description="Ray dashboard (Serve API)")
    app_name: str = "imgpipe"
    trigger: TriggerCriteria = Field(default_factory=TriggerCriteria)
    retrain_address: str | None = Field(None, description="Ray Jobs API; set to submit tune.py")
    retrain_data: str | None = Field(None, description="prepared data for the retraining job")
    retrain_args: list[str] = Field(default_factory=list, description="extra jobs/tune.py flags")
    retrain_working_dir: str | None = Field(
        None, description="upload this checkout with the job (else the cluster's own is used)")
    active_learning: int = Field(0, ge=0, description="queue size (0: off)")
    active_learning_score: Literal["margin", "entropy"] = "margin"

    @field_validator("window")
    @classmethod
    def _window(cls, v: str) -> str:
        parse_window(v)
        return v

    @field_validator("every")
    @classmethod
    def _every(cls, v: str | None) -> str | None:
        if v is not None and parse_window(v).duration is None:
            raise ValueError(f"every must be a duration like 10m or 1h, got {v!r}")
        return v

    @model_validator(mode="after")
    def _retrain(self) -> MonitorConfig:
        if self.retrain_address and not self.retrain_data:
            raise ValueError("retrain_address needs retrain_data (the data to retrain on)")
        return self


def run_pass(cfg: MonitorConfig) -> dict[str, Any]:
    """Read the window, analyse, write outputs, act; returns the monitor.json payload.

    Raises:
        BundleError, ReferenceError, FileNotFoundError (no log), ValueError (empty window).
    """
    bundle_dir = resolve_bundle_dir(cfg.bundle)
    meta = load_bundle_meta(bundle_dir)
    ref = load_reference(bundle_dir)
    win = read_window(cfg.log, parse_window(cfg.window), meta.name, str(meta.version),
                      meta.architecture.num_classes)
    settings = AnalysisSettings(alpha=cfg.alpha, n_bootstrap=cfg.bootstrap,
                                n_permutations=cfg.permutations, seed=cfg.seed,
                                low_confidence=cfg.low_confidence)
    result = analyze(meta, ref, win, settings)
    out = Path(cfg.out)
    result["alert"] = evaluate_trigger(result, cfg.trigger)
    if result["alert"]["triggered"]:
        write_alert(result["alert"], out)
        if cfg.retrain_address:
            result["alert"]["retraining_job"] = submit_retraining(
                cfg.retrain_address, meta, bundle_dir, cfg.retrain_data, out / "retrain",
                cfg.retrain_args, _runtime_env(cfg))
    if cfg.apply_prior:
        result["apply_prior"] = _maybe_apply_prior(cfg, result)
    if cfg.active_learning:
        result["active_learning"] = save_active_learning_queue(
            win, out / "active_learning", cfg.active_learning, cfg.active_learning_score)
    save_outputs(result, out, cfg.log)
    return result


def _runtime_env(cfg: MonitorConfig) -> dict[str, Any] | None:
    if not cfg.retrain_working_dir:
        return None
    return {"working_dir": cfg.retrain_working_dir, "excludes": list(JOB_EXCLUDES)}


def _maybe_apply_prior(cfg: MonitorConfig, result: dict[str, Any]) -> dict[str, Any]:
    test_p = result["label_shift"]["test"]["p_value"]
    if test_p >= cfg.alpha / 2:
        return {"applied": False, "reason": f"prior test p = {test_p:.3g} ≥ α/2: no label "
                                             "shift detected, the app keeps its prior"}
    prior = [result["label_shift"][cfg.prior_method]["prior"][n]
             for n in result["bundle"]["class_names"]]
    # The prior was estimated on calibrated probabilities: serve it at the calibrated T.
    temps = result["label_shift"]["em_recalibration"]
    temperature = (temps["calibrated_temperature"] if not math.isclose(
        temps["calibrated_temperature"], temps["served_temperature"], rel_tol=1e-5) else None)
    user_config = apply_prior(cfg.serve_address, cfg.app_name, prior, temperature)
    return {"applied": True, "method": cfg.prior_method, "user_config": user_config}


def run_monitor(cfg: MonitorConfig, echo: Any = print) -> dict[str, Any]:
    """One pass, or passes every ``cfg.every`` until ``cfg.passes`` (or Ctrl-C)."""
    interval = parse_window(cfg.every).duration.total_seconds() if cfg.every else None
    n = 0
    while True:
        started = time.monotonic()
        result = run_pass(cfg)
        echo(console_summary(result))
        echo(f"→ {Path(cfg.out) / 'monitor.json'}, {Path(cfg.out) / 'monitor.html'}")
        n += 1
        if interval is None or (cfg.passes is not None and n >= cfg.passes):
            return result
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
