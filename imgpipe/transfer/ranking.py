"""Rank candidate checkpoints for a target dataset by transferability, before any fine-tuning.

For each candidate: penultimate features of the target's train and val splits (Ray Data batch
inference, ``extract_splits``), then every score of ``imgpipe.transfer.scores``. A candidate
that cannot be used (missing file, architecture mismatch, corrupt weights) gets a row with
the reason and does not stop the others. Candidates are ordered by one primary score; when
fine-tuned results are known, Kendall's τ (SciPy) between each score and them is reported.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgpipe.config import RankConfig
from imgpipe.constants import TRAIN, VAL
from imgpipe.transfer.candidate import CandidateError, load_candidate
from imgpipe.transfer.features import extract_many, extract_splits
from imgpipe.transfer.scores import compute_scores, score_names

RANKING_FILE = "ranking.json"
OK, FAILED = "ok", "failed"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _extract_kwargs(cfg: RankConfig) -> dict[str, Any]:
    return {"num_actors": cfg.num_actors, "cpus_per_actor": cfg.cpus_per_actor,
            "batch_size": cfg.batch_size, "image_size": cfg.image_size, "seed": cfg.seed}


def _loadable(specs: list[str], cfg: RankConfig) -> tuple[list[str], dict[str, str]]:
    """Try every candidate on the driver: (loadable specs, {bad spec: reason})."""
    from imgpipe.data.shards import load_manifest

    target = load_manifest(cfg.data).preprocess(cfg.image_size)
    good, bad = [], {}
    for spec in specs:
        try:
            load_candidate(spec, target, seed=cfg.seed)
            good.append(spec)
        except CandidateError as e:
            bad[spec] = str(e)
        except Exception as e:  # noqa: BLE001 — a broken candidate must not stop the ranking
            bad[spec] = _first_line(e)
    return good, bad


def extract_all(specs: list[str], cfg: RankConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """Features of every loadable candidate in one Ray Data pass: ({spec: split → Features},
    {spec: failure reason}). If the shared pass fails, each candidate is retried alone so one
    broken candidate cannot take the others down."""
    good, bad = _loadable(specs, cfg)
    if not good:
        return {}, bad
    try:
        feats = extract_many(good, cfg.data, (TRAIN, VAL), **_extract_kwargs(cfg))
        return dict(zip(good, feats, strict=True)), bad
    except Exception:  # noqa: BLE001 — isolate the culprit below
        pass
    out = {}
    for spec in good:
        try:
            out[spec] = extract_splits(spec, cfg.data, (TRAIN, VAL), **_extract_kwargs(cfg))
        except Exception as e:  # noqa: BLE001
            bad[spec] = _first_line(e)
    return out, bad


def score_candidate(spec: str, feats: dict[str, Any], cfg: RankConfig) -> dict[str, Any]:
    """One candidate's row from its train/val features: scores and timings."""
    row: dict[str, Any] = {"candidate": spec, "status": OK, "reason": None}
    started = time.perf_counter()
    train, val = feats[TRAIN], feats[VAL]
    wanted = list(dict.fromkeys((cfg.scores or score_names()) + [cfg.primary]))
    try:
        scores, seconds = compute_scores(train, val, wanted)
    except (ValueError, ArithmeticError, MemoryError) as e:
        return {**row, "status": FAILED, "reason": f"scoring failed: {_first_line(e)}"}
    row.update(feature_dim=int(train.features.shape[1]), train_rows=len(train.labels),
               val_rows=len(val.labels), skipped=train.skipped + val.skipped,
               has_source_head=train.source_logits is not None, scores=scores,
               score_s=seconds, total_s=round(time.perf_counter() - started, 2))
    return row


