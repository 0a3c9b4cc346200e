"""Evaluation report: PNG figures, one self-contained ``report.html`` and the bundle's model card.

The HTML embeds every figure as a base64 PNG and carries its CSS inline: it opens from a file,
an e-mail attachment or an air-gapped machine with no network and nothing beside it.
Figures are drawn on ``matplotlib.figure.Figure`` objects (Agg, no pyplot): no global state, so
the tune driver can call ``write_report`` from any thread.
"""

from __future__ import annotations

import base64
import html
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from imgpipe.bundle import BundleMeta, resolve_bundle_dir, update_bundle_meta
from imgpipe.calibrate import T_MAX, T_MIN, ThresholdMode
from imgpipe.constants import (
    ACCURACY,
    BALANCED_ACCURACY,
    BRIER,
    ECE,
    EPOCH,
    FEW_SHOT_ACCURACY,
    GEOMETRIC_MEAN,
    INDEX_BALANCED_ACCURACY,
    MACRO_AVERAGE_PRECISION,
    MACRO_F1,
    MACRO_PRECISION,
    MACRO_RECALL,
    MACRO_ROC_AUC,
    MANY_SHOT_ACCURACY,
    MCC,
    MEDIUM_SHOT_ACCURACY,
    NLL,
    PER_CLASS_AVERAGE_PRECISION,
    PER_CLASS_F1,
    PER_CLASS_PRECISION,
    PER_CLASS_RECALL,
    PER_CLASS_ROC_AUC,
    PER_CLASS_SPECIFICITY,
    SHOT_CLASSES,
    SUPPORT,
    TEST,
    VAL,
    WEIGHTED_F1,
    WEIGHTED_PRECISION,
    WEIGHTED_RECALL,
)
from imgpipe.data.shards import Manifest, load_manifest
from imgpipe.evaluate import (
    BEFORE_TEMPERATURE,
    CONFUSION_MATRIX,
    CONFUSION_MATRIX_NORMALIZED,
    SPLIT_PRIOR_CALIBRATION,
    BundleEvaluation,
    ShotThresholds,
    bundle_block,
    calibrate_bundle,
    evaluation_payload,
    load_predictor,
    parse_prior,
    run_evaluation,
    write_evaluation,
)
from imgpipe.inference import target_prior
from imgpipe.metrics import (
    top_k_key,
)

REPORT_FILE = "report.html"
MODEL_CARD_FILE = "model_card.md"
# Above this many classes, cell annotations and per-class legends become unreadable.
_MAX_ANNOTATED_CLASSES = 20
_MAX_LEGEND_CLASSES = 12
_DPI = 100

SUMMARY_METRICS: tuple[tuple[str, str], ...] = (
    (ACCURACY, "Accuracy"),
    (BALANCED_ACCURACY, "Balanced accuracy"),
    (MACRO_PRECISION, "Macro precision"),
    (MACRO_RECALL, "Macro recall"),
    (MACRO_F1, "Macro F1"),
    (WEIGHTED_PRECISION, "Weighted precision"),
    (WEIGHTED_RECALL, "Weighted recall"),
    (WEIGHTED_F1, "Weighted F1"),
    (GEOMETRIC_MEAN, "Geometric mean (G-mean)"),
    (INDEX_BALANCED_ACCURACY, "Index of balanced accuracy (α=0.1)"),
    (MCC, "Matthews correlation (MCC)"),
    (MACRO_ROC_AUC, "Macro ROC-AUC (one-vs-rest)"),
    (MACRO_AVERAGE_PRECISION, "Macro PR-AUC (average precision)"),
    (top_k_key(1), "Top-1 accuracy"),
    (top_k_key(3), "Top-3 accuracy"),
    (top_k_key(5), "Top-5 accuracy"),
    (NLL, "Negative log-likelihood"),
    (BRIER, "Brier score (multiclass, Σ over classes)"),
    (ECE, "Expected calibration error (15 bins)"),
    (MANY_SHOT_ACCURACY, "Many-shot accuracy"),
    (MEDIUM_SHOT_ACCURACY, "Medium-shot accuracy"),
    (FEW_SHOT_ACCURACY, "Few-shot accuracy"),
)


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------


