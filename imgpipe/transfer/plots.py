"""Figures of a ranking: score per candidate, and score vs fine-tuned balanced accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and workers
import matplotlib.pyplot as plt  # noqa: E402

SCORES_PNG = "scores.png"
VS_FINETUNED_PNG = "scores_vs_finetuned.png"


def _short(spec: str, width: int = 28) -> str:
    return spec if len(spec) <= width else "…" + spec[-(width - 1):]


def plot_ranking(doc: dict[str, Any], out: Path) -> list[Path]:
    """Write ``scores.png`` (every score of every usable candidate, each score min-max scaled
    across candidates so they share an axis; the primary score drawn as bars) and, when any
    fine-tuned result is known, ``scores_vs_finetuned.png`` (one panel per score, with τ)."""
    rows = [r for r in doc["candidates"] if r["status"] == "ok"]
    if not rows:
        return []
    names = [n for n in rows[0]["scores"] if any(r["scores"].get(n) is not None for r in rows)]
    primary = doc["primary"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.5))
    x = range(len(rows))
    ax.bar(x, _scaled([r["scores"][primary] for r in rows]), color="#c8d7ea",
           label=f"{primary} (primary)")
    for name in names:
        if name != primary:
            ax.plot(x, _scaled([r["scores"].get(name) for r in rows]), marker="o", lw=1,
                    label=name, alpha=0.8)
    ax.set_xticks(list(x), [_short(r["candidate"]) for r in rows], rotation=30, ha="right")
    ax.set_ylabel("score, min-max scaled over candidates")
    ax.set_title("Transferability by candidate (ranked by the primary score)")
    ax.legend(fontsize=6, ncol=2, loc="upper right")
    fig.tight_layout()
    paths = [out / SCORES_PNG]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    tuned = [r for r in rows if r.get("finetuned_balanced_accuracy") is not None]
    if tuned:
        paths.append(_plot_vs_finetuned(tuned, names, doc.get("kendall_tau") or {}, out))
    return paths


def _scaled(values: list[float | None]) -> list[float]:
    known = [v for v in values if v is not None]
    lo, hi = (min(known), max(known)) if known else (0.0, 1.0)
    span = hi - lo or 1.0
    return [float("nan") if v is None else (v - lo) / span for v in values]


def _plot_vs_finetuned(rows: list[dict[str, Any]], names: list[str], taus: dict[str, Any],
                       out: Path) -> Path:
    cols = 4
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), squeeze=False)
    y = [r["finetuned_balanced_accuracy"] for r in rows]
    for ax, name in zip(axes.flat, names, strict=False):
        xs = [r["scores"].get(name) for r in rows]
        pts = [(a, b, r["candidate"]) for a, b, r in zip(xs, y, rows, strict=True) if a is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18)
        for a, b, label in pts:
            ax.annotate(_short(label, 14), (a, b), fontsize=5)
        tau = taus.get(name)
        ax.set_title(f"{name}  τ={tau:.2f}" if tau is not None else name, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.supylabel("fine-tuned test balanced accuracy", fontsize=8)
    fig.tight_layout()
    path = out / VS_FINETUNED_PNG
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
