"""Cluster helpers: check launcher/KubeRay configs offline, scale up before a run, publish outputs.

Three groups, each usable without a cloud account:

- ``validate_launcher_config`` runs Ray's own cluster-launcher validation (the same
  ``prepare_config`` + ``validate_config`` that ``ray up`` runs before it touches a cloud API),
  plus the one rule Ray leaves out (a node type's ``min_workers`` above its ``max_workers``).
- ``check_rayjob`` / ``check_rayservice`` check KubeRay manifests structurally (no CRD schema is
  available offline) and validate an embedded ``serveConfigV2`` with ``ServeDeploySchema``.
- ``wait_for_resources`` / ``probe_gpu`` / ``publish`` are what the cluster entry points in
  ``cluster/`` call around ``jobs/tune.py``.

Nothing here starts Ray, imports it, or reaches a network at import time.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import shlex
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from imgpipe.errors import UserError

RAY_API_VERSION = "ray.io/v1"
GPU_RESOURCE = "nvidia.com/gpu"
BUNDLE_META = "bundle.json"  # imgpipe.bundle.META_FILE; not imported: that pulls in torch
# runtime_env "excludes" for `ray job submit --working-dir .`: keeps the upload to code. Ray
# matches them gitignore-style against paths under the working dir, so they are anchored with a
# leading "/": a bare "data/" would also drop the files of the imgpipe/data package.
JOB_EXCLUDES = ("/.git", "/data", "/runs", "/bundles", "/reports", "/.venv", "/venv")


class ClusterConfigError(UserError, ValueError):
    """A cluster config or manifest that Ray/KubeRay would reject; the message names the file."""


def ray_version() -> str:
    """The installed Ray version: every image and ``rayVersion`` must match it exactly."""
    return importlib.metadata.version("ray")


def load_yaml(path: str | Path) -> Any:
    """Parse one YAML document, naming the file on syntax errors."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ClusterConfigError(f"{path}: not valid YAML: {e}") from e


# --- Ray cluster launcher --------------------------------------------------------------------


