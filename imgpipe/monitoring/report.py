"""Monitor outputs: ``monitor.json``, a console summary, an HTML page, the app's status file.

The HTML page is a Jinja2 template with matplotlib plots embedded as PNG (one self-contained
file): estimated vs training prior per class (with bootstrap CIs), the drift statistic and
p-values over time (``history.jsonl``, one line per monitor pass), and the per-class prediction
rate over the window.
"""

from __future__ import annotations

import base64
import io
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from jinja2 import Environment, select_autoescape  # noqa: E402

from imgpipe import storage
from imgpipe.prediction_log_format import MONITOR_DIR, MONITOR_STATUS_FILE  # noqa: E402

HISTORY_FILE = "history.jsonl"
_TEMPLATE = """<!doctype html>
<html><head><meta charset="utf-8"><title>imgpipe monitor — {{ r.bundle.name }} v{{ r.bundle.version }}</title>
<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}.alarm{color:#b00;font-weight:bold}.ok{color:#070}</style></head><body>
<h1>{{ r.bundle.name }} v{{ r.bundle.version }} — monitor</h1>
<p>Window: {{ r.window.rows }} served images, {{ r.window.start }} … {{ r.window.end }}
({{ r.window.files_read }} log files read, {{ r.window.files_skipped|length }} skipped).</p>
<p class="{{ 'alarm' if r.shift_detected else 'ok' }}">
{{ 'SHIFT DETECTED' if r.shift_detected else 'no shift detected' }}
(prior test p = {{ '%.4g'|format(r.label_shift.test.p_value) }},
drift p = {{ '%.4g'|format(r.drift.p_value) if r.drift.available else 'n/a' }}, alarm when
either is below α/2 = {{ r.alpha / 2 }}).</p>
{% if r.alert %}<p class="{{ 'alarm' if r.alert.triggered else 'ok' }}">Retraining criteria:
{{ r.alert.reasons|join('; ') if r.alert.triggered else 'not met' }}</p>{% endif %}
<h2>Label shift</h2><img src="data:image/png;base64,{{ plots.prior }}" width="100%">
<table><tr><th>class</th><th>training</th><th>EM</th><th>EM 95% CI</th><th>BBSE</th>
<th>BBSE 95% CI</th><th>low-conf. share</th><th>recall (held-out)</th></tr>
{% for n in r.bundle.class_names %}<tr><td>{{ n }}</td>
<td>{{ '%.3f'|format(r.label_shift.training_prior[n]) }}</td>
{% for m in ('em', 'bbse') %}{% set e = r.label_shift[m] %}
<td>{{ fmt(e.prior[n]) }}</td><td>{{ fmt(e.ci95_low[n]) }}–{{ fmt(e.ci95_high[n]) }}</td>
{% endfor %}
<td>{{ fmt(r.performance.low_confidence_share[n]) }}</td>
<td>{{ fmt(r.performance.per_class_recall_current[n]) }}</td></tr>{% endfor %}</table>
<p>TV distance from the training prior: EM {{ '%.3f'|format(r.label_shift.em.tv_from_training) }},
BBSE {{ '%.3f'|format(r.label_shift.bbse.tv_from_training) }}; before EM the logged
probabilities were rescaled by a temperature refitted on the reference,
T' = {{ '%.3f'|format(r.label_shift.em_recalibration.temperature) }} (1 = already calibrated).
Expected accuracy under the estimated prior: {{ '%.3f'|format(r.performance.current_rule.accuracy) }}
now, {{ '%.3f'|format(r.performance.with_estimated_prior.accuracy) }} with <code>--apply-prior</code>
(balanced accuracy {{ '%.3f'|format(r.performance.current_rule.balanced_accuracy) }} →
{{ '%.3f'|format(r.performance.with_estimated_prior.balanced_accuracy) }}).</p>
<h2>Embedding drift</h2>{% if r.drift.available %}<p>{{ r.drift.method }}: MMD² =
{{ '%.4g'|format(r.drift.statistic) }}, p = {{ '%.4g'|format(r.drift.p_value) }}
({{ r.drift.n_window }} window vs {{ r.drift.n_reference }} reference rows).</p>
{% else %}<p>{{ r.drift.reason }}</p>{% endif %}
<img src="data:image/png;base64,{{ plots.history }}" width="100%">
<h2>Prediction rate per class</h2><img src="data:image/png;base64,{{ plots.rate }}" width="100%">
{% if r.window.files_skipped %}<h2>Skipped log files</h2><ul>{% for s in r.window.files_skipped %}
<li>{{ s.file }}: {{ s.reason }}</li>{% endfor %}</ul>{% endif %}
</body></html>
"""


def _png(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _num(v: float | None) -> float:
    return np.nan if v is None else float(v)


def _prior_plot(r: dict[str, Any]) -> str:
    names = r["bundle"]["class_names"]
    ls = r["label_shift"]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(10, 3.2))
    ax.bar(x - 0.27, [ls["training_prior"][n] for n in names], 0.27, label="training")
    for off, m in ((0.0, "em"), (0.27, "bbse")):
        v = np.array([ls[m]["prior"][n] for n in names])
        lo = v - np.array([_num(ls[m]["ci95_low"][n]) for n in names])
        hi = np.array([_num(ls[m]["ci95_high"][n]) for n in names]) - v
        err = None if np.isnan(lo).all() else np.clip(np.nan_to_num([lo, hi]), 0, None)
        ax.bar(x + off, v, 0.27, yerr=err, capsize=2, label=f"estimated ({m.upper()})")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("class prior")
    ax.legend()
    return _png(fig)


