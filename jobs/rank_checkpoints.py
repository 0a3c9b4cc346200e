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

from imgpipe.config import resolve_config
from imgpipe.console import format_table
from imgpipe.errors import run_job
from imgpipe.runtime import init_ray
from imgpipe.transfer.ranking import OK, RANKING_FILE, RankConfig, rank_candidates
from imgpipe.transfer.scores import score_names

TABLE_SCORES = ("logme", "logme_balanced", "leep_balanced", "nce_balanced", "hscore_balanced",
                "knn_balanced", "linear_probe_balanced")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="YAML file (RankConfig fields); flags override it")
    p.add_argument("--data", help="prepared target shards (local, s3://, gs://)")
    p.add_argument("--candidates", nargs="+", help="candidate checkpoints (see above)")
    p.add_argument("--out", help="output folder (default runs/rank)")
    p.add_argument("--primary", choices=score_names(),
                   help="score that orders the table (default logme_balanced)")
    p.add_argument("--scores", nargs="+", choices=score_names(), help="subset of scores")
    p.add_argument("--finetuned", help="JSON {candidate: fine-tuned balanced accuracy}: adds "
                   "Kendall's tau per score and the score-vs-accuracy plot")
    p.add_argument("--num-actors", type=int, help="actor-pool size per candidate (default 1)")
    p.add_argument("--cpus-per-actor", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--image-size", type=int,
                   help="decode size for candidates without their own preprocessing (32)")
    p.add_argument("--seed", type=int, help="seeds random:ARCH candidates")
    p.add_argument("--no-plot", dest="plot", action="store_false", default=None)
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
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
    args = vars(get_args_parser().parse_args(argv))
    config_file, address = args.pop("config"), args.pop("address")
    cfg = resolve_config(RankConfig, config_file, {k.replace("-", "_"): v for k, v in args.items()})
    init_ray(address)
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