def validate_launcher_config(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Validate a cluster-launcher YAML the way ``ray up`` does, before any cloud call.

    Returns the prepared config (defaults filled in, setup commands merged).

    Raises:
        ClusterConfigError: schema errors (unknown keys, wrong types), a head_node_type that is
            not a node type, global max_workers below the sum of min_workers, or a node type
            whose min_workers exceeds its max_workers.
    """
    where = str(source) if not isinstance(source, dict) else "<config>"
    raw = load_yaml(source) if not isinstance(source, dict) else source
    if not isinstance(raw, dict):
        raise ClusterConfigError(f"{where}: expected a mapping at the top level")
    prepared = _ray_prepare_and_validate(copy.deepcopy(raw), where)
    problems = _min_max_problems(prepared)
    if problems:
        raise ClusterConfigError(f"{where}: " + "; ".join(problems))
    return prepared


def _ray_prepare_and_validate(config: dict[str, Any], where: str) -> dict[str, Any]:
    # Private API, but it is exactly what `ray up` runs (commands._bootstrap_config). Validating
    # the raw YAML without prepare_config fails on the defaults it fills in
    # (cluster_synced_files), so both steps are needed.
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(config)
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        path = ".".join(str(p) for p in e.absolute_path) or "<top level>"
        raise ClusterConfigError(f"{where}: {path}: {e.message}") from e
    except KeyError as e:  # prepare_config indexes required sections directly
        raise ClusterConfigError(f"{where}: missing required key {e}") from e
    except (ValueError, RuntimeError, AssertionError, NotImplementedError) as e:
        raise ClusterConfigError(f"{where}: {e}") from e
    return prepared


def _min_max_problems(config: dict[str, Any]) -> list[str]:
    # Ray only checks the global max_workers against the sum of min_workers; a node type with
    # min_workers > max_workers is silently clamped to max_workers by the autoscaler.
    problems = []
    for name, node_type in config.get("available_node_types", {}).items():
        lo, hi = node_type.get("min_workers", 0), node_type.get("max_workers", 0)
        if lo > hi:
            problems.append(f"available_node_types.{name}: min_workers {lo} > max_workers {hi}")
    return problems


# --- KubeRay manifests -----------------------------------------------------------------------


def check_rayjob(doc: Any) -> list[str]:
    """Structural problems of a RayJob manifest (empty list: none found)."""
    problems = _kind_problems(doc, "RayJob")
    if problems:
        return problems
    spec = doc.get("spec") or {}
    if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
        problems.append("spec.entrypoint: missing (the command the job runs)")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("spec.shutdownAfterJobFinishes: must be true (GPU nodes cost money)")
    ttl = spec.get("ttlSecondsAfterFinished")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
        problems.append("spec.ttlSecondsAfterFinished: must be an integer >= 0")
    if "runtimeEnvYAML" in spec:
        problems += _runtime_env_problems(spec["runtimeEnvYAML"])
    problems += check_ray_cluster_spec(spec.get("rayClusterSpec"), "spec.rayClusterSpec",
                                       need_gpu_workers=True)
    return problems


def check_rayservice(doc: Any) -> list[str]:
    """Structural problems of a RayService manifest, serveConfigV2 included."""
    problems = _kind_problems(doc, "RayService")
    if problems:
        return problems
    spec = doc.get("spec") or {}
    try:
        parse_serve_config(spec.get("serveConfigV2"))
    except ClusterConfigError as e:
        problems.append(f"spec.serveConfigV2: {e}")
    problems += check_ray_cluster_spec(spec.get("rayClusterConfig"), "spec.rayClusterConfig",
                                       need_gpu_workers=False)
    return problems


def _kind_problems(doc: Any, kind: str) -> list[str]:
    if not isinstance(doc, dict):
        return ["manifest is not a mapping"]
    problems = []
    if doc.get("apiVersion") != RAY_API_VERSION:
        problems.append(f"apiVersion: {doc.get('apiVersion')!r}, expected {RAY_API_VERSION!r}")
    if doc.get("kind") != kind:
        problems.append(f"kind: {doc.get('kind')!r}, expected {kind!r}")
    meta = doc.get("metadata") or {}
    if not (meta.get("name") or meta.get("generateName")):
        problems.append("metadata.name: missing")
    if not isinstance(doc.get("spec"), dict):
        problems.append("spec: missing")
    return problems


def _runtime_env_problems(text: Any) -> list[str]:
    try:
        env = yaml.safe_load(text) if isinstance(text, str) else None
    except yaml.YAMLError as e:
        return [f"spec.runtimeEnvYAML: not valid YAML: {e}"]
    return [] if isinstance(env, dict) else ["spec.runtimeEnvYAML: must be a YAML mapping"]


def check_ray_cluster_spec(spec: Any, where: str, need_gpu_workers: bool) -> list[str]:
    """Problems of a RayCluster spec (RayJob.rayClusterSpec, RayService.rayClusterConfig).

    Checks the pinned ``rayVersion`` and images, the head group, worker group bounds, and (when
    ``need_gpu_workers``) that some worker group asks Kubernetes for ``nvidia.com/gpu``.
    """
    if not isinstance(spec, dict):
        return [f"{where}: missing"]
    version = ray_version()
    problems = []
    if str(spec.get("rayVersion")) != version:
        problems.append(f"{where}.rayVersion: {spec.get('rayVersion')!r}, expected {version!r}")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        problems.append(f"{where}.headGroupSpec: missing")
    else:
        problems += _pod_problems(head, f"{where}.headGroupSpec", version)
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        return problems + [f"{where}.workerGroupSpecs: missing or empty"]
    for i, group in enumerate(groups):
        problems += _worker_group_problems(group, f"{where}.workerGroupSpecs[{i}]", version)
    if need_gpu_workers and not any(_group_gpus(g) >= 1 for g in groups):
        problems.append(f"{where}.workerGroupSpecs: no group has a {GPU_RESOURCE} limit")
    autoscales = any(g.get("minReplicas", 0) != g.get("maxReplicas", 0) for g in groups)
    if autoscales and spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{where}.enableInTreeAutoscaling: must be true when replicas vary")
    return problems


def _pod_problems(group: dict[str, Any], where: str, version: str) -> list[str]:
    if not isinstance(group.get("rayStartParams", {}), dict):
        return [f"{where}.rayStartParams: must be a mapping"]
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers")
    if not isinstance(containers, list) or not containers:
        return [f"{where}.template.spec.containers: missing"]
    problems = []
    for c in containers:
        image = str(c.get("image", ""))
        if version not in image.rpartition(":")[2]:
            problems.append(f"{where}: image {image!r} is not pinned to ray {version}")
    return problems


def _worker_group_problems(group: Any, where: str, version: str) -> list[str]:
    if not isinstance(group, dict):
        return [f"{where}: not a mapping"]
    problems = [] if group.get("groupName") else [f"{where}.groupName: missing"]
    lo, hi = group.get("minReplicas", 0), group.get("maxReplicas")
    if not isinstance(hi, int) or not isinstance(lo, int) or lo > hi:
        problems.append(f"{where}: needs integer minReplicas <= maxReplicas (got {lo}, {hi})")
    elif not lo <= group.get("replicas", lo) <= hi:
        problems.append(f"{where}.replicas: outside [minReplicas, maxReplicas]")
    return problems + _pod_problems(group, where, version)


def _group_gpus(group: Any) -> float:
    if not isinstance(group, dict):
        return 0.0
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
    limits = [((c.get("resources") or {}).get("limits") or {}) for c in containers]
    return sum(float(lim.get(GPU_RESOURCE, 0)) for lim in limits)


def parse_serve_config(text: Any):
    """Parse a Serve config (``serveConfigV2`` / ``serve deploy`` format) and validate it.

    Returns a ``ray.serve.schema.ServeDeploySchema``.

    Raises:
        ClusterConfigError: not a YAML string, or rejected by ``ServeDeploySchema`` (for example
            a runtime_env working_dir that is a local path rather than a remote URI).
    """
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(text, str):
        raise ClusterConfigError("must be a YAML string (a block scalar: `serveConfigV2: |`)")
    try:
        return ServeDeploySchema.model_validate(yaml.safe_load(text))
    except yaml.YAMLError as e:
        raise ClusterConfigError(f"not valid YAML: {e}") from e
    except ValidationError as e:
        raise ClusterConfigError(str(e)) from e


def entrypoint_scripts(entrypoint: str) -> list[str]:
    """The script paths an entrypoint runs with ``python``, in order.

    ``"cd /x && python jobs/tune.py --a 1 && python cluster/publish.py"`` →
    ``["jobs/tune.py", "cluster/publish.py"]``.
    """
    lexer = shlex.shlex(entrypoint, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    scripts, after_python = [], False
    for tok in lexer:
        if Path(tok).name.startswith("python"):
            after_python = True
        elif after_python and not tok.startswith("-"):  # skip interpreter flags (-u, -X ...)
            if tok.endswith(".py"):
                scripts.append(tok)
            after_python = False
    return scripts


# --- Scaling up before a run -----------------------------------------------------------------


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


# --- Publishing run outputs to shared storage --------------------------------------------------


def find_bundles(root: str | Path) -> list[Path]:
    """Complete bundle versions ``root/<name>/v<N>`` (those holding a ``bundle.json``)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.glob(f"*/v*/{BUNDLE_META}"))


