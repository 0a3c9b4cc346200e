"""Acting on a monitor pass: prior adaptation, the retraining trigger, the active-learning queue.

- ``apply_prior``: the estimated prior becomes the app's ``deployment_prior`` through Serve's
  REST API (the same call as ``serve deploy``): only ``user_config`` changes, so Serve calls
  ``reconfigure`` on the running replicas, no restart. Needs an app deployed from a config
  (``serve deploy`` / ``serve run serving/config.yaml``); Serve refuses declarative updates to
  apps deployed with the Python API.
- ``evaluate_trigger`` / ``submit_retraining``: configurable criteria; when met an alert record
  is written and, if enabled, ``jobs/tune.py`` is submitted through ``JobSubmissionClient``,
  warm-started from the current bundle's weights. With token auth (Ray ≥ 2.60 default for
  ``ray start``) run with ``RAY_AUTH_MODE=token`` and the token in ``~/.ray/auth_token``,
  ``$RAY_AUTH_TOKEN_PATH`` or ``$RAY_AUTH_TOKEN``.
- ``save_active_learning_queue``: the most informative served images (lowest margin, or highest
  entropy), a quota per predicted class so rare classes are not crowded out, saved as PNGs with
  a ``manifest.csv`` (``path,label,...``) that ``jobs/prepare_data.py --manifest`` reads once
  the ``label`` column is filled in.
"""

from __future__ import annotations

import copy
import csv
import json
import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from imgpipe.bundle import BundleMeta
from imgpipe.config import TriggerCriteria
from imgpipe.errors import UserError
from imgpipe.monitoring.log_reader import LogWindow
from imgpipe.prediction_log_format import IMAGE, PREDICTED, TIME
from imgpipe.runtime import explicit_address

MODEL_DEPLOYMENT = "ImgpipeModel"  # serving.schemas.MODEL_DEPLOYMENT (not imported: one way)


class ApplyPriorError(UserError, RuntimeError):
    """The prior could not be pushed to the app (not found, deployed imperatively, ...)."""


def apply_prior(dashboard: str, app_name: str, prior: list[float],
                temperature: float | None = None) -> dict[str, Any]:
    """Set ``deployment_prior`` of ``app_name``'s model deployment to ``prior`` (and its
    ``temperature``, when given: the monitor's recalibrated one, so the served rule is the
    Bayes rule on calibrated probabilities); returns the new ``user_config``. Other
    applications and settings are sent back unchanged.

    Raises:
        ApplyPriorError: see the module docstring.
    """
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    client = ServeSubmissionClient(dashboard)
    details = client.get_serve_details()
    apps = details.get("applications") or {}
    if app_name not in apps:
        raise ApplyPriorError(f"no Serve application {app_name!r} at {dashboard} "
                              f"(have {sorted(apps)})")
    configs = []
    for name, app in apps.items():
        cfg = app.get("deployed_app_config")
        if cfg is None:
            raise ApplyPriorError(
                f"application {name!r} was deployed with the Python API (serve.run / "
                "jobs/serve.py): Serve only reconfigures config-deployed apps in place. Deploy "
                "it with `serve deploy serving/config.yaml` (or `serve run`) to use --apply-prior")
        configs.append(copy.deepcopy(cfg))
    target = next(c for c in configs if c["name"] == app_name)
    deps = target.setdefault("deployments", [])
    dep = next((d for d in deps if d.get("name") == MODEL_DEPLOYMENT), None)
    if dep is None:
        dep = {"name": MODEL_DEPLOYMENT}
        deps.append(dep)
    user_config = dict(dep.get("user_config") or {})
    user_config["deployment_prior"] = [round(float(p), 6) for p in prior]
    if temperature is not None:
        user_config["temperature"] = round(float(temperature), 6)
    dep["user_config"] = user_config
    payload: dict[str, Any] = {"applications": configs}
    for key in ("http_options", "proxy_location", "grpc_options"):
        if details.get(key) is not None:
            payload[key] = details[key]
    payload.get("http_options", {}).pop("root_url", None)
    try:
        client.deploy_applications(payload)
    except Exception as e:
        raise ApplyPriorError(f"Serve refused the update: {e}") from None
    return user_config


# ----- retraining trigger --------------------------------------------------------------------


def evaluate_trigger(result: dict[str, Any], criteria: TriggerCriteria) -> dict[str, Any]:
    """The alert record for one monitor pass: ``triggered`` and the ``reasons``."""
    reasons = []
    drift = result["drift"]
    tv = result["label_shift"]["em"]["tv_from_training"]
    bacc = result["performance"]["current_rule"]["balanced_accuracy"]
    enough = result["window"]["rows"] >= criteria.min_rows
    if criteria.drift_p_below is not None and drift.get("available") \
            and drift["p_value"] < criteria.drift_p_below:
        reasons.append(f"embedding drift p = {drift['p_value']:.3g} < {criteria.drift_p_below}")
    if criteria.prior_tv_above is not None and tv > criteria.prior_tv_above:
        reasons.append(f"estimated prior moved TV = {tv:.3f} > {criteria.prior_tv_above}")
    if criteria.balanced_accuracy_below is not None and bacc < criteria.balanced_accuracy_below:
        reasons.append(f"expected balanced accuracy {bacc:.3f} < "
                       f"{criteria.balanced_accuracy_below}")
    return {"triggered": bool(reasons) and enough, "reasons": reasons,
            "criteria": criteria.model_dump(), "rows": result["window"]["rows"],
            "time": datetime.now(timezone.utc).isoformat()}


