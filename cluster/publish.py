"""Copy a run's outputs off the cluster: run folders and zipped bundles to local disk, s3://, gs://.

    python cluster/publish.py --dest s3://YOUR_BUCKET/imgpipe/published \
        --runs runs/tune-1 --bundles bundles

A job's working directory on a cluster is a temporary copy on one node; what jobs/tune.py
writes there is gone with the cluster. This writes under DEST/<UTC timestamp>/ (never
overwriting): runs/<name>/..., bundles/<name>/v<N>.zip (the layout a Serve runtime_env
working_dir needs, see cluster/serve-bundle.yaml) and published.json listing the URIs.
Credentials come from the node (instance profile, service account, IRSA/Workload Identity).
"""

from __future__ import annotations

import argparse
import json
import sys

from imgpipe.publish import publish


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dest", required=True, help="local folder, s3://bucket/prefix, gs://...")
    p.add_argument("--runs", nargs="*", default=[], help="run folders to copy (e.g. runs/tune-1)")
    p.add_argument("--bundles", help="bundle root to publish every bundles/<name>/v<N> from")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not args.runs and not args.bundles:
        print("error: nothing to publish: give --runs and/or --bundles", file=sys.stderr)
        return 2
    try:
        manifest = publish(args.dest, runs=args.runs, bundles_root=args.bundles)
    except (FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(manifest, indent=2))
    if args.bundles and not manifest["bundles"]:
        # The run folders are published, but a tuning job without a bundle has nothing to
        # serve: fail so the job shows up as FAILED rather than silently SUCCEEDED.
        print(f"error: no complete bundle (bundle.json) under {args.bundles}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
