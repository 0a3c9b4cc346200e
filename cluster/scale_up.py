"""Scale an autoscaling cluster up to N GPUs before a run, and check CUDA works there.

    python cluster/scale_up.py --gpus 4 --timeout-s 1200 && python jobs/tune.py --use-gpu ...

The GPU node types/groups in cluster/ start at zero nodes, and jobs/tune.py checks its resource
plan against the GPUs that exist when it starts. This asks the autoscaler for the GPUs first,
waits for them (bounded), then releases the request so idle nodes can go away after the run.
Run it as part of the job's entrypoint (it connects to the job's cluster).
"""

from __future__ import annotations

import argparse
import sys

from imgpipe.cluster import probe_gpu, wait_for_resources


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gpus", type=int, required=True,
                   help="GPUs the run needs: --max-concurrent x --workers-per-trial x GPUs each")
    p.add_argument("--timeout-s", type=float, default=1200.0,
                   help="give up after this long (new GPU nodes take minutes)")
    p.add_argument("--address", default=None, help="Ray address (default: the job's cluster)")
    p.add_argument("--skip-probe", action="store_true", help="do not run the CUDA check")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.gpus < 1:
        print("error: --gpus must be >= 1", file=sys.stderr)
        return 2
    import ray

    ray.init(address=args.address or "auto", configure_logging=False)
    try:
        print(f"asking the autoscaler for {args.gpus} GPU(s), waiting up to {args.timeout_s:g} s")
        seen = wait_for_resources(args.gpus, args.timeout_s)
        print(f"cluster has {seen:g} GPU(s)")
        if not args.skip_probe:
            print(f"CUDA check: {probe_gpu()}")
    except (TimeoutError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
