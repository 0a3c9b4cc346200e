"""Rank candidate checkpoints by transferability to a target dataset, before fine-tuning.

    python jobs/rank_checkpoints.py --data data/digits-lt \
        --candidates bundles/shapes/v1 runs/train-1/best cnn=zoo/x.safetensors random:cnn \
        --out runs/rank

Candidates: a bundle folder, a training checkpoint folder, ARCH=FILE (.safetensors / .pt read
weights-only), or random:ARCH. Penultimate features of the train and val splits come from Ray
Data batch inference (one model load per actor); each candidate gets LogME, LEEP and NCE (when
it has a source head), H-score (Ledoit-Wolf shrinkage), balanced k-NN and linear-probe accuracy
on val, each also class-balanced. A candidate that cannot be loaded is reported with the reason.
Writes ranking.json, scores.png (and scores_vs_finetuned.png with --finetuned) into --out.
"""

from __future__ import annotations

import argparse
import sys

from imgpipe.config import RankConfig
from imgpipe.config.cli import add_job_flag, config_parser, parse_job_args
from imgpipe.console import format_table
from imgpipe.errors import run_job
from imgpipe.runtime import init_ray
from imgpipe.transfer.ranking import OK, RANKING_FILE, rank_candidates

TABLE_SCORES = ("logme", "logme_balanced", "leep_balanced", "nce_balanced", "hscore_balanced",
                "knn_balanced", "linear_probe_balanced")


def get_args_parser() -> argparse.ArgumentParser:
    p = config_parser(RankConfig, __doc__)
    add_job_flag(p, "--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    return p


def format_ranking(doc: dict) -> str:
    """The console table: rank, candidate, primary score first, then the other main scores."""
    primary = doc["primary"]
    cols = [primary] + [s for s in TABLE_SCORES if s != primary]
    tuned = any("finetuned_balanced_accuracy" in r for r in doc["candidates"])
    headers = ["rank", "candidate", *cols] + (["finetuned_bal_acc"] if tuned else []) + ["score_s"]
    rows, failed = [], []
    for r in doc["candidates"]:
        if r["status"] != OK:
            failed.append(f"  FAILED {r['candidate']}: {r['reason']}")
            rows.append(["-", r["candidate"], *(["FAILED"] + ["-"] * (len(cols) - 1)),
                         *(["-"] if tuned else []), "-"])
            continue
        vals = [r["scores"].get(c) for c in cols]
        rows.append([r["rank"], r["candidate"], *("n/a" if v is None else v for v in vals),
                     *([r.get("finetuned_balanced_accuracy", "-")] if tuned else []),
                     r["total_s"]])
    text = format_table(headers, rows)
    if failed:
        text += "\n\nCandidates that could not be ranked:\n" + "\n".join(failed)
    if doc.get("kendall_tau"):
        taus = sorted(((t, n) for n, t in doc["kendall_tau"].items() if t is not None),
                      reverse=True)
        text += "\n\nKendall's tau vs fine-tuned balanced accuracy:\n" + format_table(
            ["score", "tau"], [[n, t] for t, n in taus])
    return text


def _main(argv: list[str] | None) -> int:
    cfg, job = parse_job_args(RankConfig, get_args_parser(), argv)
    init_ray(job["address"])
    doc = rank_candidates(cfg)
    print()
    print(format_ranking(doc))
    print(f"\nwall time {doc['wall_time_s']:.1f} s for {len(cfg.candidates)} candidate(s); "
          f"{cfg.out}/{RANKING_FILE}" + (", " + ", ".join(doc.get("plots", [])) if doc.get(
              "plots") else ""))
    return 0 if any(r["status"] == OK for r in doc["candidates"]) else 1


def main(argv: list[str] | None = None) -> int:
    return run_job(lambda: _main(argv), "rank_checkpoints")


if __name__ == "__main__":
    sys.exit(main())
