"""Connecting to Ray and planning resources before any work starts."""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray

# Ray Data's read planning needs one whole free logical CPU beside the train workers
# (shared/ray-2.60-notes.md): plans keep it free or the run hangs instead of failing.
DATA_CPU_RESERVE = 1.0
DRIVER_CPU = 0.01


class ResourcePlanError(RuntimeError):
    """The requested workers/trials cannot fit the cluster; the message says what to change."""


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` / ``$RAY_ADDRESS``, or start a local instance.

    Locally, logical CPUs are at least 4 even on a 2-core machine: train workers, Data tasks
    and the driver are time-sliced, and Data's read step needs a whole free logical CPU.
    The dashboard (bound to 127.0.0.1) stays on because Tune relies on the State API to clean
    up placement groups of stopped trials.
    """
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    ray.init(num_cpus=num_cpus or max(os.cpu_count() or 1, 4), include_dashboard=True,
             dashboard_host="127.0.0.1", configure_logging=False)


@dataclass(frozen=True)
class ResourcePlan:
    concurrent_runs: int
    workers_per_run: int
    cpus_per_worker: float
    gpus_per_worker: float
    cpus_needed: float
    gpus_needed: float
    cpus_available: float
    gpus_available: float

    def summary(self) -> str:
        return (f"{self.concurrent_runs} run(s) x {self.workers_per_run} worker(s) x "
                f"{self.cpus_per_worker} CPU/{self.gpus_per_worker} GPU + {DATA_CPU_RESERVE} "
                f"CPU for Ray Data = {self.cpus_needed:g} CPU, {self.gpus_needed:g} GPU "
                f"(cluster: {self.cpus_available:g} CPU, {self.gpus_available:g} GPU)")


def plan_resources(workers: int, cpus_per_worker: float, use_gpu: bool,
                   gpus_per_worker: float = 1.0, concurrent_runs: int = 1,
                   cluster: dict[str, float] | None = None) -> ResourcePlan:
    """Check that ``concurrent_runs`` trainings of ``workers`` workers fit, or raise.

    Raises:
        ResourcePlanError: with the numbers and the flags to change.
    """
    cluster = cluster if cluster is not None else ray.cluster_resources()
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    gpw = gpus_per_worker if use_gpu else 0.0
    need_cpu = concurrent_runs * (workers * cpus_per_worker + DRIVER_CPU) + DATA_CPU_RESERVE
    need_gpu = concurrent_runs * workers * gpw
    plan = ResourcePlan(concurrent_runs, workers, cpus_per_worker, gpw, need_cpu, need_gpu,
                        cpus, gpus)
    problems = []
    if need_cpu > cpus + 1e-9:
        problems.append(
            f"needs {need_cpu:g} CPUs but the cluster has {cpus:g}: lower --num-workers / "
            "--workers-per-trial, --max-concurrent or --cpus-per-worker")
    if need_gpu > gpus + 1e-9:
        problems.append(
            f"needs {need_gpu:g} GPUs but the cluster has {gpus:g}: drop --use-gpu, or lower "
            "workers, --max-concurrent or --gpus-per-worker")
    if problems:
        raise ResourcePlanError("resource plan does not fit: " + "; ".join(problems)
                                + f"\n  plan: {plan.summary()}")
    return plan
