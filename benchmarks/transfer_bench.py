"""Does the transferability ranking predict fine-tuning? A zoo of real candidates, offline.

    python benchmarks/transfer_bench.py [--out bench-results/transfer] [--epochs 6]

1. Builds a zoo of candidates, all pretrained here by imgpipe's model factory on data this
   machine has (saved as verified bundles): the small CNN on balanced digits (early and late
   checkpoints), on balanced digits at a different image size, on shapes-lt with many classes
   (early and late), on shapes-lt with 3 classes, and a random initialisation.
2. Ranks the zoo on the target digits-lt (ρ = 100) with ``rank_candidates`` (Ray Data batch
   inference + every score) and times it: the system under test.
3. Fine-tunes every candidate on the target with one fixed recipe (all layers, AdamW, class-
   weighted CE; the same seed) and measures test balanced accuracy: the plain alternative a
   user has today (fine-tune everything, then pick), timed side by side.
4. Reports Kendall's τ between each score and the fine-tuned test balanced accuracy, the wall
   times, prints a table and writes ``transfer_bench.json``.

Pretraining and fine-tuning here use one in-process PyTorch loop (not Ray Train) so that the
ground truth for 7 candidates stays affordable on a 2-core machine; the ranking runs on Ray.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imgpipe.bundle import save_bundle  # noqa: E402
from imgpipe.config import PrepareConfig  # noqa: E402
from imgpipe.constants import IMAGE, LABEL, TEST, TRAIN  # noqa: E402
from imgpipe.data.manifest import Manifest, load_manifest  # noqa: E402
from imgpipe.data.prepare import prepare  # noqa: E402
from imgpipe.data.shards import read_split_table  # noqa: E402
from imgpipe.data.transforms import Preprocess, decode_image, normalize  # noqa: E402
from imgpipe.models import create_model  # noqa: E402

IMAGE_SIZE = 16  # small images keep 14 CPU trainings affordable; one candidate uses 32


def load_split(root: str, split: str, pre: Preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    table = read_split_table(root, split)
    x = np.stack([decode_image(b, pre) for b in table[IMAGE].to_pylist()])
    return normalize(torch.from_numpy(x), pre), torch.from_numpy(table[LABEL].to_numpy())


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int,
        class_weights: torch.Tensor | None = None, lr: float = 2e-3,
        snapshots: tuple[int, ...] = ()) -> dict[int, dict[str, torch.Tensor]]:
    """Plain AdamW loop; returns state dicts after the epochs listed in ``snapshots``."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    saved = {}
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx], weight=class_weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch in snapshots:
            saved[epoch] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return saved


def data_sets(work: Path, seed: int) -> dict[str, str]:
    specs = {
        "target": PrepareConfig(dataset="digits-lt", imbalance_ratio=100, seed=seed,
                                out=str(work / "digits-lt")),
        # Balanced digits with the same seed hold out the same val/test images as the target.
        "digits": PrepareConfig(dataset="digits-lt", imbalance_ratio=1, seed=seed,
                                out=str(work / "digits-bal")),
        "shapes20": PrepareConfig(dataset="shapes-lt", num_classes=20, images_per_class=60,
                                  imbalance_ratio=4, image_size=IMAGE_SIZE, seed=seed,
                                  val_per_class=5, test_per_class=5, out=str(work / "shapes20")),
        "shapes3": PrepareConfig(dataset="shapes-lt", num_classes=3, images_per_class=200,
                                 imbalance_ratio=1, image_size=IMAGE_SIZE, seed=seed,
                                 val_per_class=5, test_per_class=5, out=str(work / "shapes3")),
    }
    out = {}
    for name, cfg in specs.items():
        if not (Path(cfg.out) / "manifest.json").is_file():
            prepare(cfg)
        out[name] = cfg.out
    return out


def _save(bundles: Path, name: str, state: dict, manifest: Manifest, pre: Preprocess) -> str:
    n = len(manifest.class_names)
    path = save_bundle(bundles, name, state,
                       architecture={"model": "cnn", "num_classes": n,
                                     "in_channels": pre.channels},
                       preprocess=pre, class_names=list(manifest.class_names),
                       train_class_counts=manifest.counts_vector(TRAIN))
    return str(path)


def build_zoo(data: dict[str, str], bundles: Path, epochs: int, seed: int,
              alt_size: int = 32) -> dict[str, str]:
    """name → bundle folder. Early checkpoints are the same run after 1 epoch. Bundles already
    in ``bundles`` (``--reuse-zoo``) are kept and not retrained."""
    zoo = {}
    runs = [("digits", "digits", IMAGE_SIZE, {1: "digits-early", epochs: "digits-late"}),
            ("digits", "digits", alt_size, {epochs: f"digits-{alt_size}px"}),
            ("shapes20", "shapes20", IMAGE_SIZE, {1: "shapes20-early", epochs: "shapes20-late"}),
            ("shapes3", "shapes3", IMAGE_SIZE, {epochs: "shapes3"})]
    for source, key, size, names in runs:
        have = {n: bundles / n / "v1" for n in names.values() if (bundles / n / "v1").is_dir()}
        if len(have) == len(names):
            zoo.update({n: str(p) for n, p in have.items()})
            print(f"  reusing {', '.join(have)}")
            continue
        manifest = load_manifest(data[key])
        pre = manifest.preprocess(size)
        x, y = load_split(data[key], TRAIN, pre)
        torch.manual_seed(seed)
        model = create_model("cnn", len(manifest.class_names), in_channels=pre.channels)
        started = time.perf_counter()
        snaps = fit(model, x, y, epochs, seed, snapshots=tuple(names))
        print(f"  pretrained cnn on {source} at {size}px: {time.perf_counter() - started:.1f} s")
        for epoch, name in names.items():
            zoo[name] = _save(bundles, name, snaps[epoch], manifest, pre)
    manifest = load_manifest(data["digits"])
    torch.manual_seed(seed + 1)
    import shutil

    shutil.rmtree(bundles / "random-init", ignore_errors=True)
    zoo["random-init"] = _save(bundles, "random-init",
                               create_model("cnn", 10, in_channels=1).state_dict(), manifest,
                               manifest.preprocess(IMAGE_SIZE))
    return zoo