def pack_bundle(bundle_dir: str | Path, zip_path: str | Path) -> Path:
    """Zip a bundle so that Ray's remote ``working_dir`` unpacks it as ``bundles/<name>/v<N>``.

    Ray strips a remote zip's single top-level folder, so the archive holds
    ``<name>-v<N>/bundles/<name>/v<N>/...``: a Serve app whose runtime_env working_dir is this
    zip finds the bundle at the same relative path it has in a local checkout.
    """
    bundle_dir, zip_path = Path(bundle_dir), Path(zip_path)
    name, version = bundle_dir.parent.name, bundle_dir.name
    prefix = Path(f"{name}-{version}") / "bundles" / name / version
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
            zf.write(f, (prefix / f.relative_to(bundle_dir)).as_posix())
    return zip_path


def publish(dest: str, runs: Iterable[str | Path] = (), bundles_root: str | Path | None = None,
            stamp: str | None = None) -> dict[str, Any]:
    """Copy run folders and zipped bundles to ``dest/<stamp>/`` on local disk, s3:// or gs://.

    A job's working directory on a cluster is a temporary copy on one node, so whatever
    ``jobs/tune.py`` writes there (``runs/...``, ``bundles/...``) is lost with the cluster unless
    it is copied out. Each call writes under a fresh UTC timestamp and never overwrites.
    Credentials come from the node (instance role / workload identity), never from arguments.

    Returns the manifest also written as ``dest/<stamp>/published.json``.

    Raises:
        FileExistsError: ``dest/<stamp>`` already exists.
        FileNotFoundError: a run folder does not exist.
    """
    from pyarrow import fs as pafs

    stamp = stamp or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    filesystem, base = pafs.FileSystem.from_uri(_as_uri(dest))
    target = f"{base.rstrip('/')}/{stamp}"
    if filesystem.get_file_info(target).type != pafs.FileType.NotFound:
        raise FileExistsError(f"{_join(dest, stamp)} exists; outputs are never overwritten")
    filesystem.create_dir(target)
    manifest: dict[str, Any] = {"dest": _join(dest, stamp), "runs": {}, "bundles": {}}
    for run in map(Path, runs):
        if not run.is_dir():
            raise FileNotFoundError(f"run folder {run} does not exist")
        # Local filesystems need the folder to exist; object stores ignore this.
        filesystem.create_dir(f"{target}/runs/{run.name}")
        pafs.copy_files(str(run.resolve()), f"{target}/runs/{run.name}",
                        destination_filesystem=filesystem)
        manifest["runs"][str(run)] = _join(dest, stamp, "runs", run.name)
    for bundle in find_bundles(bundles_root) if bundles_root else []:
        rel = f"bundles/{bundle.parent.name}/{bundle.name}.zip"
        _upload_zip(bundle, filesystem, f"{target}/{rel}")
        manifest["bundles"][f"{bundle.parent.name}/{bundle.name}"] = _join(dest, stamp, rel)
    with filesystem.open_output_stream(f"{target}/published.json") as out:
        out.write(json.dumps(manifest, indent=2).encode())
    return manifest


def _upload_zip(bundle: Path, filesystem: Any, path: str) -> None:
    from pyarrow import fs as pafs

    with tempfile.TemporaryDirectory() as tmp:
        local = pack_bundle(bundle, Path(tmp) / "bundle.zip")
        filesystem.create_dir(path.rpartition("/")[0])
        pafs.copy_files(str(local), path, destination_filesystem=filesystem)


def _as_uri(dest: str) -> str:
    # pyarrow wants an absolute local path or a URI; accept relative local paths too.
    return dest if "://" in dest else str(Path(dest).resolve())


def _join(dest: str, *parts: str) -> str:
    return "/".join([dest.rstrip("/"), *parts])
