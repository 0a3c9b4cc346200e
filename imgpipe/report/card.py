"""``model_card.md``: model, data, class counts, metrics, calibration, robustness, limitations."""

from __future__ import annotations

from typing import Any

from imgpipe.bundle import BundleMeta
from imgpipe.constants import (
    BALANCED_ACCURACY,
    ECE,
    NLL,
    PER_CLASS_RECALL,
    SUPPORT,
    VAL,
)
from imgpipe.data.shards import Manifest
from imgpipe.evaluate import (
    BEFORE_TEMPERATURE,
    SPLIT_PRIOR_CALIBRATION,
    BundleEvaluation,
    ShotThresholds,
)
from imgpipe.report.labels import REPORT_FILE, SUMMARY_METRICS, fmt, prior_text


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _limitations(meta: BundleMeta, manifest: Manifest, ev: BundleEvaluation,
                 shots: ShotThresholds) -> list[str]:
    """Plain statements a user should read before deploying, derived from the numbers."""
    m, names, counts = ev.metrics, meta.class_names, meta.train_class_counts
    out = [f"Trained only on `{manifest.source}` images; inputs unlike them (other domains, "
           "other classes) still get one of these class names, often with high confidence."]
    few = [f"{names[k]} ({counts[k]})" for k in range(len(names)) if counts[k] < shots.few]
    if few:
        out.append(f"Few-shot classes (< {shots.few} training images): {', '.join(few)}. "
                   "Expect their recall to vary most between datasets.")
    zero = [names[k] for k, r in enumerate(m[PER_CLASS_RECALL]) if r == 0 and m[SUPPORT][k]]
    if zero:
        out.append(f"Never correctly predicted on {ev.split}: {', '.join(zero)}.")
    smallest = min((s for s in m[SUPPORT] if s > 0), default=0)
    out.append(f"The {ev.split} split has as few as {smallest} images for one class; a "
               f"per-class rate from n images is uncertain by roughly ±1/√n "
               f"(±{1 / max(smallest, 1) ** 0.5:.2f}).")
    assumed = ("the model's own prior (the training mix, as seen through any resampling or "
               "loss weighting)" if meta.deployment_prior == "model"
               else f"the `{prior_text(meta)}` class prior")
    out.append(f"Probabilities assume {assumed}. If the deployment's class mix differs, set "
               "`deployment_prior` in bundle.json (balanced, train or a vector): serving and "
               "evaluation apply it the same way.")
    out.append("Temperature scaling was fitted on the validation split: calibration holds for "
               "data distributed like it, and degrades under distribution shift.")
    if ev.preds.skipped:
        out.append(f"{ev.preds.skipped} corrupt {ev.split} images could not be decoded and are "
                   "not counted.")
    return out






def _fit_lines(evals: dict[str, BundleEvaluation]) -> list[str]:
    fit = evals[VAL].metrics.get(SPLIT_PRIOR_CALIBRATION) if VAL in evals else None
    if not fit:
        return []
    return [f"- On val ({fit['num_rows']} images, its own class mix): NLL "
            f"{fit['nll_before']:.4f} → {fit['nll_after']:.4f}, ECE {fit['ece_before']:.4f} → "
            f"{fit['ece_after']:.4f}"]


def _rebalance_lines(info: dict[str, Any] | None) -> list[str]:
    """How a classifier-re-balanced bundle was made (``imgpipe.decoupled``), if it was."""
    if not info:
        return []
    src = info.get("source_bundle", {})
    fitted = info.get("fitted", {})
    how = {"crt": "a new linear head trained with class-balanced sampling (cRT)",
           "tau-norm": f"tau-normalised head weights (tau = {fitted.get('tau')}, chosen on val)",
           "lws": "learned per-class weight scales (LWS), class-balanced sampling"}
    lines = [f"- Classifier re-balanced from `{src.get('name')}` v{src.get('version')}: "
             f"{how.get(info.get('method'), info.get('method'))}; backbone frozen "
             f"({info.get('frozen', '')}); {info.get('paper', '')}"]
    if info.get("smote"):
        sm = info["smote"]
        lines.append(f"- Train features oversampled with {sm['method']} (k = {sm['k']}): "
                     f"{sm['rows_before']} → {sm['rows_after']} rows")
    return lines