def plot_confusion_matrix(counts: Sequence[Sequence[int]], normalized: Sequence[Sequence[float]],
                          class_names: list[str]) -> Figure:
    """Heatmap coloured by row-normalised recall, annotated with counts (small C)."""
    norm = np.asarray(normalized, dtype=np.float64)
    cm = np.asarray(counts)
    c = len(class_names)
    side = min(4.0 + 0.45 * c, 14.0)
    fig = Figure(figsize=(side + 1.5, side), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, label="fraction of the true class (row)")
    ticks = np.arange(c)
    show_names = c <= 2 * _MAX_ANNOTATED_CLASSES
    ax.set_xticks(ticks, class_names if show_names else [], rotation=45, ha="right")
    ax.set_yticks(ticks, class_names if show_names else [])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (colour: row-normalised; text: counts)")
    if c <= _MAX_ANNOTATED_CLASSES:
        for i in range(c):
            for j in range(c):
                colour = "white" if norm[i, j] > 0.6 else "black"
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color=colour,
                        fontsize=9 if c <= 10 else 7)
    return fig


def plot_per_class_vs_frequency(class_names: list[str], train_counts: list[int],
                                recall: list[float], f1: list[float]) -> Figure:
    """Per-class recall and F1 (bars) with training count (line, log axis), head → tail."""
    order = np.argsort(-np.asarray(train_counts), kind="mergesort")
    x = np.arange(len(order))
    fig = Figure(figsize=(max(7.0, 0.5 * len(order) + 3), 4.8), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.bar(x - 0.2, np.asarray(recall)[order], width=0.4, label="recall", color="#4c72b0")
    ax.bar(x + 0.2, np.asarray(f1)[order], width=0.4, label="F1", color="#dd8452")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall / F1 on the evaluated split")
    ax.set_xticks(x, [class_names[i] for i in order] if len(order) <= 40 else [],
                  rotation=45, ha="right")
    ax.set_xlabel("class, most to least frequent in training")
    twin = ax.twinx()
    counts = np.maximum(np.asarray(train_counts, dtype=np.float64)[order], 0.5)
    twin.plot(x, counts, "k.-", label="training count")
    twin.set_yscale("log")
    twin.set_ylabel("training images (log scale)")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="outside upper center", ncols=3, fontsize=9)
    ax.set_title("Per-class recall and F1 against training frequency")
    return fig


def plot_roc_pr(labels: np.ndarray, probs: np.ndarray, class_names: list[str],
                metrics: dict[str, Any]) -> Figure:
    """One-vs-rest ROC and precision-recall curves per class (classes absent are skipped)."""
    fig = Figure(figsize=(12, 5.2), dpi=_DPI, layout="constrained")
    roc_ax, pr_ax = fig.subplots(1, 2)
    c = len(class_names)
    legend = c <= _MAX_LEGEND_CLASSES
    for k in range(c):
        positive = labels == k
        if not positive.any():
            continue
        auc, ap = metrics[PER_CLASS_ROC_AUC][k], metrics[PER_CLASS_AVERAGE_PRECISION][k]
        width = 1.4 if legend else 0.7
        if auc is not None:
            fpr, tpr, _ = roc_curve(positive, probs[:, k])
            roc_ax.plot(fpr, tpr, lw=width, label=f"{class_names[k]} ({auc:.3f})")
        precision, recall, _ = precision_recall_curve(positive, probs[:, k])
        pr_ax.step(recall, precision, where="post", lw=width,
                   label=f"{class_names[k]} ({ap:.3f})")
    roc_ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate (recall)",
               xlim=(0, 1), ylim=(0, 1.02),
               title=f"ROC, one-vs-rest (macro AUC {_fmt(metrics[MACRO_ROC_AUC])})")
    pr_ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
              title=f"Precision-recall (macro AP {_fmt(metrics[MACRO_AVERAGE_PRECISION])})")
    if legend:
        roc_ax.legend(fontsize=8, loc="lower right", title="class (AUC)")
        pr_ax.legend(fontsize=8, loc="lower left", title="class (AP)")
    return fig


