"""cluster/: launcher YAMLs pass Ray's own validation, KubeRay manifests are well formed, and the
helpers around a cluster run (scale up, publish a bundle for Serve) do what the configs assume.

Everything here is offline and fast; broken copies of each config prove the checks can fail.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import importlib.metadata
import importlib.util
import json
import re
import shlex
from pathlib import Path

import cluster_checks as cl
import pytest

from imgpipe import cluster
from imgpipe import publish as publishing

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHERS = {"aws": CLUSTER / "aws-gpu.yaml", "gcp": CLUSTER / "gcp-gpu.yaml"}
RAYJOB = CLUSTER / "kuberay" / "rayjob-tune.yaml"
RAYSERVICE = CLUSTER / "kuberay" / "rayservice.yaml"
SERVE_BUNDLE = CLUSTER / "serve-bundle.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
# Files not written yet by their owners; the assertions that need them skip until they land.
PENDING = {"jobs/tune.py", "serving/app.py"}


def _pending_skip(rel: str) -> None:
    if rel in PENDING and not (REPO / rel).exists():
        pytest.skip(f"{rel} does not exist yet (another change adds it)")


def _version(dist: str) -> str:
    return importlib.metadata.version(dist).split("+")[0]  # drop local tags such as +cu130


# --- Ray cluster launcher ---------------------------------------------------------------------


@pytest.fixture(params=sorted(LAUNCHERS), scope="module")
def launcher(request):
    path = LAUNCHERS[request.param]
    return request.param, path, cl.validate_launcher_config(path)


def _node_types(prepared):
    head = prepared["head_node_type"]
    types = prepared["available_node_types"]
    gpu = {n: t for n, t in types.items() if n != head and t["resources"].get("GPU", 0) >= 1}
    return types[head], gpu


def test_launcher_config_passes_rays_validation(launcher):
    cloud, _, prepared = launcher
    assert prepared["provider"]["type"] == cloud
    assert prepared["cluster_synced_files"] == []  # filled in by prepare_config, as in `ray up`


def test_launcher_has_cpu_head_and_gpu_workers_that_scale_from_zero(launcher):
    _, _, prepared = launcher
    head, gpu = _node_types(prepared)
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    assert gpu, "no worker node type advertises a GPU"
    for t in gpu.values():
        assert t["min_workers"] == 0, "idle GPU nodes must go away: min_workers 0"
        assert 1 <= t["max_workers"] <= prepared["max_workers"]
    assert 5 <= prepared["idle_timeout_minutes"] <= 30


def test_launcher_installs_the_pinned_project_on_every_node(launcher):
    _, _, prepared = launcher
    tag = prepared["docker"]["image"].rpartition(":")[2]
    assert tag.startswith(cl.ray_version()) and "gpu" in tag
    assert prepared["file_mounts"] == {"~/imgpipe": "."}
    for cmds in (prepared["head_setup_commands"], prepared["worker_setup_commands"]):
        joined = " ".join(cmds)
        assert "pip install" in joined and "-e ~/imgpipe" in joined
        for dist in ("torch", "torchvision"):
            assert f'"{dist}=={_version(dist)}"' in joined, f"{dist} pin drifted from the dev env"


def test_launcher_dashboard_binds_loopback_and_storage_has_an_identity(launcher):
    cloud, _, prepared = launcher
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    _, gpu = _node_types(prepared)
    key = {"aws": "IamInstanceProfile", "gcp": "serviceAccounts"}[cloud]
    assert all(key in t["node_config"] for t in gpu.values()), "workers need bucket access"


def test_launcher_rsync_excludes_keep_package_folders(launcher):
    # rsync matches a bare pattern against every path component: "data" would drop imgpipe/data.
    _, _, prepared = launcher
    package_dirs = {p.name for top in ("imgpipe", "serving", "jobs", "cluster")
                    for p in (REPO / top).rglob("*") if p.is_dir()} | {"imgpipe", "serving"}
    package_dirs -= {"__pycache__"}
    for pattern in prepared["rsync_exclude"]:
        if "/" not in pattern:
            hits = [d for d in package_dirs if fnmatch.fnmatch(d, pattern)]
            assert not hits, f"rsync_exclude {pattern!r} also drops {hits}; anchor it with '/'"
    assert {"/data", "/runs", "/bundles", "/.git"} <= set(prepared["rsync_exclude"])


SECRET_PATTERNS = [
    r"AKIA[0-9A-Z]{16}", r"aws_secret_access_key", r"aws_access_key_id", r"BEGIN [A-Z ]*PRIVATE KEY",
    r"ssh_private_key", r"gcp_credentials", r"private_key_id", r"RAY_AUTH_TOKEN\s*[:=]",
]


@pytest.mark.parametrize("path", [*LAUNCHERS.values(), RAYJOB, RAYSERVICE, SERVE_BUNDLE],
                         ids=lambda p: p.name)
def test_no_secrets_in_cluster_files(path):
    text = path.read_text()
    for pattern in SECRET_PATTERNS:
        assert not re.search(pattern, text, re.IGNORECASE), f"{path.name}: matches {pattern}"


def _typo_top_level(c):
    c["idle_timout_minutes"] = c.pop("idle_timeout_minutes")


def _typo_in_node_type(c):
    gpu = next(n for n in c["available_node_types"] if n != c["head_node_type"])
    c["available_node_types"][gpu]["min_worker"] = 1


def _global_max_below_min_sum(c):
    gpu = next(n for n in c["available_node_types"] if n != c["head_node_type"])
    c["available_node_types"][gpu]["min_workers"] = 3
    c["max_workers"] = 2


def _node_min_above_max(c):
    gpu = next(n for n in c["available_node_types"] if n != c["head_node_type"])
    c["available_node_types"][gpu].update(min_workers=3, max_workers=1)


def _missing_head_type(c):
    c["head_node_type"] = "no_such_type"


def _fractional_gpu(c):
    gpu = next(n for n in c["available_node_types"] if n != c["head_node_type"])
    c["available_node_types"][gpu]["resources"]["GPU"] = 0.5


def _no_resources(c):
    gpu = next(n for n in c["available_node_types"] if n != c["head_node_type"])
    del c["available_node_types"][gpu]["resources"]


BROKEN_LAUNCHERS = {
    "typo top-level key": (_typo_top_level, "idle_timout_minutes"),
    "typo in a node type": (_typo_in_node_type, "min_worker"),
    "max_workers below sum of min_workers": (_global_max_below_min_sum, "smaller than the sum"),
    "node min_workers above its max_workers": (_node_min_above_max, "min_workers 3 > max_workers 1"),
    "head_node_type not a node type": (_missing_head_type, "must be one of"),
    "fractional GPU resource": (_fractional_gpu, "GPU"),
    "node type without resources": (_no_resources, "resources"),
    "no provider section": (lambda c: c.pop("provider"), "provider"),
}


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
@pytest.mark.parametrize("case", sorted(BROKEN_LAUNCHERS))
def test_broken_launcher_configs_fail_validation(cloud, case):
    mutate, message = BROKEN_LAUNCHERS[case]
    config = cl.load_yaml(LAUNCHERS[cloud])
    mutate(config)
    with pytest.raises(cl.ClusterConfigError, match=re.escape(message)):
        cl.validate_launcher_config(config)


def test_raw_yaml_without_prepare_config_is_not_enough():
    # Why validate_launcher_config runs prepare_config first (shared notes): Ray's validator
    # alone rejects a hand-written file for the defaults it lacks.
    from ray.autoscaler._private.util import validate_config

    with pytest.raises(RuntimeError, match="cluster_synced_files"):
        validate_config(cl.load_yaml(LAUNCHERS["aws"]))


# --- KubeRay: RayJob ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayjob():
    return cl.load_yaml(RAYJOB)


def test_rayjob_is_well_formed(rayjob):
    assert cl.check_rayjob(rayjob) == []


def _segments(entrypoint: str) -> list[list[str]]:
    lexer = shlex.shlex(entrypoint, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out: list[list[str]] = [[]]
    for tok in lexer:
        out.append([]) if tok in ("&&", ";", "||") else out[-1].append(tok)
    return [s for s in out if s]


def _flags(segment: list[str]) -> dict[str, str | bool]:
    flags: dict[str, str | bool] = {}
    for i, tok in enumerate(segment):
        if tok.startswith("--"):
            nxt = segment[i + 1] if i + 1 < len(segment) else None
            flags[tok] = nxt if nxt is not None and not nxt.startswith("--") else True
    return flags


def test_rayjob_cluster_scripts_exist(rayjob):
    scripts = cl.entrypoint_scripts(rayjob["spec"]["entrypoint"])
    assert scripts == ["cluster/scale_up.py", "jobs/tune.py", "cluster/publish.py"]
    for rel in scripts:
        if rel not in PENDING:
            assert (REPO / rel).is_file(), rel


def test_rayjob_runs_tune_script_that_exists(rayjob):
    _pending_skip("jobs/tune.py")
    assert (REPO / "jobs" / "tune.py").is_file()


def test_rayjob_commands_parse_with_the_scripts_own_parsers(rayjob):
    # Flag drift (a renamed option) would only show up on a GPU cluster; catch it here.
    _pending_skip("jobs/tune.py")
    from imgpipe.config import TuneJobConfig
    from imgpipe.config.cli import parse_job_args

    for segment in _segments(rayjob["spec"]["entrypoint"]):
        if segment[0] != "python":
            continue
        script, argv = segment[1], segment[2:]
        parser = _load_script(Path(script).stem, REPO / script).get_args_parser()
        if script == "jobs/tune.py":  # what tune.py's main() does before it starts Ray
            assert parse_job_args(TuneJobConfig, parser, argv)[0].use_gpu is True
        else:
            parser.parse_args(argv)


def test_rayjob_runs_in_the_image_code_dir(rayjob):
    first = _segments(rayjob["spec"]["entrypoint"])[0]
    workdir = re.search(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE).group(1)
    assert first == ["cd", workdir], "the entrypoint must run where cluster/Dockerfile puts the code"


def test_rayjob_asks_for_the_gpus_its_plan_needs(rayjob):
    segments = {s[1]: _flags(s) for s in _segments(rayjob["spec"]["entrypoint"]) if s[0] == "python"}
    tune, scale = segments["jobs/tune.py"], segments["cluster/scale_up.py"]
    assert tune["--use-gpu"] is True
    assert str(tune["--storage-path"]).startswith("s3://")
    gpus = int(tune["--max-concurrent"]) * int(tune["--workers-per-trial"]) * float(
        tune["--gpus-per-worker"])
    assert int(scale["--gpus"]) == gpus
    group = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["maxReplicas"] >= gpus
    pod_cpus = float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert float(tune["--cpus-per-worker"]) <= pod_cpus - 1, "leave a CPU for Ray Data"
    publish = segments["cluster/publish.py"]
    assert publish["--runs"] == tune["--out"] and publish["--bundles"] == "bundles"


def _spec(doc):
    return doc["spec"]["rayClusterSpec"]


def _gpu_container(doc):
    return _spec(doc)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def _head_container(doc):
    return _spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]


BROKEN_RAYJOBS = {
    "wrong kind": (lambda d: d.update(kind="RayCluster"), "kind"),
    "old apiVersion": (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
    "no entrypoint": (lambda d: d["spec"].pop("entrypoint"), "spec.entrypoint"),
    "cluster kept after the job": (lambda d: d["spec"].update(shutdownAfterJobFinishes=False),
                                   "shutdownAfterJobFinishes"),
    "no ttl": (lambda d: d["spec"].pop("ttlSecondsAfterFinished"), "ttlSecondsAfterFinished"),
    "no GPU limit": (lambda d: _gpu_container(d)["resources"]["limits"].pop(cl.GPU_RESOURCE),
                     cl.GPU_RESOURCE),
    "unpinned image": (lambda d: _head_container(d).update(image="rayproject/ray:latest-gpu"),
                       "not pinned"),
    "other rayVersion": (lambda d: _spec(d).update(rayVersion="2.9.0"), "rayVersion"),
    "min above max replicas": (lambda d: _spec(d)["workerGroupSpecs"][0].update(minReplicas=9),
                               "minReplicas"),
    "autoscaling off": (lambda d: _spec(d).pop("enableInTreeAutoscaling"),
                        "enableInTreeAutoscaling"),
    "no head group": (lambda d: _spec(d).pop("headGroupSpec"), "headGroupSpec"),
    "runtime env not a mapping": (lambda d: d["spec"].update(runtimeEnvYAML="- a\n- b\n"),
                                  "runtimeEnvYAML"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_RAYJOBS))
def test_broken_rayjobs_are_reported(rayjob, case):
    mutate, message = BROKEN_RAYJOBS[case]
    doc = copy.deepcopy(rayjob)
    mutate(doc)
    problems = cl.check_rayjob(doc)
    assert any(message in p for p in problems), problems


# --- KubeRay: RayService and the Serve config -------------------------------------------------


@pytest.fixture(scope="module")
def rayservice():
    return cl.load_yaml(RAYSERVICE)


def test_rayservice_is_well_formed(rayservice):
    assert cl.check_rayservice(rayservice) == []


def _app(serve_config) -> dict:
    return serve_config.applications[0].model_dump(exclude_unset=True)


def test_rayservice_and_launcher_serve_the_same_app(rayservice):
    k8s = cl.parse_serve_config(rayservice["spec"]["serveConfigV2"])
    launcher = cl.parse_serve_config(SERVE_BUNDLE.read_text())
    for key in ("import_path", "route_prefix", "runtime_env"):
        assert _app(k8s)[key] == _app(launcher)[key], key
    assert _app(k8s)["args"]["bundle"] == _app(launcher)["args"]["bundle"]
    # In-pod binding must be reachable by the Service; on a launcher head, loopback only.
    assert k8s.http_options.host == "0.0.0.0" and launcher.http_options.host == "127.0.0.1"


def test_rayservice_token_comes_from_a_secret_reference(rayservice):
    spec = rayservice["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            token = env.get("IMGPIPE_SERVE_TOKEN")
            assert token and "value" not in token, f"{c['name']}: token must come from a Secret"
            assert token["valueFrom"]["secretKeyRef"]["name"]


def test_launcher_serve_config_pins_replicas_to_the_head():
    app = _app(cl.parse_serve_config(SERVE_BUNDLE.read_text()))
    pinned = {d["name"]: set(d["ray_actor_options"].get("resources", {}))
              for d in app["deployments"]}
    assert pinned and all(pinned.values()), "every deployment needs the head-only resource"
    for path in LAUNCHERS.values():
        prepared = cl.validate_launcher_config(path)
        head = prepared["head_node_type"]
        for name, node_type in prepared["available_node_types"].items():
            offered = set(node_type["resources"])
            for wanted in pinned.values():
                assert wanted <= offered if name == head else not wanted & offered, (path, name)


def test_serve_bundle_arg_matches_the_published_zip_layout(rayservice):
    app = _app(cl.parse_serve_config(rayservice["spec"]["serveConfigV2"]))
    uri, bundle = app["runtime_env"]["working_dir"], app["args"]["bundle"]
    assert uri.startswith(("s3://", "gs://")) and uri.endswith(f"/{bundle}.zip"), (
        "publish.py writes <dest>/<stamp>/bundles/<name>/v<N>.zip, which unpacks to "
        "bundles/<name>/v<N>: the bundle arg must be that relative path")


def test_serve_import_path_names_the_serving_app(rayservice):
    app = _app(cl.parse_serve_config(rayservice["spec"]["serveConfigV2"]))
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("serving.app", "build_app")
    config = REPO / "serving" / "config.yaml"
    if config.exists():
        local = cl.parse_serve_config(config.read_text())
        assert _app(local)["import_path"] == app["import_path"]
    _pending_skip("serving/app.py")
    assert (REPO / "serving" / "app.py").is_file()
    assert callable(getattr(importlib.import_module(module), attr))


@pytest.mark.parametrize("path", [RAYSERVICE, SERVE_BUNDLE], ids=lambda p: p.name)
def test_serve_args_and_deployments_fit_the_app(path):
    _pending_skip("serving/app.py")
    doc = cl.load_yaml(path)
    text = doc["spec"]["serveConfigV2"] if path == RAYSERVICE else path.read_text()
    app = _app(cl.parse_serve_config(text))
    schemas = importlib.import_module("serving.schemas")
    schemas.ServeArgs.model_validate(app["args"])  # the builder's own typed args
    serving_app = importlib.import_module("serving.app")
    known = {serving_app.MODEL_DEPLOYMENT}
    assert {d["name"] for d in app.get("deployments", [])} <= known


BROKEN_RAYSERVICES = {
    "local working_dir": (lambda d: d["spec"].update(serveConfigV2=d["spec"]["serveConfigV2"]
                          .replace("s3://YOUR_BUCKET/imgpipe/published", "published")),
                          "remote URIs"),
    "serve config as a mapping": (lambda d: d["spec"].update(serveConfigV2={"applications": []}),
                                  "YAML string"),
    "serve config not YAML": (lambda d: d["spec"].update(serveConfigV2="applications: [\n"),
                              "not valid YAML"),
    "no cluster config": (lambda d: d["spec"].pop("rayClusterConfig"), "rayClusterConfig"),
    "wrong kind": (lambda d: d.update(kind="RayJob"), "kind"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_RAYSERVICES))
def test_broken_rayservices_are_reported(rayservice, case):
    mutate, message = BROKEN_RAYSERVICES[case]
    doc = copy.deepcopy(rayservice)
    mutate(doc)
    problems = cl.check_rayservice(doc)
    assert any(message in p for p in problems), problems


# --- Image, README ---------------------------------------------------------------------------


def test_dockerfile_pins_ray_python_and_torch():
    text = DOCKERFILE.read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(cl.ray_version())}-py311-gpu$", text,
                     re.MULTILINE)
    for dist in ("torch", "torchvision"):
        assert f'"{dist}=={_version(dist)}"' in text
    for doc in (cl.load_yaml(RAYJOB), cl.load_yaml(RAYSERVICE)):
        assert f"ray{cl.ray_version()}-py311-gpu" in json.dumps(doc)


def test_readme_commands_match_the_configs():
    text = (CLUSTER / "README.md").read_text()
    for needed in ("ray up cluster/aws-gpu.yaml", "ray dashboard cluster/aws-gpu.yaml",
                   "ray job submit --address", "--working-dir .", "-- python jobs/tune.py --use-gpu",
                   "serve deploy cluster/serve-bundle.yaml", "ray down cluster/aws-gpu.yaml",
                   "kubectl apply -f cluster/kuberay/rayjob-tune.yaml"):
        assert needed in text, needed
    assert re.search(r"approximate.*dated 2026.*to be checked", text, re.IGNORECASE | re.DOTALL)
    excludes = json.loads(re.search(r"--runtime-env-json '(\{.*?\})'", text).group(1))["excludes"]
    assert excludes == list(cluster.JOB_EXCLUDES)
    for rel in set(re.findall(r"\bcluster/[\w./-]+\.(?:ya?ml|py)\b", text)):
        assert (REPO / rel).is_file(), f"README mentions {rel}, which does not exist"


def test_job_excludes_drop_outputs_but_keep_the_package():
    # The same matcher `ray job submit --working-dir` uses for runtime_env excludes.
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(REPO, list(cluster.JOB_EXCLUDES))
    for rel in ("data", "data/digits-lt/train/part-0.parquet", "runs/tune-1", "bundles", ".git"):
        assert excluded(REPO / rel), rel
    for rel in ("imgpipe/data", "imgpipe/data/pipeline.py", "jobs/tune.py", "serving/app.py"):
        assert not excluded(REPO / rel), rel


# --- Helpers the entry points call ------------------------------------------------------------


@pytest.mark.parametrize(("entrypoint", "scripts"), [
    ("python jobs/tune.py --a 1", ["jobs/tune.py"]),
    ("cd /x && python -u jobs/a.py --f x.py; python3 cluster/b.py", ["jobs/a.py", "cluster/b.py"]),
    ("python -m imgpipe.x && echo python.py", []),
])
def test_entrypoint_scripts(entrypoint, scripts):
    assert cl.entrypoint_scripts(entrypoint) == scripts


def _fake_bundle(root: Path, name: str, version: str, complete: bool = True) -> Path:
    d = root / name / version
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"\x00weights")
    if complete:
        (d / publishing.BUNDLE_META).write_text(json.dumps({"name": name}))
    return d


def test_published_bundle_unpacks_where_serve_expects_it(tmp_path):
    from ray._private.runtime_env.packaging import unzip_package

    _fake_bundle(tmp_path / "bundles", "digits-lt", "v1")
    _fake_bundle(tmp_path / "bundles", "digits-lt", "v2", complete=False)  # still being written
    run = tmp_path / "runs" / "tune-1"
    run.mkdir(parents=True)
    (run / "results.json").write_text("{}")
    manifest = publishing.publish(str(tmp_path / "out"), runs=[run], bundles_root=tmp_path / "bundles",
                          stamp="20260101-000000")
    assert list(manifest["bundles"]) == ["digits-lt/v1"]
    stamp_dir = tmp_path / "out" / "20260101-000000"
    assert json.loads((stamp_dir / "published.json").read_text()) == manifest
    assert (stamp_dir / "runs" / "tune-1" / "results.json").is_file()
    # Ray's own unpacking of a remote working_dir zip (it strips the single top-level folder).
    zip_copy = tmp_path / "dl.zip"
    zip_copy.write_bytes((stamp_dir / "bundles" / "digits-lt" / "v1.zip").read_bytes())
    unzip_package(str(zip_copy), str(tmp_path / "wd"), remove_top_level_directory=True,
                  unlink_zip=True)
    served = tmp_path / "wd" / "bundles" / "digits-lt" / "v1"
    assert json.loads((served / publishing.BUNDLE_META).read_text()) == {"name": "digits-lt"}
    assert (served / "model.safetensors").read_bytes() == b"\x00weights"
    with pytest.raises(FileExistsError, match="never overwritten"):
        publishing.publish(str(tmp_path / "out"), runs=[run], stamp="20260101-000000")


def test_publish_cli_fails_when_the_run_made_no_bundle(tmp_path, capsys):
    publish_cli = _load_script("publish")
    (tmp_path / "bundles").mkdir()
    run = tmp_path / "run"
    run.mkdir()
    assert publish_cli.main(["--dest", str(tmp_path / "out"), "--runs", str(run),
                             "--bundles", str(tmp_path / "bundles")]) == 1
    assert "no complete bundle" in capsys.readouterr().err
    assert publish_cli.main(["--dest", str(tmp_path / "out")]) == 2


def _load_script(name: str, path: Path | None = None):
    path = path or CLUSTER / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _FakeCluster:
    """Autoscaler stand-in: GPUs appear one per poll; time advances one poll per sleep."""

    def __init__(self, arrive_every: int = 1):
        self.now, self.polls, self.arrive_every = 0.0, 0, arrive_every
        self.requests: list[list[dict]] = []

    def available(self):
        self.polls += 1
        return {"CPU": 2.0, "GPU": float(self.polls // self.arrive_every)}

    def sleep(self, s):
        self.now += s


def test_wait_for_resources_returns_when_gpus_arrive_and_releases_the_request():
    fake = _FakeCluster()
    seen = cluster.wait_for_resources(3, timeout_s=60, poll_s=5, request=fake.requests.append,
                                 available=fake.available, clock=lambda: fake.now,
                                 sleep=fake.sleep)
    assert seen == 3
    assert fake.requests == [[{"GPU": 1.0}] * 3, []]


def test_wait_for_resources_times_out_and_still_releases_the_request():
    fake = _FakeCluster(arrive_every=100)
    with pytest.raises(TimeoutError, match="0 of 2 GPUs"):
        cluster.wait_for_resources(2, timeout_s=30, poll_s=5, request=fake.requests.append,
                              available=fake.available, clock=lambda: fake.now,
                              sleep=fake.sleep)
    assert fake.requests[-1] == [] and fake.now >= 30


def test_scale_up_cli_refuses_a_nonsense_request_before_connecting(capsys):
    assert _load_script("scale_up").main(["--gpus", "0"]) == 2
    assert "--gpus must be >= 1" in capsys.readouterr().err


# --- KubeRay: security defaults (token auth, NetworkPolicy) -------------------------------------

NETWORKPOLICY = CLUSTER / "kuberay" / "networkpolicy.yaml"
RAY_POD_LABELS = {"app.kubernetes.io/name": "imgpipe", "app.kubernetes.io/component": "ray"}
DASHBOARD_PORT = 8265


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


def _pod_templates(doc: dict) -> list[dict]:
    spec = _cluster_spec(doc)
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]


@pytest.mark.parametrize("path", [RAYJOB, RAYSERVICE], ids=lambda p: p.name)
def test_kuberay_clusters_use_ray_token_auth(path):
    """KubeRay's authOptions (>= 1.5.1) generate a token Secret and set RAY_AUTH_MODE=token and
    RAY_AUTH_TOKEN on every Ray container; it needs Ray >= 2.52 (token auth's first release)."""
    doc = cl.load_yaml(path)
    spec = _cluster_spec(doc)
    assert spec.get("authOptions", {}).get("mode") == "token"
    major, minor, *_ = (int(x) for x in spec["rayVersion"].split("."))
    assert (major, minor) >= (2, 52)
    # Nobody switches it off per container, and no token is written into the file.
    for template in _pod_templates(doc):
        for c in template["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            assert env.get("RAY_AUTH_MODE", {}).get("value", "token") == "token"
            assert "value" not in env.get("RAY_AUTH_TOKEN", {})


def test_installed_ray_supports_token_auth():
    """The auth mode the manifests turn on exists in the Ray version the image pins."""
    import ray

    src = Path(ray.__file__).parent
    hits = [p for p in src.rglob("*.py") if "RAY_AUTH_MODE" in p.read_text(errors="ignore")]
    assert hits, "this Ray has no RAY_AUTH_MODE: token authentication is not supported"


@pytest.fixture(scope="module")
def networkpolicy():
    return cl.load_yaml(NETWORKPOLICY)


def test_networkpolicy_selects_every_ray_pod(networkpolicy):
    assert networkpolicy["apiVersion"] == "networking.k8s.io/v1"
    assert networkpolicy["kind"] == "NetworkPolicy"
    selector = networkpolicy["spec"]["podSelector"]["matchLabels"]
    assert selector == RAY_POD_LABELS
    assert "Ingress" in networkpolicy["spec"]["policyTypes"]
    for path in (RAYJOB, RAYSERVICE):
        for template in _pod_templates(cl.load_yaml(path)):
            labels = template.get("metadata", {}).get("labels", {})
            assert RAY_POD_LABELS.items() <= labels.items(), f"{path.name}: pod not selected"


def _open_to_all(rule: dict) -> bool:
    sources = rule.get("from")
    return not sources or any(s == {} or s.get("ipBlock", {}).get("cidr") == "0.0.0.0/0"
                              for s in sources)


def test_networkpolicy_keeps_the_dashboard_closed(networkpolicy):
    rules = networkpolicy["spec"]["ingress"]
    for rule in rules:
        ports = {p["port"] for p in rule.get("ports", [])}
        reaches_dashboard = not ports or DASHBOARD_PORT in ports
        assert not (reaches_dashboard and _open_to_all(rule)), rule
        if reaches_dashboard:  # only Ray's own pods or the KubeRay operator
            for source in rule["from"]:
                labels = source.get("podSelector", {}).get("matchLabels", {})
                assert labels == RAY_POD_LABELS or (
                    labels.get("app.kubernetes.io/name") == "kuberay-operator"
                    and "namespaceSelector" in source), source


def test_rayjob_submits_from_the_head_pod():
    """The sidecar submitter talks to the dashboard over localhost: no pod needs the port."""
    assert cl.load_yaml(RAYJOB)["spec"]["submissionMode"] == "SidecarMode"


@pytest.mark.parametrize("case", ["no-auth", "auth-disabled", "unselected-pod", "open-dashboard"])
def test_security_checks_fail_on_broken_copies(case, networkpolicy):
    """The checks above can fail: each broken copy trips one of them."""
    job = copy.deepcopy(cl.load_yaml(RAYJOB))
    policy = copy.deepcopy(networkpolicy)
    spec = job["spec"]["rayClusterSpec"]
    if case == "no-auth":
        del spec["authOptions"]
    elif case == "auth-disabled":
        spec["authOptions"]["mode"] = "disabled"
    elif case == "unselected-pod":
        spec["workerGroupSpecs"][0]["template"]["metadata"]["labels"] = {}
    else:
        policy["spec"]["ingress"].append({"ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}]})
    auth_ok = spec.get("authOptions", {}).get("mode") == "token"
    selected = all(RAY_POD_LABELS.items() <= t.get("metadata", {}).get("labels", {}).items()
                   for t in _pod_templates(job))
    closed = not any(_open_to_all(r) and (not r.get("ports") or DASHBOARD_PORT in
                                          {p["port"] for p in r["ports"]})
                     for r in policy["spec"]["ingress"])
    assert not (auth_ok and selected and closed)
