"""Headroom on a long-tailed split: how far the data, not the search, caps balanced accuracy.

    python benchmarks/headroom_bench.py                      # digits-lt, seeds 0-2
    python benchmarks/headroom_bench.py --seeds 0 --epochs 30

On digits-lt (ρ = 100) the three rarest classes have 2, 1 and 1 training images, while val and
test hold 20 and 50 of every class. Balanced accuracy averages the per-class recalls, so those
three classes weigh 3/10 of it whatever the search does. Rows, all scored on test:

* scikit-learn on the raw pixels (native size, no augmentation): ``LogisticRegression``
  with ``class_weight="balanced"`` and a 1-nearest-neighbour classifier: reference learners
  outside imgpipe, deterministic;
* the tune job's two warm-start recipes (``imgpipe.tuning.warm_start.RECIPES``) as one trial
  of the default search trains them (the cnn, one worker, the train job's input size rule and
  augmentation; ``benchmarks/plain.py``), the epoch picked by val macro-F1;
* ``refit on train+val``: the logit-adjusted recipe retrained on train and val together for
  the epoch count the first run picked (AutoGluon's ``refit_full`` protocol: select on val,
  then refit on everything but test). Test stays unseen, but the rare classes get their 20 val
  images: the row says what more rare-class data is worth, next to what search could find.

Prints a per-run table (balanced accuracy, recall of the three rarest classes) and a mean per
row; writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain import DEFAULT_DATA, bench_data, iter_plain_epochs, load_split  # noqa: E402

from imgpipe.config import TrainConfig, resolve_config  # noqa: E402
from imgpipe.console import format_table, write_json  # noqa: E402
from imgpipe.constants import TEST, TRAIN, VAL  # noqa: E402
from imgpipe.data.manifest import load_manifest  # noqa: E402
from imgpipe.training.defaults import resolve_input_size  # noqa: E402
from imgpipe.tuning.space import params_to_overrides  # noqa: E402
from imgpipe.tuning.warm_start import RECIPES  # noqa: E402

REFIT = "refit on train+val (logit-adjusted)"


def _recalls(y: np.ndarray, pred: np.ndarray, k: int) -> list[float]:
    from sklearn.metrics import recall_score

    return [float(r) for r in recall_score(y, pred, labels=list(range(k)), average=None,
                                           zero_division=0)]


def sklearn_rows(data: str) -> list[dict]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    manifest = load_manifest(data)
    pre = manifest.preprocess(manifest.image.height or 32)
    train, test = load_split(data, TRAIN, pre), load_split(data, TEST, pre)
    x, xt = (s.pixels.reshape(len(s.labels), -1) / 255.0 for s in (train, test))
    k = len(manifest.class_names)
    rows = []
    for name, clf in (("scikit-learn LogisticRegression (balanced)",
                       LogisticRegression(max_iter=5000, class_weight="balanced")),
                      ("scikit-learn 1-nearest neighbour", KNeighborsClassifier(1))):
        pred = clf.fit(x, train.labels).predict(xt)
        rows.append({"row": name, "seed": None, "epochs": None,
                     "per_class_recall": _recalls(test.labels, pred, k)})
    return rows


def _config(data: str, recipe: str, seed: int, epochs: int) -> TrainConfig:
    cfg = resolve_config(TrainConfig, None, {
        "data": data, "epochs": epochs, "seed": seed, "model.name": "cnn",
        **params_to_overrides(RECIPES[recipe], len(load_manifest(data).class_names))})
    return resolve_input_size(cfg, load_manifest(data))[0]


def recipe_row(data: str, recipe: str, seed: int, epochs: int) -> dict:
    """One trial-like run, the epoch picked by val macro-F1 (1-based ``epochs`` in the row)."""
    best, pick = None, None
    for e in iter_plain_epochs(_config(data, recipe, seed, epochs), 1, (VAL, TEST)):
        if best is None or e["scores"][VAL]["macro_f1"] > best:
            best, pick = e["scores"][VAL]["macro_f1"], e
    return {"row": recipe, "seed": seed, "epochs": pick["epoch"] + 1,
            "per_class_recall": pick["scores"][TEST]["per_class_recall"]}


def refit_row(data: str, seed: int, epochs: int) -> dict:
    """The logit-adjusted recipe on train+val for ``epochs`` (its cosine schedule over them),
    scored after the last epoch: nothing held out is left to pick by."""
    *_, last = iter_plain_epochs(_config(data, "logit-adjusted", seed, epochs), 1, (TEST,),
                                 train_splits=(TRAIN, VAL))
    return {"row": REFIT, "seed": seed, "epochs": epochs,
            "per_class_recall": last["scores"][TEST]["per_class_recall"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="prepared shards (default: digits-lt)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=16, help="max epochs (the default tune's)")
    p.add_argument("--out", default="bench-results/headroom_bench.json")
    args = p.parse_args(argv)
    data = bench_data(args.data)
    manifest = load_manifest(data)
    counts = manifest.counts_vector(TRAIN)
    rare = sorted(range(len(counts)), key=lambda i: counts[i])[:3]
    runs = sklearn_rows(data)
    for seed in args.seeds:
        for recipe in RECIPES:
            runs.append(recipe_row(data, recipe, seed, args.epochs))
            if recipe == "logit-adjusted":
                runs.append(refit_row(data, seed, runs[-1]["epochs"]))
    for r in runs:
        r["balanced_accuracy"] = float(np.mean(r["per_class_recall"]))
    names = [manifest.class_names[i] for i in rare]
    head = ["row", "seed", "epochs", "test bal. acc",
            *(f"recall {n} ({counts[i]} train)" for n, i in zip(names, rare, strict=True))]
    print(format_table(head, [[r["row"], "" if r["seed"] is None else r["seed"],
                               r["epochs"] or "", f"{r['balanced_accuracy']:.3f}",
                               *(f"{r['per_class_recall'][i]:.2f}" for i in rare)]
                              for r in runs]))
    summary = []
    for name in dict.fromkeys(r["row"] for r in runs):
        rs = [r for r in runs if r["row"] == name]
        summary.append({"row": name, "runs": len(rs),
                        "mean_balanced_accuracy": statistics.mean(r["balanced_accuracy"]
                                                                  for r in rs),
                        "mean_rare_recall": [statistics.mean(r["per_class_recall"][i] for r in rs)
                                             for i in rare]})
    print()
    print(format_table(["row", "runs", "mean test bal. acc", *(f"mean recall {n}" for n in names)],
                       [[s["row"], s["runs"], f"{s['mean_balanced_accuracy']:.3f}",
                         *(f"{v:.2f}" for v in s["mean_rare_recall"])] for s in summary]))
    out = write_json(args.out, {"args": vars(args), "train_counts": counts,
                                "rarest_classes": names, "runs": runs, "summary": summary})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