def _history_plot(history: list[dict[str, Any]]) -> str:
    fig, ax = plt.subplots(figsize=(10, 3))
    t = [h["end"] for h in history]
    ax.plot(t, [h.get("drift_statistic") or np.nan for h in history], "o-", label="MMD²")
    ax.set_ylabel("MMD²")
    ax2 = ax.twinx()
    ax2.semilogy(t, [max(h.get("drift_p_value") or 1.0, 1e-4) for h in history], "s--",
                 color="C1", label="drift p")
    ax2.semilogy(t, [max(h.get("prior_p_value") or 1.0, 1e-4) for h in history], "^--",
                 color="C2", label="prior p")
    ax2.set_ylabel("p-value")
    fig.legend(loc="upper left")
    ax.tick_params(axis="x", rotation=30)
    return _png(fig)


def _rate_plot(r: dict[str, Any]) -> str:
    pr = r["prediction_rate"]
    fig, ax = plt.subplots(figsize=(10, 3.2))
    x = np.arange(len(pr["bin_start"]))
    for name, rates in pr["rate"].items():
        ax.plot(x, [np.nan if v is None else v for v in rates], label=name)
    step = max(1, len(x) // 6)
    ax.set_xticks(x[::step], [s[11:19] for s in pr["bin_start"][::step]])
    ax.set_ylabel("share of predictions")
    ax.legend(ncol=5, fontsize="small")
    return _png(fig)


def status_record(r: dict[str, Any]) -> dict[str, Any]:
    """The compact record for ``history.jsonl`` and the app's ``/metrics`` gauges."""
    return {
        "end": r["window"]["end"], "rows": r["window"]["rows"],
        "estimated_prior": {m: r["label_shift"][m]["prior"] for m in ("em", "bbse")},
        "drift_statistic": r["drift"].get("statistic"), "drift_p_value": r["drift"].get("p_value"),
        "prior_p_value": r["label_shift"]["test"]["p_value"],
        "alert": int(bool((r.get("alert") or {}).get("triggered"))),
        "shift_detected": r["shift_detected"],
        "updated_at": datetime.now(timezone.utc).timestamp(),
    }


def save_outputs(r: dict[str, Any], out: str | Path, log_location: str | None) -> Path:
    """Write monitor.json, append history.jsonl, render monitor.html; publish status.json into
    ``<log>/_monitor/`` for the app's gauges (best effort: the log may be read-only)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "monitor.json").write_text(json.dumps(r, indent=2, default=str) + "\n")
    record = status_record(r)
    with open(out / HISTORY_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
    history = [json.loads(line) for line in (out / HISTORY_FILE).read_text().splitlines()
               if line.strip()][-200:]
    plots = {"prior": _prior_plot(r), "history": _history_plot(history), "rate": _rate_plot(r)}
    env = Environment(autoescape=select_autoescape(default=True))
    html = env.from_string(_TEMPLATE).render(
        r=r, plots=plots, fmt=lambda v: "–" if v is None else f"{v:.3f}")
    (out / "monitor.html").write_text(html)
    if log_location:
        try:
            fs, path = storage.resolve_fs(storage.join(log_location, MONITOR_DIR))
            fs.create_dir(path, recursive=True)
            with fs.open_output_stream(f"{path}/{MONITOR_STATUS_FILE}") as f:
                f.write(json.dumps(record).encode())
        except OSError as e:
            print(f"warning: could not publish the status for /metrics: {e}")
    return out / "monitor.json"


def console_summary(r: dict[str, Any]) -> str:
    """A few readable lines plus a per-class table."""
    ls, perf, w = r["label_shift"], r["performance"], r["window"]
    lines = [
        f"{r['bundle']['name']} v{r['bundle']['version']}: {w['rows']} rows "
        f"({w['start']} … {w['end']}), {w['files_read']} files, "
        f"{len(w['files_skipped'])} skipped, {w['other_model_rows']} rows of other models",
        f"{'SHIFT DETECTED' if r['shift_detected'] else 'no shift detected'}: prior test p = "
        f"{ls['test']['p_value']:.3g}, drift p = "
        + (f"{r['drift']['p_value']:.3g} (MMD² {r['drift']['statistic']:.3g})"
           if r["drift"].get("available") else "n/a"),
        f"TV(estimated, training prior): EM {ls['em']['tv_from_training']:.3f}, "
        f"BBSE {ls['bbse']['tv_from_training']:.3f}; EM recalibration T' = "
        f"{ls['em_recalibration']['temperature']:.3f}",
        f"expected accuracy {perf['current_rule']['accuracy']:.3f} now, "
        f"{perf['with_estimated_prior']['accuracy']:.3f} with --apply-prior; balanced accuracy "
        f"{perf['current_rule']['balanced_accuracy']:.3f} → "
        f"{perf['with_estimated_prior']['balanced_accuracy']:.3f}",
    ]
    width = max(5, *(len(n) for n in r["bundle"]["class_names"]))
    lines.append(f"{'class':<{width}}  train     EM   BBSE  low-conf")
    for n in r["bundle"]["class_names"]:
        low = perf["low_confidence_share"][n]
        lines.append(f"{n:<{width}}  {ls['training_prior'][n]:.3f}  {ls['em']['prior'][n]:.3f}  "
                     f"{ls['bbse']['prior'][n]:.3f}  {'–' if low is None else f'{low:.3f}':>8}")
    if r.get("alert"):
        a = r["alert"]
        lines.append("ALERT: " + "; ".join(a["reasons"]) if a["triggered"]
                     else "retraining criteria not met")
    return "\n".join(lines)