def write_alert(alert: dict[str, Any], out: Path) -> Path:
    """Append the alert to ``alerts.jsonl`` and write ``alert.json`` (the latest)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "alerts.jsonl", "a") as f:
        f.write(json.dumps(alert) + "\n")
    (out / "alert.json").write_text(json.dumps(alert, indent=2) + "\n")
    return out / "alert.json"


def retraining_config(meta: BundleMeta, bundle_dir: Path, data: str, out: str) -> dict[str, Any]:
    """A ``jobs/tune.py --config`` file: the bundle's architecture, warm-started from its
    weights (``train.model.weights``), on ``data``."""
    arch = meta.architecture
    return {"data": data, "dataset": None, "out": out, "bundle_name": meta.name,
            "train": {"model": {"name": arch.model, "cifar_stem": arch.cifar_stem,
                                "weights": str(bundle_dir / meta.weights_file)}}}


def submit_retraining(address: str, meta: BundleMeta, bundle_dir: Path, data: str,
                      out: Path, extra_args: list[str] | None = None,
                      runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
    """Submit ``jobs/tune.py --config <out>/retrain.yaml`` to the Ray Jobs API at ``address``.

    ``runtime_env`` (e.g. ``{"working_dir": ".", "excludes": imgpipe.cluster.JOB_EXCLUDES}``)
    goes to the job as is; without it the job runs in the cluster's own checkout. The config's
    paths are absolute, so they must be visible to the cluster (shared or object storage).
    Returns ``{"submission_id", "entrypoint", "config"}``.
    """
    from ray.job_submission import JobSubmissionClient

    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "retrain.yaml"
    cfg = retraining_config(meta, Path(bundle_dir).resolve(), data, str(out.resolve() / "tune"))
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    entrypoint = shlex.join(["python", "jobs/tune.py", "--config", str(cfg_path.resolve()),
                             *(extra_args or [])])
    with explicit_address():
        client = JobSubmissionClient(address)
    sid = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                            metadata={"imgpipe": "retraining", "bundle": f"{meta.name}"})
    return {"submission_id": sid, "entrypoint": entrypoint, "config": str(cfg_path)}


# ----- active learning -----------------------------------------------------------------------


def select_informative(win: LogWindow, k: int, score: str = "margin") -> np.ndarray:
    """Row indices of the ``k`` most informative rows with a per-predicted-class quota.

    ``score``: ``margin`` (smallest top-1 − top-2 first) or ``entropy`` (largest first). Each
    predicted class gets up to ``ceil(k / classes present)`` rows first; leftover slots go to
    the best remaining rows overall.
    """
    if score not in ("margin", "entropy"):
        raise ValueError(f"score must be margin or entropy, got {score!r}")
    n = len(win)
    if n == 0 or k <= 0:
        return np.zeros(0, dtype=np.int64)
    key = win.margin if score == "margin" else -win.entropy
    order = np.argsort(key, kind="stable")
    classes = np.unique(win.predicted)
    quota = -(-k // len(classes))
    chosen: list[int] = []
    for c in classes:
        chosen += [int(i) for i in order[win.predicted[order] == c][:quota]]
    chosen = sorted(chosen, key=lambda i: key[i])[:k]
    if len(chosen) < k:
        taken = set(chosen)
        chosen += [int(i) for i in order if int(i) not in taken][: k - len(chosen)]
    return np.asarray(chosen, dtype=np.int64)


def save_active_learning_queue(win: LogWindow, out: Path, k: int, score: str = "margin"
                               ) -> dict[str, Any]:
    """Write ``out/images/*.png`` and ``out/manifest.csv`` for the selected rows.

    Rows logged without images (``prediction_log.images: false``) are listed with an empty
    path so a person can still find them by time; prepare_data needs the image files.
    """
    idx = select_informative(win, k, score)
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    table = win.table
    has_images = table is not None and IMAGE in table.column_names
    rows = []
    for rank, i in enumerate(idx):
        path = ""
        if has_images and (data := table[IMAGE][int(i)].as_py()) is not None:
            path = f"images/{rank:05d}.png"
            (out / path).write_bytes(data)
        rows.append({"path": path, "label": "", "predicted": table[PREDICTED][int(i)].as_py(),
                     "margin": round(float(win.margin[i]), 6),
                     "entropy": round(float(win.entropy[i]), 6),
                     "time": str(table[TIME][int(i)].as_py())})
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "predicted", "margin", "entropy",
                                          "time"])
        w.writeheader()
        w.writerows(rows)
    per_class: dict[str, int] = {}
    for r in rows:
        per_class[r["predicted"]] = per_class.get(r["predicted"], 0) + 1
    return {"rows": len(rows), "with_images": sum(bool(r["path"]) for r in rows),
            "per_predicted_class": per_class, "manifest": str(out / "manifest.csv")}
