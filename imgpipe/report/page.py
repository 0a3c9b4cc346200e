"""``report.html``: one self-contained page. Every figure is embedded as a base64 PNG and the
CSS is inline, so it opens from a file, an e-mail attachment or an air-gapped machine."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

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


def _table(headers: list[str], rows: list[list[Any]], left: int = 1) -> str:
    """An HTML table; the first ``left`` columns are text (left-aligned), the rest numbers."""
    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{html.escape(fmt(v))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img_tag(png: Path, alt: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _summary_section(evals: dict[str, BundleEvaluation]) -> str:
    splits = list(evals)
    rows = [[label] + [evals[s].metrics.get(key) for s in splits]
            for key, label in SUMMARY_METRICS
            if any(key in evals[s].metrics for s in splits)]
    return "<h2>Metrics</h2>" + _table(["metric", *splits], rows)


def _served_prior(meta: BundleMeta) -> np.ndarray:
    target = target_prior(meta)
    if target is not None:
        return target
    model = np.asarray(meta.model_prior, dtype=np.float64)
    return model / model.sum()


def _fit_table(fit: dict[str, Any]) -> str:
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
    return ("<h3>Temperature fit (val split, its own class mix)</h3>"
            + _table(["metric", "before (T = 1)", "after", "change"], rows)
            + f'<p class="note">{html.escape(note)}</p>')


def _mismatch_note(evals: dict[str, BundleEvaluation]) -> str:
    """Say when a split's class mix differs from the applied prior: NLL/ECE then also
    measure that mismatch, and may rise after temperature scaling."""
    far = []
    for split, ev in evals.items():
        mix = np.bincount(ev.preds.labels, minlength=len(ev.meta.class_names)) / ev.preds.labels.size
        if 0.5 * np.abs(mix - _served_prior(ev.meta)).sum() > 0.05:
            far.append(split)
    if not far:
        return ""
    return (f'<p class="note">The class mix of {", ".join(far)} differs from the applied '
            f"prior ({html.escape(prior_text(next(iter(evals.values())).meta))}): as-served "
            "NLL and ECE there also measure that mismatch. The reliability diagram corrects to "
            "the split's own mix and shows calibration alone.</p>")


def _calibration_section(evals: dict[str, BundleEvaluation]) -> str:
    parts = ["<h2>Calibration</h2>"]
    fit = evals[VAL].metrics.get(SPLIT_PRIOR_CALIBRATION) if VAL in evals else None
    if fit:
        parts.append(_fit_table(fit))
    rows = []
    for split, ev in evals.items():
        before, after = ev.metrics[BEFORE_TEMPERATURE], ev.metrics
        for key, label in ((NLL, "NLL"), (ECE, "ECE (15 bins)"), (BRIER, "Brier")):
            rows.append([split, label, before[key], after[key], after[key] - before[key]])
    prior = prior_text(next(iter(evals.values())).meta)
    parts.append(f"<h3>As served (deployment prior {html.escape(prior)})</h3>")
    parts.append(_table(["split", "metric", "before (T = 1)", "after", "change"], rows, left=2))
    parts.append(_mismatch_note(evals))
    return "".join(parts)


def _shot_group(metrics: dict[str, Any], k: int) -> str:
    groups = metrics.get(SHOT_CLASSES) or {}
    return next((g for g, members in groups.items() if k in members), "")


def _per_class_section(ev: BundleEvaluation) -> str:
    m = ev.metrics
    rows = [[name, _shot_group(m, k), ev.meta.train_class_counts[k], m[SUPPORT][k],
             m[PER_CLASS_PRECISION][k], m[PER_CLASS_RECALL][k], m[PER_CLASS_SPECIFICITY][k],
             m[PER_CLASS_F1][k], m[PER_CLASS_ROC_AUC][k], m[PER_CLASS_AVERAGE_PRECISION][k]]
            for k, name in enumerate(ev.meta.class_names)]
    headers = ["class", "shot group", "train n", f"{ev.split} n", "precision",
               "recall (sensitivity)", "specificity", "F1", "ROC-AUC", "PR-AUC (AP)"]
    return f"<h2>Per class ({html.escape(ev.split)})</h2>" + _table(headers, rows, left=2)


def _setup_section(ev: BundleEvaluation, shots: ShotThresholds) -> str:
    meta = ev.meta
    prior = meta.deployment_prior
    rows = [
        ["architecture", f"{meta.architecture.model} ({meta.architecture.num_classes} classes)"],
        ["temperature", meta.temperature],
        ["deployment prior (applied)", prior if isinstance(prior, str) else
         short_vector(prior)],
        ["model prior", short_vector(meta.model_prior)],
        ["decision threshold (binary)", meta.decision_threshold],
        ["shot groups (training count)", f"many > {shots.many}, few < {shots.few}"],
        ["images evaluated", f"{ev.preds.labels.size} ({ev.preds.skipped} corrupt skipped)"],
        ["code version", meta.code_version],
    ]
    return "<h2>Setup</h2>" + _table(["setting", "value"], rows, left=2)


def _figures_section(figures: list[tuple[str, Path, str]], history_missing: bool) -> str:
    parts = ["<h2>Figures</h2>"]
    for title, png, caption in figures:
        parts.append(f"<figure><figcaption><b>{html.escape(title)}</b> — "
                     f"{html.escape(caption)}</figcaption>{_img_tag(png, title)}</figure>")
    if history_missing:
        parts.append('<p class="note">No training history was given, so there are no '
                     "training curves.</p>")
    return "".join(parts)


def _robustness_section(rob: dict[str, Any] | None) -> str:
    if rob is None:
        return ""
    from imgpipe.robustness import ROBUSTNESS_HEADERS, robustness_rows

    worst = rob["worst"]
    return ("<h2>Robustness under corruptions</h2>"
            f"<p>Balanced accuracy on corrupted copies of the {html.escape(rob['split'])} split "
            "(ImageNet-C families at three severities, torchvision v2 ops, seeded), through the "
            f"served probabilities. Mean over corruptions {fmt(rob['mean_corrupted_balanced_accuracy'])}"
            f"; worst {html.escape(worst['corruption'])} at severity {worst['severity']}: "
            f"{fmt(worst['value'])}.</p>"
            + _table(ROBUSTNESS_HEADERS, robustness_rows(rob))
            + _img_tag(Path(rob["plot"]), "Robustness under corruptions"))


def render_html(evals: dict[str, BundleEvaluation], main_split: str,
                figures: list[tuple[str, Path, str]], shots: ShotThresholds,
                data_root: str, history_missing: bool,
                robustness: dict[str, Any] | None = None) -> str:
    """The whole report as one HTML string (inline CSS, base64 images, no external URL)."""
    ev = evals[main_split]
    title = f"{ev.meta.name} v{ev.meta.version} — {main_split} split"
    sub = (f"Bundle evaluated on {data_root} ({main_split}); created "
           f"{ev.meta.created_at:%Y-%m-%d %H:%M} UTC. Probabilities are those serving returns.")
    body = "".join([
        f"<h1>{html.escape(title)}</h1><p class='sub'>{html.escape(sub)}</p>",
        '<div class="grid"><div>', _summary_section(evals), "</div><div>",
        _setup_section(ev, shots), "</div></div>",
        _calibration_section(evals),
        _figures_section(figures, history_missing),
        _robustness_section(robustness),
        _per_class_section(ev),
    ])
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
            f"<body>{body}</body></html>\n")

