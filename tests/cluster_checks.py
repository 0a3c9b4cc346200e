"""Offline checks of the cluster configs in ``cluster/`` (used by tests/test_cluster_configs.py).

- ``validate_launcher_config`` runs Ray's own cluster-launcher validation (the same
  ``prepare_config`` + ``validate_config`` that ``ray up`` runs before it touches a cloud API,
  from ``ray.autoscaler._private``), plus the one rule Ray leaves out (a node type's
  ``min_workers`` above its ``max_workers``).
- ``check_rayjob`` / ``check_rayservice`` check KubeRay manifests structurally (no CRD schema is
  available offline) and validate an embedded ``serveConfigV2`` with ``ServeDeploySchema``.

Test code, not product code: nothing in imgpipe needs it at run time.
"""

from __future__ import annotations

import copy
import importlib.metadata
import shlex
from pathlib import Path
from typing import Any

import yaml

from imgpipe.errors import UserError

RAY_API_VERSION = "ray.io/v1"
GPU_RESOURCE = "nvidia.com/gpu"


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
