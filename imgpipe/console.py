"""Plain-text tables and result files shared by the jobs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imgpipe.constants import (
    ACCURACY,
    BALANCED_ACCURACY,
    MACRO_F1,
    PER_CLASS_F1,
    PER_CLASS_PRECISION,
    PER_CLASS_RECALL,
)


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([line, "-" * len(line), *body])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.4f}"
    return str(v)


def per_class_table(class_names: list[str], train_counts: list[int],
                    metrics: dict[str, Any]) -> str:
    """Class, training count, precision, recall, F1 — the rare classes at the bottom."""
    rows = [
        [name, n, metrics[PER_CLASS_PRECISION][i], metrics[PER_CLASS_RECALL][i],
         metrics[PER_CLASS_F1][i]]
        for i, (name, n) in enumerate(zip(class_names, train_counts, strict=True))
    ]
    rows.sort(key=lambda r: -r[1])
    summary = (f"accuracy {metrics[ACCURACY]:.4f}  balanced_accuracy "
               f"{metrics[BALANCED_ACCURACY]:.4f}  macro_f1 {metrics[MACRO_F1]:.4f}")
    return format_table(["class", "train_n", "precision", "recall", "f1"], rows) + "\n" + summary


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path
