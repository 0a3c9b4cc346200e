"""The imperfect, never-calibrated bundle that ``drift_bench.py`` shows prior adaptation on.

    python benchmarks/drift_bundle.py --data runs/bench/shapes --out runs/drift --epochs 3

Plain cross-entropy, no resampling, a few epochs, temperature left at 1 (no calibration step):
the model keeps the training prior and is not calibrated, which is exactly when the monitor's
EM recalibration and ``--apply-prior`` have something to fix. Trains with the train job's code
(Ray Train, 1 worker), exports a verified bundle to ``OUT/bundles/shapes-ce/v<N>`` and prints
its location and test metrics as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from imgpipe.config import TrainConfig
from imgpipe.runtime import init_ray
from imgpipe.training.trainer import run_training
from imgpipe.tuning.export import export_bundle


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="prepared shapes-lt data")
    p.add_argument("--out", default="runs/drift")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    work = Path(args.out)
    init_ray()
    res = run_training(TrainConfig.model_validate({
        "data": args.data, "out": str(work / "train"), "epochs": args.epochs, "num_workers": 1,
        "cpus_per_worker": 1.0, "batch_size": 64, "seed": args.seed,
        "metric": "balanced_accuracy", "progress": False,
        "model": {"image_size": args.image_size}}))
    bundle, metrics = export_bundle(Path(res["best_checkpoint"]), args.data,
                                    str(work / "bundles"), "shapes-ce")
    print(json.dumps({"bundle": str(bundle),
                      "test_balanced_accuracy": metrics["test"]["balanced_accuracy"],
                      "test_accuracy": metrics["test"]["accuracy"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
