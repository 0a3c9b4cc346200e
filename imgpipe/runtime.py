"""Connecting to Ray and planning resources before any work starts."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray
from ray._common.utils import get_default_ray_temp_dir

from imgpipe.errors import UserError

# Ray Data's read planning needs one whole free logical CPU beside the train workers
# (shared/ray-2.60-notes.md): plans keep it free or the run hangs instead of failing.
DATA_CPU_RESERVE = 1.0
DRIVER_CPU = 0.01
# How long a Ray address that was asked for may take to accept a connection.
CONNECT_TIMEOUT_S = 10.0
# Ray's State API reads this before searching the machine for "the" Ray instance.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
# Defaults for an instance imgpipe starts on one machine (a user's own value wins). Every new
# worker process pays ~1 s for Ray and 3-8 s for torch/Ray Data/Train imports, and on a laptop
# that, not the training, is most of a short run's fixed cost (benchmarks/train_bench.py):
LOCAL_INSTANCE_ENV = {
    # Parquet footers are read by a pool of 32 actor processes per read_parquet by default
    # (made for listing thousands of S3 files); a split's few local shards need one.
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    # Idle task workers above the CPU count are killed after 1 s by default, so the worker
    # that imported torch for the decode is gone before the first epoch's map task, and every
    # Tune trial starts cold. 60 s keeps them for the next step, then frees the memory.
    "RAY_idle_worker_killing_time_threshold_ms": "60000",
    # Train's preemption watcher (one more actor process per run) polls for cloud nodes being
    # drained; a single machine is never drained.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # The raylet starts one idle worker per CPU when the first driver connects, with no
    # runtime env; every task and actor of ours carries one (the setup hook below), so those
    # processes never run anything and only take CPU from the start-up.
    "RAY_prestart_worker_first_driver": "0",
}


class ResourcePlanError(UserError, RuntimeError):
    """The requested workers/trials cannot fit the cluster; the message says what to change."""


class RayUnreachableError(UserError):
    """The Ray address asked for does not answer (e.g. a head killed with SIGKILL)."""


def init_ray(address: str | None = None, num_cpus: int | None = None,
             connect_timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    """Connect to ``address`` / ``$RAY_ADDRESS``, or start a local instance.

    Returns True when this call started a fresh local instance (no address), False when it
    connected to one or Ray was already initialised.

    An address that was asked for is probed first (``check_reachable``), so a dead head fails
    within ``connect_timeout_s`` with the address and the fix, instead of Ray retrying it
    forever. With no address a fresh local instance starts (``address="local"``): Ray would
    otherwise reuse the head recorded in its temp folder, which may be long dead.

    Locally, logical CPUs are at least 4 even on a 2-core machine: train workers, Data tasks
    and the driver are time-sliced, and Data's read step needs a whole free logical CPU.
    The dashboard (bound to 127.0.0.1) stays on because Tune relies on the State API to clean
    up placement groups of stopped trials.

    Raises:
        RayUnreachableError: the address asked for does not answer.
    """
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    # The probe comes first even when this process is already connected: a dead address the
    # user asked for must fail, not silently run on whatever instance happens to be up.
    if address and address != "local":
        check_reachable(address, connect_timeout_s)
    if ray.is_initialized():
        return False
    if address and address != "local":
        ray.init(address=address)
        return False
    start_local_ray(num_cpus=num_cpus or max(os.cpu_count() or 1, 4), configure_logging=False)
    return True


def start_local_ray(**init_kwargs) -> None:
    """Start a fresh local Ray instance whose State API every process of it can find.

    Train V2's placement-group cleaner (an actor) queries the State API without an address. With
    a second Ray instance on the machine (a test session, another user's job) that lookup
    fails ("Found multiple active Ray instances"), the cleanup never runs, and the leaked
    bundles starve Ray Data: the next run hangs. Ray reads ``RAY_API_SERVER_ADDRESS`` first,
    and the raylet (hence every worker) inherits the environment it is started with, so naming
    this instance's dashboard there (on a port chosen here, bound to 127.0.0.1) pins the lookup
    for every process of the instance.

    This process drops the variable again once the instance is up: Ray also lets it override
    an explicit address (``JobSubmissionClient(address)``, ``ray job submit --address``), and
    a driver may well talk to another cluster.

    The instance's processes also inherit :data:`LOCAL_INSTANCE_ENV` (unless already set), and
    each worker runs ``imgpipe.logs.quiet_worker_loggers`` as it starts (Ray's
    ``worker_process_setup_hook``) unless ``init_kwargs["runtime_env"]`` names its own hook.

    ``init_kwargs`` go to ``ray.init`` (``num_cpus``, ``object_store_memory``, ...).
    """
    for key, value in LOCAL_INSTANCE_ENV.items():
        os.environ.setdefault(key, value)
    port = free_port()
    with _api_server_env(f"http://127.0.0.1:{port}"):
        # a copy, nested dicts too: Ray writes its own variables into the env_vars it is given
        runtime_env = {"worker_process_setup_hook": "imgpipe.logs.quiet_worker_loggers",
                       **{k: dict(v) if isinstance(v, dict) else v
                          for k, v in (init_kwargs.pop("runtime_env", None) or {}).items()}}
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, runtime_env=runtime_env, **init_kwargs)


def train_worker_runtime_env(*, tune_trial: bool = False, ray_train: bool = True) -> dict:
    """The runtime env Ray Train gives its controller and workers (in a Tune trial: on top of
    the trial actor's; ``ray_train=False``: the trial actor's alone, where a one-worker trial
    trains), for tasks that should share their worker processes.

    Ray Train adds ``env_vars`` to its actors (the ``RAY_TRAIN_*`` variables set in this
    process, and ``RAY_WARN_BLOCKING_GET_INSIDE_ASYNC=0``), Tune adds its own to a trial's actor
    (``PL_DISABLE_FORK=1``, and the variables it propagates), and the Ray Data tasks a train
    worker launches inherit them. A worker process only runs tasks of the runtime env it was
    started with, so the decode tasks the driver launches, with the job's runtime env, could not
    pass their warm processes (torch, PIL, Ray Data imported) to the stream's map tasks: each run
    started one more cold process. Tasks given this env land in the same pool.

    Returns ``{"env_vars": {name: value}}``, mirroring Ray 2.60's
    ``DataParallelTrainer._initialize_and_run_controller`` and Tune's ``_ActorClassCache``;
    ``{}`` where those internals are missing (tasks then keep the job's env: correct, colder).
    """
    try:
        from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
        from ray.train.v2._internal.constants import (
            DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
            get_env_vars_to_propagate,
        )
        env_vars: dict[str, str] = {}
        if tune_trial:  # imported only here: a train run need not pay for importing Tune
            from ray.tune.execution.class_cache import DEFAULT_ENV_VARS, ENV_VARS_TO_PROPAGATE

            env_vars.update(DEFAULT_ENV_VARS)
            env_vars.update({k: os.environ[k] for k in ENV_VARS_TO_PROPAGATE if k in os.environ})
    except ImportError:
        return {}
    if not ray_train:
        return {"env_vars": env_vars}
    env_vars.update(get_env_vars_to_propagate())
    env_vars.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
                        DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
    return {"env_vars": env_vars}


def explicit_address():
    """Within this block ``RAY_API_SERVER_ADDRESS`` is unset, so a client built with an explicit
    address (``JobSubmissionClient(address)``) goes there: Ray would let the variable win, and
    every process of an instance from ``start_local_ray`` inherits it."""
    return _api_server_env(None)


@contextmanager
def _api_server_env(value: str | None) -> Iterator[None]:
    """``RAY_API_SERVER_ADDRESS`` set to ``value`` (None: unset) inside the block, then restored."""
    before = os.environ.pop(API_SERVER_ENV, None)
    if value is not None:
        os.environ[API_SERVER_ENV] = value
    try:
        yield
    finally:
        os.environ.pop(API_SERVER_ENV, None)
        if before is not None:
            os.environ[API_SERVER_ENV] = before


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recorded_address() -> str | None:
    """The head address Ray recorded in its temp folder (``ray_current_cluster``), if any."""
    path = os.path.join(get_default_ray_temp_dir(), "ray_current_cluster")
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise RayUnreachableError unless the GCS at ``address`` accepts a connection in time.

    ``auto`` means the head recorded in Ray's temp folder. ``ray://`` (Ray Client) addresses
    are left to Ray.
    """
    if address.startswith("ray://"):
        return
    target = recorded_address() if address == "auto" else address
    fresh = ("start one with `ray start --head`, or run without --address (and without "
             "RAY_ADDRESS) to start a local instance")
    if target is None:
        raise RayUnreachableError(f"--address auto: no Ray cluster is recorded in "
                                  f"{get_default_ray_temp_dir()}; {fresh}")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnreachableError(f"Ray address {address!r} is not host:port")
    deadline = time.monotonic() + timeout_s
    error: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(
                    2.0, deadline - time.monotonic()))):
                return
        except OSError as e:  # refused (dead head), unreachable host, timeout
            error = e
            time.sleep(0.5)
    recorded = " (the head recorded in Ray's temp folder)" if address == "auto" else ""
    raise RayUnreachableError(
        f"no Ray cluster answers at {target}{recorded} after {timeout_s:g} s ({error}); the "
        f"head has probably died (a killed or OOM-killed head leaves its address behind). "
        f"Restart it with `ray start --head`, point --address/RAY_ADDRESS at a live head, or "
        f"run without --address to start a local instance")


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