def order_rows(rows: list[dict[str, Any]], primary: str) -> list[dict[str, Any]]:
    """Usable candidates by the primary score (best first), then the failed ones; adds ``rank``."""

    def key(r: dict[str, Any]) -> tuple[int, float]:
        value = (r.get("scores") or {}).get(primary)
        return (0, -value) if r["status"] == OK and value is not None else (1, 0.0)

    ordered = sorted(rows, key=key)
    for i, r in enumerate(ordered, 1):
        r["rank"] = i if key(r)[0] == 0 else None
    return ordered


def kendall_taus(rows: list[dict[str, Any]], finetuned: dict[str, float]) -> dict[str, Any]:
    """Kendall's τ-b (SciPy) between each score and the fine-tuned results, over candidates
    that have both; None where fewer than 3 candidates have the score."""
    from scipy.stats import kendalltau

    taus: dict[str, Any] = {}
    names = [n for n in score_names() if any(n in (r.get("scores") or {}) for r in rows)]
    for name in names:
        pairs = [(r["scores"][name], finetuned[r["candidate"]]) for r in rows
                 if r["status"] == OK and r["scores"].get(name) is not None
                 and r["candidate"] in finetuned]
        if len(pairs) < 3:
            taus[name] = None
            continue
        tau = kendalltau(*zip(*pairs, strict=True)).statistic
        taus[name] = None if math.isnan(tau) else round(float(tau), 4)
    return taus


def load_finetuned(path: str | None) -> dict[str, float]:
    """``{candidate: fine-tuned balanced accuracy}`` from JSON, or {} when not given.

    Raises:
        ValueError: not a JSON object of numbers.
    """
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not all(isinstance(v, int | float) for v in data.values()):
        raise ValueError(f"{path}: expected a JSON object {{candidate: balanced accuracy}}")
    return {str(k): float(v) for k, v in data.items()}


def rank_candidates(cfg: RankConfig,
                    progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Score every candidate, order them, write ``ranking.json`` (and the plot) into ``out``.

    Returns the ranking document. Ray must be initialised (any cluster).
    Raises:
        ManifestError: ``cfg.data`` is not prepared shards (before any candidate is tried).
        ValueError: a bad ``finetuned`` file.
    """
    from imgpipe.data.shards import load_manifest

    started = time.perf_counter()
    manifest = load_manifest(cfg.data)
    finetuned = load_finetuned(cfg.finetuned)
    progress(f"extracting features of {len(cfg.candidates)} candidate(s) (Ray Data, one pass)")
    feats, bad = extract_all(cfg.candidates, cfg)
    extract_s = round(time.perf_counter() - started, 2)
    rows = []
    for spec in cfg.candidates:
        if spec in bad:
            row = {"candidate": spec, "status": FAILED, "reason": bad[spec]}
        else:
            row = score_candidate(spec, feats[spec], cfg)
        if spec in finetuned:
            row["finetuned_balanced_accuracy"] = finetuned[spec]
        progress(f"  {spec}: {_summary(row, cfg.primary)}")
        rows.append(row)
    doc: dict[str, Any] = {
        "config": cfg.model_dump(mode="json"),
        "target": {"classes": manifest.class_names, "train_counts": manifest.counts_vector(TRAIN)},
        "primary": cfg.primary,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "extract_s": extract_s,
        "candidates": order_rows(rows, cfg.primary),
    }
    if finetuned:
        doc["kendall_tau"] = kendall_taus(rows, finetuned)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.plot:
        from imgpipe.transfer.plots import plot_ranking

        doc["plots"] = [str(p) for p in plot_ranking(doc, out)]
    (out / RANKING_FILE).write_text(json.dumps(doc, indent=2))
    return doc


def _summary(row: dict[str, Any], primary: str) -> str:
    if row["status"] != OK:
        return f"FAILED: {row['reason']}"
    value = row["scores"].get(primary)
    shown = "n/a" if value is None else f"{value:.4f}"
    return (f"{primary} {shown}  (D={row['feature_dim']}, {row['train_rows']}+"
            f"{row['val_rows']} rows, scores in {row['total_s']:.1f} s)")
