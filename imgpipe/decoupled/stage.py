"""The classifier-only stage: bundle → frozen features → re-balanced head → new bundle version.

    result = rebalance_classifier(RebalanceConfig(bundle="bundles/digits-lt", data="data/digits-lt",
                                                  method="crt", smote=5))

Train and val features are extracted once with Ray Data batch inference
(``imgpipe.transfer.features``); the head is fitted on the driver (a linear layer on a few
thousand feature rows takes seconds). Only ``fc.weight`` / ``fc.bias`` change: every backbone
tensor of the new bundle is the source bundle's, bit for bit. The new version is verified like
any export — loaded fresh, re-scored on val through the serving ``Predictor`` from the images,
and compared with the head's own val metrics — and records how it was made in ``bundle.json``
(``hyperparameters.rebalance``), which the model card shows.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imgpipe.bundle import (
    BundleError,
    load_bundle,
    publish_bundle,
    resolve_bundle_dir,
    stage_bundle,
    update_staged_meta,
    val_in_sample,
)
from imgpipe.bundle_versions import discard
from imgpipe.config import RebalanceConfig
from imgpipe.constants import ACCURACY, BALANCED_ACCURACY, MACRO_F1, TEST, TRAIN, VAL, VAL_LOSS
from imgpipe.data.manifest import load_manifest
from imgpipe.decoupled.heads import Head, fit_crt, fit_lws, metric_scorer, select_tau
from imgpipe.decoupled.smote import oversample_features, report_dicts
from imgpipe.errors import DataSourceError
from imgpipe.metrics import classification_metrics, confusion_matrix
from imgpipe.transfer.features import extract_splits
from imgpipe.tuning.export import bundle_metrics, verify_bundle

log = logging.getLogger(__name__)

HEAD_WEIGHT, HEAD_BIAS = "fc.weight", "fc.bias"  # every registered model's head is ``fc``


def _check_head_alignment(feats, head: Head) -> None:
    """The bundle's own logits must equal ``fc(features)``: proves features are fc's input."""
    if feats.source_logits is None:
        return
    got = head.logits(torch.from_numpy(feats.features)).numpy()
    err = float(np.abs(got - feats.source_logits).max()) if len(got) else 0.0
    if err > 1e-3 * max(1.0, float(np.abs(feats.source_logits).max())):
        raise BundleError(f"the bundle's head is not a linear layer on the extracted features "
                          f"(max logit difference {err:.3g}); cannot re-balance it")


def fit_head(cfg: RebalanceConfig, source: Head, train, val, num_classes: int,
             class_names: list[str]) -> tuple[Head, dict[str, Any]]:
    """The re-balanced head for ``cfg.method`` (with optional SMOTE before cRT)."""
    score = metric_scorer(val.labels, num_classes, cfg.metric)
    val_x = torch.from_numpy(val.features)
    x, y = train.features, train.labels
    info: dict[str, Any] = {}
    opts = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed}
    if cfg.method == "tau-norm":
        return select_tau(source, score, val_x, cfg.tau_max, cfg.tau_step), info
    if cfg.method == "lws":
        head = fit_lws(source, torch.from_numpy(x), torch.from_numpy(y), score, val_x, **opts)
        return head, info
    if cfg.smote is not None:
        x, y, report = oversample_features(x, y, cfg.smote, cfg.smote_method, cfg.seed)
        info["smote"] = {"k": cfg.smote, "method": cfg.smote_method,
                         "rows_before": len(train.labels), "rows_after": len(y),
                         "per_class": report_dicts(report, class_names)}
    head = fit_crt(torch.from_numpy(x), torch.from_numpy(y), num_classes, score, val_x,
                   weight_decay=cfg.weight_decay, **opts)
    return head, info


def head_metrics(head: Head, feats, num_classes: int) -> dict[str, Any]:
    """Metrics of the head on extracted features, named as training reports them (val_*)."""
    logits = head.logits(torch.from_numpy(feats.features)).double()
    cm = confusion_matrix(feats.labels, logits.argmax(1).numpy(), num_classes)
    m = classification_metrics(cm)
    out = {f"val_{k}": m[k] for k in (ACCURACY, BALANCED_ACCURACY, MACRO_F1)}
    out[VAL_LOSS] = float(F.cross_entropy(logits, torch.from_numpy(feats.labels)))
    return out


def _provenance(cfg: RebalanceConfig, src: Path, meta, head: Head, info: dict,
                dims: int, rows: int) -> dict[str, Any]:
    fitted = {k: v for k, v in head.info.items() if k != "history"}
    return {
        "method": cfg.method,
        "paper": "Kang et al., Decoupling Representation and Classifier for Long-Tailed "
                 "Recognition, ICLR 2020",
        "source_bundle": {"path": str(src), "name": meta.name, "version": meta.version,
                          "weights_sha256": meta.weights_sha256},
        "frozen": "all tensors except fc.weight and fc.bias are the source bundle's",
        "feature_dim": dims, "train_rows": rows, "selected_by": f"val {cfg.metric}",
        "settings": cfg.model_dump(mode="json", exclude={"bundle", "data", "out"}),
        "fitted": fitted, "history": head.info.get("history", []), **info,
    }


def rebalance_classifier(cfg: RebalanceConfig) -> dict[str, Any]:
    """Run the stage; returns the results dict (the job writes it to ``<out>/results.json``).

    Raises:
        BundleError / BundleChecksumError: unreadable source bundle, a head that is not a
            linear layer on the penultimate features, or a bundle refit on train+val (the new
            head is chosen on val).
        ManifestError: ``cfg.data`` is not prepared shards.
        ValueError: the data's classes differ from the bundle's.
        ExportVerificationError: the staged bundle does not reproduce the head's val metrics
            (nothing is published).
    """
    started = time.perf_counter()
    src = resolve_bundle_dir(cfg.bundle)
    meta, state = load_bundle(src)
    manifest = load_manifest(cfg.data)
    if list(manifest.class_names) != list(meta.class_names):
        raise DataSourceError(f"data: classes {list(manifest.class_names)} differ from the bundle's "
                         f"{list(meta.class_names)}")
    in_sample = val_in_sample(meta, "choosing a re-balanced head")
    if in_sample:
        raise BundleError(f"{in_sample}; re-balance the bundle of a search run with --no-refit "
                          "(jobs/tune.py refits by default when val outnumbers train)")
    if "rebalance" in meta.hyperparameters:
        log.warning("%s is itself a re-balanced bundle (%s); its head is the starting point. "
                    "Name the trained version (bundles/<name>/v<N>) to start from the original.",
                    src, meta.hyperparameters["rebalance"].get("method"))
    source = Head(state[HEAD_WEIGHT].float(), state[HEAD_BIAS].float())
    t0 = time.perf_counter()
    feats = extract_splits(str(src), cfg.data, (TRAIN, VAL), num_actors=cfg.num_actors,
                           cpus_per_actor=cfg.cpus_per_actor,
                           image_size=meta.preprocess.image_size, seed=cfg.seed)
    extract_s = time.perf_counter() - t0
    _check_head_alignment(feats[VAL], source)
    n = meta.architecture.num_classes
    t0 = time.perf_counter()
    head, info = fit_head(cfg, source, feats[TRAIN], feats[VAL], n, list(meta.class_names))
    fit_s = time.perf_counter() - t0
    new_state = dict(state)
    new_state[HEAD_WEIGHT] = head.weight.to(state[HEAD_WEIGHT].dtype).contiguous()
    new_state[HEAD_BIAS] = head.bias.to(state[HEAD_BIAS].dtype).contiguous()
    counts = np.asarray(meta.train_class_counts, dtype=np.float64)
    balanced = np.where(counts > 0, 1.0, 0.0)  # every method targets the balanced prior
    hp = {k: v for k, v in meta.hyperparameters.items() if k != "rebalance"}
    hp["rebalance"] = _provenance(cfg, src, meta, head, info, feats[TRAIN].features.shape[1],
                                  len(feats[TRAIN].labels))
    # Staged, verified, then published (as tuning.export does): a failed check uses up no version.
    staged = stage_bundle(
        cfg.bundle_root or src.parent.parent, cfg.bundle_name or meta.name, new_state,
        architecture=meta.architecture, preprocess=meta.preprocess,
        class_names=list(meta.class_names), train_class_counts=list(meta.train_class_counts),
        model_prior=balanced / balanced.sum(), hyperparameters=hp,
        metrics={"val": {}, "test": {}})
    try:
        val = verify_bundle(staged, cfg.data, head_metrics(head, feats[VAL], n))
        test = bundle_metrics(staged, cfg.data, TEST)
        update_staged_meta(staged, metrics={"val": val, "test": test})
        path = publish_bundle(staged)
    finally:
        discard(staged)
    return {
        "config": cfg.model_dump(mode="json"), "source_bundle": str(src), "bundle": str(path),
        "method": cfg.method, "class_names": list(meta.class_names),
        "train_counts": list(meta.train_class_counts), "rebalance": hp["rebalance"],
        "skipped_corrupt": {s: f.skipped for s, f in feats.items()},
        "source_metrics": meta.metrics.model_dump(), "val": val, "test": test,
        "timing_s": {"extract_features": round(extract_s, 2), "fit_head": round(fit_s, 2),
                     "total": round(time.perf_counter() - started, 2)},
    }
