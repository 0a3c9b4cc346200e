"""Re-balance only the classifier of a bundle (decoupled training, Kang et al. ICLR 2020).

    python jobs/rebalance_classifier.py --bundle bundles/digits-lt --data data/digits-lt --method crt
    python jobs/rebalance_classifier.py --bundle bundles/digits-lt/v1 --data data/digits-lt \\
        --method crt --smote 5 --smote-method borderline --out runs/rebalance-crt-smote
    python jobs/rebalance_classifier.py --bundle bundles/digits-lt --data data/digits-lt --method tau-norm

The backbone stays frozen; train and val features are extracted once (Ray Data batch
inference); the new head is written as the next version of the bundle, verified, and described
in its bundle.json / model card. Exit code 2 on a bad configuration, bundle or data folder.
"""

from __future__ import annotations

import argparse
import sys

from imgpipe import storage
from imgpipe.config import RebalanceConfig
from imgpipe.config.cli import add_job_flag, config_parser, parse_job_args
from imgpipe.console import write_json
from imgpipe.errors import run_job
from imgpipe.runtime import init_ray


def get_args_parser() -> argparse.ArgumentParser:
    p = config_parser(RebalanceConfig, __doc__)
    add_job_flag(p, "--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    return p


def _summary(res: dict) -> str:
    lines = [f"new bundle {res['bundle']} ({res['method']}) from {res['source_bundle']}"]
    before = res["source_metrics"].get("test", {})
    for key in ("balanced_accuracy", "macro_f1", "accuracy"):
        was = before.get(key)
        lines.append(f"  test {key:<18} {res['test'][key]:.4f}"
                     + (f"   (source {was:.4f})" if isinstance(was, float) else ""))
    smote = res["rebalance"].get("smote")
    if smote:
        lines.append(f"  SMOTE ({smote['method']}, k={smote['k']}): {smote['rows_before']} → "
                     f"{smote['rows_after']} train feature rows")
        for c in smote["per_class"]:
            if c["note"]:
                lines.append(f"    {c['class_name']}: {c['real']} real, {c['synthetic']} "
                             f"synthetic, {c['duplicated']} duplicated — {c['note']}")
    return "\n".join(lines)


def _main(argv: list[str] | None) -> int:
    # user mistakes (ConfigError, BundleError, ManifestError, ...) are UserErrors: run_job
    # prints them and exits 2; anything else is a bug and keeps its traceback
    cfg, job = parse_job_args(RebalanceConfig, get_args_parser(), argv)
    storage.check_durable({"--out": cfg.out})
    init_ray(job["address"])
    from imgpipe.decoupled.stage import rebalance_classifier

    res = rebalance_classifier(cfg)
    print(_summary(res))
    path = write_json(f"{cfg.out}/results.json", res)
    print(f"wall time {res['timing_s']['total']:.1f} s; results in {path.resolve()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(lambda: _main(argv), "rebalance_classifier")


if __name__ == "__main__":
    sys.exit(main())
