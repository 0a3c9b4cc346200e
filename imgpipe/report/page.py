"""``report.html``: one self-contained page. Every figure is embedded as a base64 PNG and the
CSS is inline, so it opens from a file, an e-mail attachment or an air-gapped machine. The
page is a Jinja2 template; this module only gathers and formats what it shows."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from imgpipe.bundle import BundleMeta
from imgpipe.calibrate import T_MAX, T_MIN
from imgpipe.constants import (
    BRIER,
    ECE,
    NLL,
    PER_CLASS_AVERAGE_PRECISION,
    PER_CLASS_F1,
    PER_CLASS_PRECISION,
    PER_CLASS_RECALL,
    PER_CLASS_ROC_AUC,
    PER_CLASS_SPECIFICITY,
    SHOT_CLASSES,
    SUPPORT,
    VAL,
)
from imgpipe.evaluate import (
    BEFORE_TEMPERATURE,
    SPLIT_PRIOR_CALIBRATION,
    BundleEvaluation,
    ShotThresholds,
)
from imgpipe.inference import target_prior
from imgpipe.report.labels import SUMMARY_METRICS, fmt, prior_text, short_vector

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
margin:0 auto;max-width:1240px;padding:16px 24px;color:#1d1d1f;background:#fff}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.6em}.sub{color:#555;margin-top:0}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:3px 9px;text-align:right}
th{background:#f3f4f6}td{max-width:460px;overflow-wrap:anywhere}h3{font-size:1.05em}
td.l,th.l{text-align:left}tr:nth-child(even) td{background:#fafafa}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}.note{color:#555;font-size:.9em}
.grid{display:flex;gap:32px;flex-wrap:wrap;align-items:flex-start}
"""


# One template, autoescaped: every name and number from the bundle or data is escaped by
# Jinja2, never by hand. Cells arrive already formatted (``labels.fmt``).
_TEMPLATE = """\
{%- macro cell(tag, v, is_text) %}<{{ tag }}{{ ' class="l"'|safe if is_text }}>{{ v }}</{{ tag }}>
{%- endmacro -%}
{%- macro table(t, left=1) -%}
<table><thead><tr>{% for h in t.headers %}{{ cell("th", h, loop.index0 < left) }}{% endfor %}</tr>
</thead><tbody>{% for row in t.rows %}<tr>
{%- for v in row %}{{ cell("td", v, loop.index0 < left) }}{% endfor %}</tr>{% endfor -%}
</tbody></table>
{%- endmacro -%}
<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title><style>{{ css|safe }}</style></head><body>
<h1>{{ title }}</h1><p class="sub">{{ sub }}</p>
<div class="grid"><div><h2>Metrics</h2>{{ table(summary) }}</div>
<div><h2>Setup</h2>{{ table(setup, 2) }}</div></div>
<h2>Calibration</h2>
{%- if fit %}
<h3>Temperature fit (val split, its own class mix)</h3>{{ table(fit.table) }}
<p class="note">{{ fit.note }}</p>
{%- endif %}
<h3>As served (deployment prior {{ prior }})</h3>{{ table(served, 2) }}
{%- if mismatch %}
<p class="note">The class mix of {{ mismatch|join(", ") }} differs from the applied prior
({{ prior }}): as-served NLL and ECE there also measure that mismatch. The reliability diagram
corrects to the split's own mix and shows calibration alone.</p>
{%- endif %}
<h2>Figures</h2>
{%- for f in figures %}
<figure><figcaption><b>{{ f.title }}</b> — {{ f.caption }}</figcaption>
<img src="data:image/png;base64,{{ f.png }}" alt="{{ f.title }}"></figure>
{%- endfor %}
{%- if history_missing %}
<p class="note">No training history was given, so there are no training curves.</p>
{%- endif %}
{%- if rob %}
<h2>Robustness under corruptions</h2>
<p>Balanced accuracy on corrupted copies of the {{ rob.split }} split (ImageNet-C families at
three severities, torchvision v2 ops, seeded), through the served probabilities. Mean over
corruptions {{ rob.mean }}; worst {{ rob.worst }} at severity {{ rob.severity }}: {{ rob.value }}.</p>
{{ table(rob.table) }}
<img src="data:image/png;base64,{{ rob.png }}" alt="Robustness under corruptions">
{%- endif %}
<h2>Per class ({{ split }})</h2>{{ table(per_class, 2) }}
</body></html>
"""
_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)


def _table(headers: list[str], rows: list[list[Any]]) -> dict[str, list]:
    """Headers and rows with every cell formatted for the page."""
    return {"headers": headers, "rows": [[fmt(v) for v in r] for r in rows]}


def _png_b64(png: Path) -> str:
    return base64.b64encode(png.read_bytes()).decode("ascii")


def _summary(evals: dict[str, BundleEvaluation]) -> dict[str, list]:
    splits = list(evals)
    rows = [[label] + [evals[s].metrics.get(key) for s in splits]
            for key, label in SUMMARY_METRICS
            if any(key in evals[s].metrics for s in splits)]
    return _table(["metric", *splits], rows)


def _served_prior(meta: BundleMeta) -> np.ndarray:
    target = target_prior(meta)
    if target is not None:
        return target
    model = np.asarray(meta.model_prior, dtype=np.float64)
    return model / model.sum()