def _reliability_panel(ax: Any, hist_ax: Any, rel: dict[str, Any], title: str) -> None:
    """Accuracy per confidence bin against the diagonal, with the bin counts underneath."""
    edges = np.asarray(rel["bin_edges"])
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    filled = np.array([a is not None for a in rel["accuracy"]])
    acc = np.array([a if a is not None else 0.0 for a in rel["accuracy"]])
    conf = np.array([v if v is not None else 0.0 for v in rel["confidence"]])
    ax.bar(centres[filled], acc[filled], width=width[filled], edgecolor="black", lw=0.6,
           color="#4c72b0", label="accuracy in bin")
    ax.bar(centres[filled], np.abs(conf - acc)[filled], bottom=np.minimum(acc, conf)[filled],
           width=width[filled], facecolor="none", edgecolor="#d62728", hatch="///", lw=0.8,
           label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title)
    ax.tick_params(labelbottom=False)
    ax.legend(fontsize=8, loc="upper left")
    hist_ax.bar(centres, rel["count"], width=width, color="grey", edgecolor="black", lw=0.5)
    hist_ax.set(xlim=(0, 1), xlabel="confidence (max probability)", ylabel="images")


def plot_reliability(cal: dict[str, Any]) -> Figure:
    """Reliability diagrams before (T = 1) and after temperature scaling, side by side.

    ``cal`` is a ``calibration_at_split_prior`` block (prior corrected to the split's mix).
    """
    fig = Figure(figsize=(12, 6.4), dpi=_DPI, layout="constrained")
    axes = fig.subplots(2, 2, sharex="col", gridspec_kw={"height_ratios": [3, 1]})
    _reliability_panel(axes[0, 0], axes[1, 0], cal["reliability_before"],
                       f"Before: T = 1  (ECE {cal['ece_before']:.4f}, "
                       f"NLL {cal['nll_before']:.4f})")
    _reliability_panel(axes[0, 1], axes[1, 1], cal["reliability_after"],
                       f"After: T = {cal['temperature']:.3f}  (ECE {cal['ece_after']:.4f}, "
                       f"NLL {cal['nll_after']:.4f})")
    top = max(max(cal["reliability_before"]["count"]), max(cal["reliability_after"]["count"]))
    for hist_ax in axes[1]:
        hist_ax.set_ylim(0, top * 1.1)  # one scale, so the two count histograms compare
    return fig


def _history_series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(history):
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            xs.append(float(row.get(EPOCH, i)))
            ys.append(float(value))
    return xs, ys


