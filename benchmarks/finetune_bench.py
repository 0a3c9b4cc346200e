"""Fine-tuning modes from an imgpipe-pretrained backbone on digits-lt (rho = 100), side by side.

    python benchmarks/finetune_bench.py [--epochs 12] [--pretrain-epochs 10] [--modes ...]

Does heavy (full) fine-tuning hurt the tail classes, as LIFT (Shi et al., ICML 2024, "Long-Tail
Learning with Foundation Model: Heavy Fine-Tuning Hurts") reports for foundation models? Here:

1. Source: the balanced digits images that digits-lt's long-tailed train split does *not*
   use (same held-out val/test), so the backbone has seen every class, tail included, on
   disjoint images. A ``cnn`` is pretrained on it with the real train job (Ray Train).
2. Target: digits-lt, rho = 100 (104 ... 1 training images per class), balanced test split.
3. Every mode fine-tunes from the same checkpoint with the same recipe (AdamW, plain CE, no
   resampling, the same epochs and lr; ``--weights <ckpt> --finetune MODE``): full,
   linear-probe, partial:2 (last stage + head), bitfit, lora; plus ``scratch`` (random init,
   full training) as the no-transfer baseline.

Prints a table (test balanced accuracy, many/medium/few-shot accuracy, trainable parameters,
wall time) and writes JSON. Absolute times drift on a shared machine; compare within one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from imgpipe.config import TrainConfig
from imgpipe.console import format_table
from imgpipe.constants import BALANCED_ACCURACY, TEST, TRAIN
from imgpipe.data.datasets import load_digits_lt
from imgpipe.data.shards import write_shards
from imgpipe.evaluate import load_checkpoint_model, predict_split
from imgpipe.metrics import confusion_matrix, shot_accuracy
from imgpipe.runtime import init_ray
from imgpipe.training.trainer import run_training

MODES = ("scratch", "full", "linear-probe", "partial:2", "bitfit", "lora")
SPLIT_KW = {"seed": 0, "val_per_class": 20, "test_per_class": 50}


def prepare_source_and_target(root: Path) -> tuple[str, str]:
    """digits-lt (rho 100) and the disjoint balanced source of the same held-out splits."""
    target = load_digits_lt(imbalance_ratio=100, **SPLIT_KW)
    pool = load_digits_lt(imbalance_ratio=None, **SPLIT_KW)
    used = {r["id"] for r in target.splits[TRAIN]}
    source_splits = {**pool.splits, TRAIN: [r for r in pool.splits[TRAIN] if r["id"] not in used]}
    meta = {"seed": 0, "mode": "L"}
    write_shards(str(root / "digits-lt"), target.splits, target.class_names,
                 {**meta, "source": "digits-lt", "imbalance_ratio": 100}, rows_per_shard=64)
    write_shards(str(root / "digits-source"), source_splits, pool.class_names,
                 {**meta, "source": "digits-balanced-disjoint", "imbalance_ratio": None},
                 rows_per_shard=64)
    return str(root / "digits-source"), str(root / "digits-lt")


def train(data: str, out: Path, epochs: int, lr: float, image_size: int, workers: int,
          **model: object) -> dict:
    cfg = TrainConfig.model_validate({
        "data": data, "out": str(out), "epochs": epochs, "num_workers": workers, "batch_size": 32,
        "seed": 0, "metric": "balanced_accuracy", "progress": False,
        "model": {"image_size": image_size, **model},
        "optim": {"name": "adamw", "lr": lr, "weight_decay": 1e-4}})
    return run_training(cfg)


def trainable_parameters(ckpt: str, finetune: str) -> int:
    from imgpipe.models.finetune import apply_finetune

    model, _, meta = load_checkpoint_model(ckpt)
    ft = apply_finetune(model, finetune, meta["train"]["model"].get("lora_rank", 8))
    return sum(p.numel() for p in ft.parameters() if p.requires_grad)


def shot_metrics(result: dict, target: str) -> dict:
    model, pre, meta = load_checkpoint_model(result["best_checkpoint"])
    preds = predict_split(model, pre, target, TEST)
    cm = confusion_matrix(preds.labels, preds.logits.argmax(1), len(meta["class_names"]))
    return shot_accuracy(cm, result["train_counts"])


def _write(path: str, data: dict) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=12, help="fine-tuning epochs per mode")
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers per run")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--out", default="benchmarks/results/finetune_bench.json")
    args = p.parse_args(argv)
    init_ray()
    rows, started, target_counts = [], time.perf_counter(), None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source, target = prepare_source_and_target(root)
        t = time.perf_counter()
        pre = train(source, root / "pretrain", args.pretrain_epochs, args.lr, args.image_size,
                    args.num_workers, name="cnn")
        backbone = pre["best_checkpoint"]
        print(f"pretrained cnn on the disjoint balanced source: test balanced accuracy "
              f"{pre['test'][BALANCED_ACCURACY]:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
        for mode in args.modes:
            t = time.perf_counter()
            kw = {"name": "cnn"} if mode == "scratch" else {"weights": backbone, "finetune": mode}
            res = train(target, root / mode.replace(":", "-"), args.epochs, args.lr,
                        args.image_size, args.num_workers, **kw)
            wall = time.perf_counter() - t
            target_counts = res["train_counts"]
            shots = shot_metrics(res, target)
            row = {"mode": mode, "test_balanced_accuracy": res["test"][BALANCED_ACCURACY],
                   "val_balanced_accuracy": res["val"][BALANCED_ACCURACY],
                   "many_shot_accuracy": shots["many_shot_accuracy"],
                   "medium_shot_accuracy": shots["medium_shot_accuracy"],
                   "few_shot_accuracy": shots["few_shot_accuracy"],
                   "shot_classes": shots["shot_classes"],
                   "trainable_parameters": trainable_parameters(
                       res["best_checkpoint"], "full" if mode == "scratch" else mode),
                   "best_epoch": res["best_epoch"], "wall_time_s": round(wall, 1)}
            rows.append(row)
            print(f"{mode:>12}: test bal acc {row['test_balanced_accuracy']:.4f}  few-shot "
                  f"{row['few_shot_accuracy']:.4f}  ({wall:.0f} s)", flush=True)
            _write(args.out, {"args": vars(args), "rows": rows, "partial": True})
    table = format_table(
        ["mode", "test bal acc", "many", "medium", "few", "trainable", "wall s"],
        [[r["mode"], f"{r['test_balanced_accuracy']:.4f}", f"{r['many_shot_accuracy']:.4f}",
          f"{r['medium_shot_accuracy']:.4f}", f"{r['few_shot_accuracy']:.4f}",
          f"{r['trainable_parameters']:,}", f"{r['wall_time_s']:.0f}"] for r in rows])
    print("\n" + table)
    by = {r["mode"]: r for r in rows}
    verdict = None
    if "full" in by:
        light = [m for m in ("linear-probe", "partial:2", "bitfit", "lora") if m in by]
        best_light = max(light, key=lambda m: by[m]["few_shot_accuracy"]) if light else None
        if best_light:
            diff = by[best_light]["few_shot_accuracy"] - by["full"]["few_shot_accuracy"]
            verdict = {"best_lightweight_mode": best_light, "few_shot_gain_over_full": diff,
                       "full_hurts_tail": bool(diff > 0)}
            print(f"\nfew-shot accuracy, best lightweight mode ({best_light}) minus full: "
                  f"{diff:+.4f} -> full fine-tuning {'hurts' if diff > 0 else 'does not hurt'} "
                  "the tail here (one seed; small test split: 50 images per class)")
    out = _write(args.out, {
        "args": vars(args), "pretrain_test_balanced_accuracy": pre["test"][BALANCED_ACCURACY],
        "target_train_counts": target_counts, "rows": rows, "verdict": verdict,
        "wall_time_s": round(time.perf_counter() - started, 1)})
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