def finetune(bundle: str, target: str, epochs: int, seed: int) -> float:
    """Fine-tune all layers on the target's train split; test balanced accuracy."""
    from imgpipe.transfer.candidate import load_candidate

    manifest = load_manifest(target)
    cand = load_candidate(bundle, manifest.preprocess(IMAGE_SIZE))
    x, y = load_split(target, TRAIN, cand.preprocess)
    xt, yt = load_split(target, TEST, cand.preprocess)
    n = len(manifest.class_names)
    model = cand.model
    model.fc = torch.nn.Linear(model.fc.in_features, n)  # new head for the target classes
    torch.manual_seed(seed)
    torch.nn.init.normal_(model.fc.weight, std=0.01)
    torch.nn.init.zeros_(model.fc.bias)
    counts = torch.bincount(y, minlength=n).clamp(min=1).double()
    weights = (1.0 / counts) / (1.0 / counts).mean()
    fit(model, x, y, epochs, seed, class_weights=weights.float(), lr=1e-3)
    model.eval()
    with torch.no_grad():
        pred = model(xt).argmax(1).numpy()
    return float(balanced_accuracy_score(yt.numpy(), pred))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="bench-results/transfer")
    p.add_argument("--epochs", type=int, default=6, help="pretraining epochs")
    p.add_argument("--finetune-epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alt-size", type=int, default=32, help="the different-image-size member")
    p.add_argument("--reuse-zoo", action="store_true",
                   help="keep zoo bundles built by an earlier run instead of retraining them")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    started = time.perf_counter()
    print("preparing data ...")
    data = data_sets(out / "data", args.seed)
    print("building the zoo ...")
    bundles = out / "bundles"
    if not args.reuse_zoo:
        import shutil

        shutil.rmtree(bundles, ignore_errors=True)
    zoo = build_zoo(data, bundles, args.epochs, args.seed, args.alt_size)
    zoo_s = time.perf_counter() - started

    print(f"fine-tuning {len(zoo)} candidates on digits-lt (rho=100) ...")
    t0 = time.perf_counter()
    finetuned = {}
    for name, path in zoo.items():
        finetuned[path] = finetune(path, data["target"], args.finetune_epochs, args.seed)
        print(f"  {name}: test balanced accuracy {finetuned[path]:.4f}")
    finetune_s = time.perf_counter() - t0
    (out / "finetuned.json").write_text(json.dumps(finetuned, indent=2))

    from imgpipe.config import RankConfig
    from imgpipe.runtime import init_ray
    from imgpipe.transfer.ranking import rank_candidates

    init_ray()
    cfg = RankConfig(data=data["target"], candidates=list(zoo.values()), out=str(out / "rank"),
                     finetuned=str(out / "finetuned.json"), image_size=IMAGE_SIZE)
    t0 = time.perf_counter()
    doc = rank_candidates(cfg)
    rank_s = time.perf_counter() - t0
    report(doc, zoo, finetuned, rank_s, finetune_s, zoo_s, out)
    return 0


def report(doc: dict, zoo: dict[str, str], finetuned: dict[str, float], rank_s: float,
           finetune_s: float, zoo_s: float, out: Path) -> None:
    from imgpipe.console import format_table

    names = {v: k for k, v in zoo.items()}
    taus = doc.get("kendall_tau") or {}
    best = max((t for t in taus.values() if t is not None), default=None)
    rows = [[names[r["candidate"]], r.get("rank"), finetuned[r["candidate"]],
             *(r["scores"].get(s) for s in ("linear_probe_balanced", "knn_balanced", "logme",
                                            "logme_balanced", "leep_balanced", "hscore_balanced"))]
            for r in doc["candidates"] if r["status"] == "ok"]
    print()
    print(format_table(["candidate", "rank", "finetuned_bal_acc", "probe_bal", "knn_bal",
                        "logme", "logme_bal", "leep_bal", "hscore_bal"], rows))
    print()
    print(format_table(["score", "kendall_tau"], sorted(
        ([k, v] for k, v in taus.items()), key=lambda kv: -(kv[1] if kv[1] is not None else -9))))
    print(f"\nranking {len(zoo)} candidates: {rank_s:.1f} s (features {doc['extract_s']:.1f} s)"
          f"; fine-tuning all of them: {finetune_s:.1f} s; zoo built in {zoo_s:.1f} s")
    result = {"candidates": {k: {"bundle": v, "finetuned_test_balanced_accuracy": finetuned[v]}
                             for k, v in zoo.items()},
              "kendall_tau": taus, "best_tau": best,
              "ranking_wall_time_s": round(rank_s, 2), "feature_extraction_s": doc["extract_s"],
              "finetune_all_wall_time_s": round(finetune_s, 2),
              "ranking": doc["candidates"], "primary": doc["primary"]}
    (out / "transfer_bench.json").write_text(json.dumps(result, indent=2))
    print(f"results: {out / 'transfer_bench.json'}")


if __name__ == "__main__":
    sys.exit(main())
