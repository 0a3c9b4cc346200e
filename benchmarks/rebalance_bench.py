"""Long-tail recipes side by side: plain CE, logit-adjusted CE, decoupled classifier
re-balancing (cRT, cRT + SMOTE, τ-norm, LWS on the CE model) and balanced MixUp.

    python benchmarks/rebalance_bench.py --datasets digits-lt shapes-lt --seeds 0 1 2 --epochs 10

For every dataset (prepared once, seed 0, ρ = --imbalance-ratio) and training seed it trains
three models with the train job's own code (Ray Train, 1 worker): CE, LA (τ = 1) and MixUp
with class-balanced partners, exports each as a verified bundle, then runs the classifier-only
stage (``jobs/rebalance_classifier.py``'s code) four times on the CE bundle. Reports test
balanced accuracy and many/medium/few-shot accuracy (train count > 100 / 20–100 / < 20) as
mean ± std over seeds, plus wall time (re-balancing rows: CE training + the stage). Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe.config import PrepareConfig, RebalanceConfig, TrainConfig
from imgpipe.console import format_table
from imgpipe.constants import BALANCED_ACCURACY, PER_CLASS_RECALL, SUPPORT, TEST
from imgpipe.data.prepare import prepare
from imgpipe.evaluate import ShotThresholds
from imgpipe.runtime import init_ray
from imgpipe.training.trainer import quiet_data_progress, run_training
from imgpipe.tuning.export import export_bundle

TRAINED = {
    "CE": {},
    "LA (tau=1)": {"loss": {"name": "logit-adjusted", "tau": 1.0}},
    "MixUp balanced": {"mix": {"mixup_alpha": 0.4, "partner": "balanced"}},
}
STAGES = {
    "CE + cRT": {"method": "crt"},
    "CE + cRT + SMOTE": {"method": "crt", "smote": 5},
    "CE + tau-norm": {"method": "tau-norm"},
    "CE + LWS": {"method": "lws"},
}
ORDER = ["CE", "LA (tau=1)", "CE + cRT", "CE + cRT + SMOTE", "CE + tau-norm", "CE + LWS",
         "MixUp balanced"]


def shot_scores(test: dict[str, Any], counts: list[int], t: ShotThresholds) -> dict[str, Any]:
    """Balanced accuracy and many/medium/few-shot accuracy (mean recall of each group)."""
    recall, support = np.asarray(test[PER_CLASS_RECALL]), np.asarray(test[SUPPORT])
    n = np.asarray(counts)
    groups = {"many": n > t.many, "medium": (n >= t.few) & (n <= t.many), "few": n < t.few}
    out: dict[str, Any] = {"balanced_accuracy": test[BALANCED_ACCURACY]}
    for g, members in groups.items():
        scored = members & (support > 0)
        out[g] = float(recall[scored].mean()) if scored.any() else None
    return out


def train_and_export(data: str, work: Path, label: str, seed: int, args) -> tuple[str, dict, float]:
    base = {"data": data, "out": str(work / f"{label}-{seed}"), "epochs": args.epochs,
            "num_workers": 1, "cpus_per_worker": 1.0, "batch_size": 64, "seed": seed,
            "metric": "balanced_accuracy", "progress": False,
            "model": {"image_size": args.image_size}, **TRAINED[label]}
    t0 = time.perf_counter()
    res = run_training(TrainConfig.model_validate(base))
    name = f"b{seed}-" + "".join(ch for ch in label if ch.isalnum())
    bundle, metrics = export_bundle(Path(res["best_checkpoint"]), data, str(work / "bundles"), name)
    return str(bundle), {**metrics, "train_counts": res["train_counts"]}, time.perf_counter() - t0


def run_dataset(dataset: str, root: Path, args, runs: dict[str, list[dict]], save) -> None:
    """Fill ``runs`` (recipe → one entry per seed), calling ``save()`` after every entry so an
    interrupted benchmark still leaves its finished runs in the JSON."""
    data = str(root / dataset)
    prepare(PrepareConfig(dataset=dataset, out=data, imbalance_ratio=args.imbalance_ratio, seed=0))
    from imgpipe.decoupled.stage import rebalance_classifier

    runs.update({k: [] for k in ORDER})
    for seed in args.seeds:
        ce_bundle, ce_s = None, 0.0
        for label in TRAINED:
            bundle, m, secs = train_and_export(data, root, label, seed, args)
            counts = m["train_counts"]
            runs[label].append({"seed": seed, "wall_s": secs,
                                **shot_scores(m[TEST], counts, ShotThresholds())})
            print(f"{dataset} seed {seed} {label}: {runs[label][-1]}", flush=True)
            save()
            if label == "CE":
                ce_bundle, ce_s = bundle, secs
        for label, opts in STAGES.items():
            t0 = time.perf_counter()
            res = rebalance_classifier(RebalanceConfig(
                bundle=ce_bundle, data=data, seed=seed, epochs=args.head_epochs,
                num_actors=1, **opts))
            runs[label].append({"seed": seed, "wall_s": ce_s + time.perf_counter() - t0,
                                "stage_s": time.perf_counter() - t0,
                                **shot_scores(res[TEST], res["train_counts"], ShotThresholds())})
            print(f"{dataset} seed {seed} {label}: {runs[label][-1]}", flush=True)
            save()


def _ms(values: list) -> str:
    v = [x for x in values if x is not None]
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "–"


def table(results: dict[str, dict[str, list[dict]]]) -> str:
    rows = []
    for dataset, runs in results.items():
        done = [k for k in ORDER if runs.get(k)]
        best = max(done, key=lambda k: np.mean([r["balanced_accuracy"] for r in runs[k]]))
        for label in done:
            rs = runs[label]
            rows.append([dataset, label + (" *" if label == best else ""),
                         _ms([r["balanced_accuracy"] for r in rs]), _ms([r["many"] for r in rs]),
                         _ms([r["medium"] for r in rs]), _ms([r["few"] for r in rs]),
                         f"{np.mean([r['wall_s'] for r in rs]):.0f}", len(rs)])
    return format_table(["dataset", "recipe", "test bal. acc", "many-shot", "medium-shot",
                         "few-shot", "wall s", "seeds"], rows)


def print_table(path: str) -> None:
    """Re-print the table of a (possibly partial) JSON written by this script."""
    print(table(json.loads(Path(path).read_text())["results"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["digits-lt", "shapes-lt"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10, help="training epochs per model")
    p.add_argument("--head-epochs", type=int, default=30, help="cRT / LWS epochs on features")
    p.add_argument("--imbalance-ratio", type=float, default=100.0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--out", default="bench-results/rebalance_bench.json")
    args = p.parse_args(argv)
    init_ray()
    quiet_data_progress()
    started = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, list[dict]]] = {}

    def save() -> None:
        out.write_text(json.dumps({"args": vars(args), "total_s": time.perf_counter() - started,
                                   "results": results}, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        for d in args.datasets:
            results[d] = {}
            run_dataset(d, Path(tmp), args, results[d], save)
    save()
    print(table(results))
    print("* = highest mean test balanced accuracy; wall s: re-balancing rows include the CE run")
    print(f"written {out} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
