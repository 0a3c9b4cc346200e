"""``model_card.md``: model, data, class counts, metrics, calibration, robustness, limitations.

A Jinja2 template (Markdown); this module gathers and formats what it shows."""

from __future__ import annotations

from typing import Any

import jinja2

from imgpipe.bundle import BundleMeta
from imgpipe.constants import (
    BALANCED_ACCURACY,
    ECE,
    NLL,
    PER_CLASS_RECALL,
    SUPPORT,
    VAL,
)
from imgpipe.data.manifest import Manifest
from imgpipe.evaluate import (
    BEFORE_TEMPERATURE,
    SPLIT_PRIOR_CALIBRATION,
    BundleEvaluation,
    ShotThresholds,
)
from imgpipe.report.labels import REPORT_FILE, SUMMARY_METRICS, fmt, prior_text


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


def refit_lines(info: dict[str, Any] | None) -> list[str]:
    """How a refit bundle was made (``imgpipe.tuning.refit``), if it was: Markdown bullets."""
    if not info:
        return []
    chosen = next((f"{k.removeprefix('selected_')} {v:.4f}" for k, v in info.items()
                   if k.startswith("selected_val_")), "")
    return [f"- Refit on {' + '.join(info.get('splits', []))} for {info.get('epochs')} epochs "
            f"after the search chose trial `{info.get('selected_trial')}` (held-out {chosen} at "
            f"epoch {int(info.get('selected_epoch', -1)) + 1}). Val is in this model's training "
            "data: its val scores are in-sample; test is unseen",
            "- Temperature (and binary threshold) fitted on held-out val by the chosen trial's "
            "model, before the refit"]


# Markdown, not HTML: no autoescaping, but a "|" in a cell would split a table column, so
# cells are escaped for Markdown tables (``_cells``). Blank lines around headings and tables:
# CommonMark renderers need them.
_TEMPLATE = """\
{%- macro table(t) -%}
| {{ t.headers|join(" | ") }} |
|{{ "---|" * t.headers|length }}
{% for row in t.rows %}| {{ row|join(" | ") }} |
{% endfor %}
{%- endmacro -%}
# Model card: {{ meta.name }} v{{ meta.version }}

## Model

- Architecture: `{{ meta.architecture.model }}`, {{ meta.architecture.num_classes }} classes, \
{{ meta.architecture.in_channels }} input channel(s), image size {{ meta.preprocess.image_size }}, \
mode {{ meta.preprocess.mode }}
- Created {{ created }} UTC with imgpipe {{ meta.code_version }}
- Hyperparameters: {{ "`%s`"|format(meta.hyperparameters) if meta.hyperparameters else "not recorded" }}
{% for line in rebalance + refit %}{{ line }}
{% endfor %}
## Data

- Source: `{{ manifest.source }}` (seed {{ manifest.seed }}, imbalance ratio {{ imbalance_ratio }})
- Class counts per split (the training counts are the model's prior):

{{ table(counts) }}
## Metrics

{{ table(metrics) }}
## Calibration

- Temperature T = {{ "%.4f"|format(meta.temperature) }} (logits / T, fitted on val by minimising \
NLL with the prior corrected to the val class mix)
{% if fit %}- On val ({{ fit.num_rows }} images, its own class mix): NLL \
{{ "%.4f"|format(fit.nll_before) }} → {{ "%.4f"|format(fit.nll_after) }}, ECE \
{{ "%.4f"|format(fit.ece_before) }} → {{ "%.4f"|format(fit.ece_after) }}
{% endif -%}
- Deployment prior: `{{ prior }}`; model prior: {{ model_prior }}
- Decision threshold (binary): {{ threshold }}
- As served (deployment prior applied):

{{ table(calibration) }}
{%- if rob %}
## Robustness

- {{ rob.split }} balanced accuracy clean {{ rob.clean }}, mean over {{ rob.n }} corruptions x 3 \
severities {{ rob.mean }}, worst {{ rob.worst }} (severity {{ rob.severity }}) {{ rob.value }}; \
details in `{{ report_file }}`.
{% endif %}
## Limitations

{% for line in limitations %}- {{ line }}
{% endfor %}
## Files

- `{{ report_file }}`: the full evaluation report ({{ main_split }} split) with figures.
"""
_ENV = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined,
                          keep_trailing_newline=True)


def _cells(headers: list[str], rows: list[list[Any]]) -> dict[str, list]:
    """A Markdown table's headers and formatted cells, with "|" escaped."""
    def esc(v: Any) -> str:
        return fmt(v).replace("|", "\\|")

    return {"headers": [esc(h) for h in headers], "rows": [[esc(v) for v in r] for r in rows]}


def _robustness(rob: dict[str, Any] | None) -> dict[str, Any] | None:
    if rob is None:
        return None
    worst = rob["worst"]
    return {"split": rob["split"], "clean": fmt(rob["clean"][BALANCED_ACCURACY]),
            "n": len(rob["corruptions"]), "mean": fmt(rob["mean_corrupted_balanced_accuracy"]),
            "worst": worst["corruption"], "severity": worst["severity"],
            "value": fmt(worst["value"])}


def render_model_card(meta: BundleMeta, manifest: Manifest, evals: dict[str, BundleEvaluation],
                      main_split: str, shots: ShotThresholds,
                      robustness: dict[str, Any] | None = None) -> str:
    """``model_card.md``: model, data, class counts, metrics, calibration, limitations
    (a Jinja2 template; this function gathers and formats what it shows)."""
    splits = manifest.splits
    count_rows = [[name] + [manifest.counts[s][name] for s in splits] for name in meta.class_names]
    metric_rows = [[label] + [evals[s].metrics.get(key) for s in evals]
                   for key, label in SUMMARY_METRICS
                   if any(key in evals[s].metrics for s in evals)]
    cal_rows = [[s, label, e.metrics[BEFORE_TEMPERATURE][k], e.metrics[k]]
                for s, e in evals.items() for k, label in ((NLL, "NLL"), (ECE, "ECE"))]
    return _ENV.from_string(_TEMPLATE).render(
        meta=meta, manifest=manifest, main_split=main_split, report_file=REPORT_FILE,
        created=f"{meta.created_at:%Y-%m-%d %H:%M}",
        rebalance=_rebalance_lines(meta.hyperparameters.get("rebalance")),
        refit=refit_lines(meta.hyperparameters.get("refit")),
        imbalance_ratio=fmt(manifest.imbalance_ratio, 1),
        counts=_cells(["class", *splits], count_rows),
        metrics=_cells(["metric", *evals], metric_rows),
        fit=evals[VAL].metrics.get(SPLIT_PRIOR_CALIBRATION) if VAL in evals else None,
        prior=prior_text(meta), model_prior=", ".join(f"{p:.3g}" for p in meta.model_prior),
        threshold=fmt(meta.decision_threshold),
        calibration=_cells(["split", "metric", "before (T = 1)", "after"], cal_rows),
        rob=_robustness(robustness),
        limitations=_limitations(meta, manifest, evals[main_split], shots))
