"""The report's figures, drawn on ``matplotlib.figure.Figure`` objects (Agg, no pyplot): no
global state, so the tune driver can draw them from any thread."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from imgpipe.constants import (
    EPOCH,
    MACRO_AVERAGE_PRECISION,
    MACRO_ROC_AUC,
    PER_CLASS_AVERAGE_PRECISION,
    PER_CLASS_F1,
    PER_CLASS_RECALL,
    PER_CLASS_ROC_AUC,
)
from imgpipe.evaluate import (
    CONFUSION_MATRIX,
    CONFUSION_MATRIX_NORMALIZED,
    SPLIT_PRIOR_CALIBRATION,
    BundleEvaluation,
)
from imgpipe.report.labels import fmt

# Above this many classes, cell annotations and per-class legends become unreadable.
_MAX_ANNOTATED_CLASSES = 20
_MAX_LEGEND_CLASSES = 12
_DPI = 100





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
               title=f"ROC, one-vs-rest (macro AUC {fmt(metrics[MACRO_ROC_AUC])})")
    pr_ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
              title=f"Precision-recall (macro AP {fmt(metrics[MACRO_AVERAGE_PRECISION])})")
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
