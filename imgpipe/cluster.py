"""Running on a cluster: what a job submission uploads, scaling up before a run, probing GPUs.

``wait_for_resources`` / ``probe_gpu`` are what ``cluster/scale_up.py`` calls before
``jobs/tune.py``. Nothing here starts Ray, imports it, or reaches a network at import time.
(Publishing outputs: ``imgpipe.publish``; offline checks of the configs in ``cluster/`` are
test code: ``tests/cluster_checks.py``.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# runtime_env "excludes" for `ray job submit --working-dir .`: keeps the upload to code. Ray
# matches them gitignore-style against paths under the working dir, so they are anchored with a
# leading "/": a bare "data/" would also drop the files of the imgpipe/data package.
JOB_EXCLUDES = ("/.git", "/data", "/runs", "/bundles", "/reports", "/.venv", "/venv")


def wait_for_resources(
    gpus: int,
    timeout_s: float,
    poll_s: float = 5.0,
    *,
    request: Callable[[list[dict[str, float]]], None] | None = None,
    available: Callable[[], dict[str, float]] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Ask the autoscaler for ``gpus`` one-GPU nodes and wait until the cluster has them.

    Clusters here keep ``min_workers: 0`` GPU nodes, so a run that checks its resource plan
    against ``ray.cluster_resources()`` would see 0 GPUs and refuse to start. The request is
    cleared again before returning (also on timeout): autoscaler requests are sticky, and a
    request left in place would keep the GPU nodes alive after the run.

    Returns the GPU count seen. ``request``/``available`` default to Ray's
    ``request_resources`` / ``cluster_resources`` (the caller must have connected to Ray).

    Raises:
        TimeoutError: the GPUs did not appear within ``timeout_s``.
    """
    if request is None or available is None:
        import ray
        from ray.autoscaler.sdk import request_resources

        request = request or (lambda bundles: request_resources(bundles=bundles))
        available = available or ray.cluster_resources
    request([{"GPU": 1.0}] * gpus)
    deadline = clock() + timeout_s
    try:
        while (seen := float(available().get("GPU", 0))) < gpus:
            if clock() >= deadline:
                raise TimeoutError(
                    f"{seen:g} of {gpus} GPUs after {timeout_s:g} s: check `ray status` / the "
                    "autoscaler log for quota or capacity errors (GPU quotas start at 0 on new "
                    "cloud accounts), or lower --gpus")
            sleep(poll_s)
        return seen
    finally:
        request([])


def probe_gpu() -> dict[str, Any]:
    """Run one 1-GPU task and report its torch/CUDA view, so a driver/wheel mismatch fails here.

    Raises:
        RuntimeError: CUDA is not usable on the GPU node (the message holds what torch saw).
    """
    import ray

    @ray.remote(num_gpus=1, num_cpus=0)
    def _probe() -> dict[str, Any]:
        import torch

        ok = torch.cuda.is_available()
        return {"torch": torch.__version__, "cuda": torch.version.cuda, "available": ok,
                "device": torch.cuda.get_device_name(0) if ok else None}

    info = ray.get(_probe.remote())
    if not info["available"]:
        raise RuntimeError(
            f"CUDA is not usable on a GPU node ({info}): the node's NVIDIA driver must support "
            "the CUDA version of the torch wheel (see cluster/README.md, 'Checks before the "
            "first launch')")
    return info