def _fit(evals: dict[str, BundleEvaluation]) -> dict[str, Any] | None:
    fit = evals[VAL].metrics.get(SPLIT_PRIOR_CALIBRATION) if VAL in evals else None
    if not fit:
        return None
    rows = [[label, fit[f"{key}_before"], fit[f"{key}_after"],
             fit[f"{key}_after"] - fit[f"{key}_before"]]
            for key, label in (("nll", "NLL"), ("ece", "ECE (15 bins)"))]
    note = (f"T = {fit['temperature']:.4f}, chosen on {fit['num_rows']} validation images to "
            "minimise this NLL with the prior corrected to the validation class mix, so T "
            "corrects over/under-confidence only and holds for any deployment prior.")
    if not T_MIN * 1.01 < fit["temperature"] < T_MAX / 1.01:
        note += (" T is at its search bound: the logits carry almost no information about the "
                 "labels (an untrained or broken model?).")
    if fit["temperature"] == 1.0:
        note = "T = 1: this bundle has not been temperature-scaled (evaluate with --calibrate)."
    if evals[VAL].meta.hyperparameters.get("refit"):
        note = (f"T = {fit['temperature']:.4f}, fitted on held-out val by the model the search "
                "chose, before it was refit on train+val. This model trained on val, so the "
                "val rows here are in-sample.")
    return {"table": _table(["metric", "before (T = 1)", "after", "change"], rows), "note": note}


def _mismatched_splits(evals: dict[str, BundleEvaluation]) -> list[str]:
    """Splits whose class mix differs from the applied prior (TV > 0.05): NLL/ECE there also
    measure that mismatch, and may rise after temperature scaling."""
    far = []
    for split, ev in evals.items():
        mix = np.bincount(ev.preds.labels, minlength=len(ev.meta.class_names)) / ev.preds.labels.size
        if 0.5 * np.abs(mix - _served_prior(ev.meta)).sum() > 0.05:
            far.append(split)
    return far


def _served(evals: dict[str, BundleEvaluation]) -> dict[str, list]:
    rows = []
    for split, ev in evals.items():
        before, after = ev.metrics[BEFORE_TEMPERATURE], ev.metrics
        for key, label in ((NLL, "NLL"), (ECE, "ECE (15 bins)"), (BRIER, "Brier")):
            rows.append([split, label, before[key], after[key], after[key] - before[key]])
    return _table(["split", "metric", "before (T = 1)", "after", "change"], rows)


def _shot_group(metrics: dict[str, Any], k: int) -> str:
    groups = metrics.get(SHOT_CLASSES) or {}
    return next((g for g, members in groups.items() if k in members), "")


def _per_class(ev: BundleEvaluation) -> dict[str, list]:
    m = ev.metrics
    rows = [[name, _shot_group(m, k), ev.meta.train_class_counts[k], m[SUPPORT][k],
             m[PER_CLASS_PRECISION][k], m[PER_CLASS_RECALL][k], m[PER_CLASS_SPECIFICITY][k],
             m[PER_CLASS_F1][k], m[PER_CLASS_ROC_AUC][k], m[PER_CLASS_AVERAGE_PRECISION][k]]
            for k, name in enumerate(ev.meta.class_names)]
    headers = ["class", "shot group", "train n", f"{ev.split} n", "precision",
               "recall (sensitivity)", "specificity", "F1", "ROC-AUC", "PR-AUC (AP)"]
    return _table(headers, rows)


def _setup(ev: BundleEvaluation, shots: ShotThresholds) -> dict[str, list]:
    meta = ev.meta
    prior = meta.deployment_prior
    rows = [
        ["architecture", f"{meta.architecture.model} ({meta.architecture.num_classes} classes)"],
        *([["training", f"refit on train+val ({meta.hyperparameters['refit'].get('epochs')} "
                        "epochs) after the search: val scores are in-sample"]]
          if meta.hyperparameters.get("refit") else []),
        ["temperature", meta.temperature],
        ["deployment prior (applied)", prior if isinstance(prior, str) else
         short_vector(prior)],
        ["model prior", short_vector(meta.model_prior)],
        ["decision threshold (binary)", meta.decision_threshold],
        ["shot groups (training count)", f"many > {shots.many}, few < {shots.few}"],
        ["images evaluated", f"{ev.preds.labels.size} ({ev.preds.skipped} corrupt skipped)"],
        ["code version", meta.code_version],
    ]
    return _table(["setting", "value"], rows)


def _robustness(rob: dict[str, Any] | None) -> dict[str, Any] | None:
    if rob is None:
        return None
    from imgpipe.robustness import ROBUSTNESS_HEADERS, robustness_rows

    worst = rob["worst"]
    return {"split": rob["split"], "mean": fmt(rob["mean_corrupted_balanced_accuracy"]),
            "worst": worst["corruption"], "severity": worst["severity"],
            "value": fmt(worst["value"]),
            "table": _table(ROBUSTNESS_HEADERS, robustness_rows(rob)),
            "png": _png_b64(Path(rob["plot"]))}


def render_html(evals: dict[str, BundleEvaluation], main_split: str,
                figures: list[tuple[str, Path, str]], shots: ShotThresholds,
                data_root: str, history_missing: bool,
                robustness: dict[str, Any] | None = None) -> str:
    """The whole report as one HTML string (inline CSS, base64 images, no external URL).

    Rendered with Jinja2 (autoescaped): class names, paths and notes are escaped there.
    """
    ev = evals[main_split]
    return _ENV.from_string(_TEMPLATE).render(
        title=f"{ev.meta.name} v{ev.meta.version} — {main_split} split",
        sub=(f"Bundle evaluated on {data_root} ({main_split}); created "
             f"{ev.meta.created_at:%Y-%m-%d %H:%M} UTC. Probabilities are those serving returns."),
        css=_CSS, summary=_summary(evals), setup=_setup(ev, shots), fit=_fit(evals),
        prior=prior_text(next(iter(evals.values())).meta), served=_served(evals),
        mismatch=_mismatched_splits(evals),
        figures=[{"title": t, "caption": c, "png": _png_b64(png)} for t, png, c in figures],
        history_missing=history_missing, rob=_robustness(robustness), split=ev.split,
        per_class=_per_class(ev))