def _robustness_lines(rob: dict[str, Any] | None) -> list[str]:
    if rob is None:
        return []
    worst = rob["worst"]
    return ["## Robustness",
            f"- {rob['split']} balanced accuracy clean {fmt(rob['clean'][BALANCED_ACCURACY])}, "
            f"mean over {len(rob['corruptions'])} corruptions x 3 severities "
            f"{fmt(rob['mean_corrupted_balanced_accuracy'])}, worst {worst['corruption']} "
            f"(severity {worst['severity']}) {fmt(worst['value'])}; details in "
            f"`{REPORT_FILE}`."]


def render_model_card(meta: BundleMeta, manifest: Manifest, evals: dict[str, BundleEvaluation],
                      main_split: str, shots: ShotThresholds,
                      robustness: dict[str, Any] | None = None) -> str:
    """``model_card.md``: model, data, class counts, metrics, calibration, limitations."""
    ev = evals[main_split]
    splits = manifest.splits
    count_rows = [[name] + [manifest.counts[s][name] for s in splits] for name in meta.class_names]
    metric_rows = [[label] + [evals[s].metrics.get(key) for s in evals]
                   for key, label in SUMMARY_METRICS
                   if any(key in evals[s].metrics for s in evals)]
    cal_rows = [[s, label, e.metrics[BEFORE_TEMPERATURE][k], e.metrics[k]]
                for s, e in evals.items() for k, label in ((NLL, "NLL"), (ECE, "ECE"))]
    hp = meta.hyperparameters
    sections = [
        f"# Model card: {meta.name} v{meta.version}",
        "## Model",
        f"- Architecture: `{meta.architecture.model}`, {meta.architecture.num_classes} classes, "
        f"{meta.architecture.in_channels} input channel(s), image size "
        f"{meta.preprocess.image_size}, mode {meta.preprocess.mode}",
        f"- Created {meta.created_at:%Y-%m-%d %H:%M} UTC with imgpipe {meta.code_version}",
        f"- Hyperparameters: `{hp}`" if hp else "- Hyperparameters: not recorded",
        *_rebalance_lines(hp.get("rebalance")),
        "## Data",
        f"- Source: `{manifest.source}` (seed {manifest.seed}, imbalance ratio "
        f"{fmt(manifest.imbalance_ratio, 1)})",
        "- Class counts per split (the training counts are the model's prior):",
        "", _md_table(["class", *splits], count_rows),
        "## Metrics",
        "", _md_table(["metric", *evals], metric_rows),
        "## Calibration",
        f"- Temperature T = {meta.temperature:.4f} (logits / T, fitted on val by minimising NLL "
        "with the prior corrected to the val class mix)",
        *_fit_lines(evals),
        f"- Deployment prior: `{prior_text(meta)}`; model prior: "
        f"{', '.join(f'{p:.3g}' for p in meta.model_prior)}",
        f"- Decision threshold (binary): {fmt(meta.decision_threshold)}",
        "- As served (deployment prior applied):",
        "", _md_table(["split", "metric", "before (T = 1)", "after"], cal_rows),
        *_robustness_lines(robustness),
        "## Limitations",
        *[f"- {line}" for line in _limitations(meta, manifest, ev, shots)],
        "## Files",
        f"- `{REPORT_FILE}`: the full evaluation report ({main_split} split) with figures.",
    ]
    # Blank lines around headings: CommonMark renderers need them before tables and lists.
    return "\n".join(f"\n{line}\n" if line.startswith("#") else line
                     for line in sections).strip() + "\n"
