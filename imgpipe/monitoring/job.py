"""The monitor job (``jobs/monitor.py``): config, one pass, and the periodic loop."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from imgpipe.bundle import load_bundle_meta, resolve_bundle_dir
from imgpipe.cluster import JOB_EXCLUDES
from imgpipe.config import MonitorConfig
from imgpipe.config.specs import parse_window
from imgpipe.monitoring.actions import (
    apply_prior,
    evaluate_trigger,
    save_active_learning_queue,
    submit_retraining,
    write_alert,
)
from imgpipe.monitoring.analyze import AnalysisSettings, analyze
from imgpipe.monitoring.log_reader import read_window
from imgpipe.monitoring.reference import load_reference
from imgpipe.monitoring.report import console_summary, save_outputs


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