def plot_training_curves(history: list[dict[str, Any]]) -> Figure | None:
    """Losses (left) and validation scores (right) per epoch; None when nothing is plottable."""
    keys = sorted({k for row in history for k, v in row.items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and k != EPOCH})
    losses = [k for k in keys if k.endswith("loss")]
    scores = [k for k in keys if k.startswith("val_") and not k.endswith("loss")]
    if not losses and not scores:
        return None
    fig = Figure(figsize=(12, 4.6), dpi=_DPI, layout="constrained")
    loss_ax, score_ax = fig.subplots(1, 2)
    for ax, group, ylabel in ((loss_ax, losses, "loss"), (score_ax, scores, "validation score")):
        for key in group:
            ax.plot(*_history_series(history, key), marker="o", ms=3, label=key)
        ax.set(xlabel="epoch", ylabel=ylabel)
        if group:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not in the history", ha="center", transform=ax.transAxes)
    loss_ax.set_title("Training curves: loss")
    score_ax.set_title("Training curves: validation metrics")
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG (no Software tag: the file carries no URL and no version noise)."""
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

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


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(headers: list[str], rows: list[list[Any]], left: int = 1) -> str:
    """An HTML table; the first ``left`` columns are text (left-aligned), the rest numbers."""
    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{html.escape(_fmt(v))}</{tag}>"

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
            f"prior ({html.escape(_prior_text(next(iter(evals.values())).meta))}): as-served "
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
    prior = _prior_text(next(iter(evals.values())).meta)
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
         _short_vector(prior)],
        ["model prior", _short_vector(meta.model_prior)],
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
            f"served probabilities. Mean over corruptions {_fmt(rob['mean_corrupted_balanced_accuracy'])}"
            f"; worst {html.escape(worst['corruption'])} at severity {worst['severity']}: "
            f"{_fmt(worst['value'])}.</p>"
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


def write_figures(ev: BundleEvaluation, history: list[dict[str, Any]] | None,
                  out_dir: Path) -> list[tuple[str, Path, str]]:
    """Draw every figure of ``ev`` into ``out_dir``; return (title, png path, caption)."""
    m, names = ev.metrics, ev.meta.class_names
    specs: list[tuple[str, str, Figure | None, str]] = [
        ("Confusion matrix", "confusion_matrix.png",
         plot_confusion_matrix(m[CONFUSION_MATRIX], m[CONFUSION_MATRIX_NORMALIZED], names),
         "rows are true classes; colour is the fraction of each true class (recall on the "
         "diagonal)"),
        ("Per-class recall and F1 vs training frequency", "per_class_vs_frequency.png",
         plot_per_class_vs_frequency(names, ev.meta.train_class_counts, m[PER_CLASS_RECALL],
                                     m[PER_CLASS_F1]),
         "classes ordered from head to tail; the black line is the training count"),
        ("ROC and precision-recall curves", "roc_pr_curves.png",
         plot_roc_pr(ev.preds.labels, ev.probs, names, m),
         "one-vs-rest per class, from the served probabilities"),
        ("Reliability before and after temperature scaling", "reliability.png",
         plot_reliability(m[SPLIT_PRIOR_CALIBRATION]),
         "15 equal-width confidence bins, prior corrected to this split's own class mix so "
         "that the plot shows calibration alone; bars below the diagonal mean "
         "over-confidence"),
        ("Training curves", "training_curves.png",
         plot_training_curves(history) if history else None, "per epoch, from the training run"),
    ]
    out = []
    for title, file, fig, caption in specs:
        if fig is not None:
            out.append((title, save_png(fig, out_dir / file), caption))
    return out


# ---------------------------------------------------------------------------------------------
# model card
# ---------------------------------------------------------------------------------------------


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
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
               else f"the `{_prior_text(meta)}` class prior")
    out.append(f"Probabilities assume {assumed}. If the deployment's class mix differs, set "
               "`deployment_prior` in bundle.json (balanced, train or a vector): serving and "
               "evaluation apply it the same way.")
    out.append("Temperature scaling was fitted on the validation split: calibration holds for "
               "data distributed like it, and degrades under distribution shift.")
    if ev.preds.skipped:
        out.append(f"{ev.preds.skipped} corrupt {ev.split} images could not be decoded and are "
                   "not counted.")
    return out


def _short_vector(values: Sequence[float], limit: int = 12) -> str:
    shown = ", ".join(f"{v:.3g}" for v in values[:limit])
    return shown + (f", … ({len(values)} values)" if len(values) > limit else "")


def _prior_text(meta: BundleMeta) -> str:
    p = meta.deployment_prior
    return p if isinstance(p, str) else f"[{_short_vector(p)}]"


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
            f"- {rob['split']} balanced accuracy clean {_fmt(rob['clean'][BALANCED_ACCURACY])}, "
            f"mean over {len(rob['corruptions'])} corruptions x 3 severities "
            f"{_fmt(rob['mean_corrupted_balanced_accuracy'])}, worst {worst['corruption']} "
            f"(severity {worst['severity']}) {_fmt(worst['value'])}; details in "
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
        f"{_fmt(manifest.imbalance_ratio, 1)})",
        "- Class counts per split (the training counts are the model's prior):",
        "", _md_table(["class", *splits], count_rows),
        "## Metrics",
        "", _md_table(["metric", *evals], metric_rows),
        "## Calibration",
        f"- Temperature T = {meta.temperature:.4f} (logits / T, fitted on val by minimising NLL "
        "with the prior corrected to the val class mix)",
        *_fit_lines(evals),
        f"- Deployment prior: `{_prior_text(meta)}`; model prior: "
        f"{', '.join(f'{p:.3g}' for p in meta.model_prior)}",
        f"- Decision threshold (binary): {_fmt(meta.decision_threshold)}",
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


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def _evaluate_splits(bundle: Path, data_root: str, split: str, prior: Any,
                     shots: ShotThresholds, manifest: Manifest) -> dict[str, BundleEvaluation]:
    """The requested split first, plus val (for the calibration table) when it exists."""
    evals = {split: run_evaluation(bundle, data_root, split, prior, shots)}
    if split != VAL and VAL in manifest.splits and manifest.num_rows[VAL] > 0:
        evals[VAL] = run_evaluation(bundle, data_root, VAL, prior, shots)
    return evals


def write_report(bundle_dir: str | Path, data_root: str, out_dir: str | Path,
                 history: list[dict[str, Any]] | None = None, *, split: str = TEST,
                 prior: str | list[float] | None = None,
                 shot_thresholds: ShotThresholds | tuple[int, int] = ShotThresholds(),
                 calibrate: bool = True, threshold_mode: ThresholdMode = "max_f1",
                 target_recall: float = 0.9, robustness: bool = False,
                 robustness_seed: int = 0) -> Path:
    """Evaluate a bundle and write the full report; return the path of ``report.html``.

    Writes into ``out_dir``: ``metrics.json`` + ``predictions.parquet`` (of ``split``), one PNG
    per figure, ``report.html`` (self-contained) and ``model_card.md``. With the bundle's own
    prior (``prior=None``) it also records the val/test metrics in ``bundle.json`` and copies
    ``report.html`` and ``model_card.md`` into the bundle folder.

    Args:
        history: per-epoch dicts (``epoch``, ``train_loss``, ``val_loss``, ``val_macro_f1``, ...)
            for the training curves; None leaves that figure out.
        calibrate: first fit temperature (and binary threshold) on val and store them in the
            bundle (``calibrate_bundle``; deterministic, so re-running changes nothing).
        prior: evaluate under another deployment prior (not recorded in the bundle).
        robustness: also score corrupted copies of ``split`` (``imgpipe.robustness``):
            ``robustness.json``, ``robustness.png``, a report section and a card line.
    Raises:
        BundleError, ManifestError, ValueError: as ``run_evaluation`` / ``calibrate_bundle``.
    """
    bundle = resolve_bundle_dir(bundle_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shots = ShotThresholds(*shot_thresholds)
    prior = parse_prior(prior)
    if calibrate:
        calibrate_bundle(bundle, data_root, threshold_mode=threshold_mode,
                         target_recall=target_recall)
    manifest = load_manifest(data_root)
    evals = _evaluate_splits(bundle, data_root, split, prior, shots, manifest)
    main = evals[split]
    write_evaluation(main, evaluation_payload(main, bundle, data_root, shots), out)
    figures = write_figures(main, history, out)
    rob = None
    if robustness:
        from imgpipe.robustness import write_robustness

        rob = write_robustness(load_predictor(bundle, prior), data_root, split, out,
                               seed=robustness_seed)
    page = render_html(evals, split, figures, shots, data_root, history_missing=not history,
                       robustness=rob)
    report = out / REPORT_FILE
    report.write_text(page, encoding="utf-8")
    card = out / MODEL_CARD_FILE
    card.write_text(render_model_card(main.meta, manifest, evals, split, shots, rob),
                    encoding="utf-8")
    if prior is None:
        recorded = {s: bundle_block(e.metrics) for s, e in evals.items() if s in (VAL, TEST)}
        if recorded:
            update_bundle_meta(bundle, metrics=recorded)
        shutil.copyfile(report, bundle / REPORT_FILE)
        shutil.copyfile(card, bundle / MODEL_CARD_FILE)
    return report
