"""The Serve app over real HTTP on the shared local Ray instance.

One module-scoped deployment (with a bearer token) serves every test; the last tests shut it
down and run ``jobs/serve.py`` end to end (Ctrl-C). Offline references come from
``Predictor``, the class evaluation uses.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from helpers import encode_image, make_test_bundle
from PIL import Image
from pydantic import SecretStr

from imgpipe.inference import Predictor
from serving.schemas import MODEL_DEPLOYMENT

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
APP = "imgpipe-test"
MODEL = "test-model"
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 512 * 1024
MAX_IMAGES = 8
SERVE_ARGS = {"max_batch_size": 8, "batch_wait_timeout_s": 0.01, "max_body_bytes": MAX_BODY,
              "max_images_per_request": MAX_IMAGES, "max_ongoing_requests": 32,
              "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32,
              "num_cpus": 0.25, "token": TOKEN, "health_check_period_s": 2.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _serve_controller_alive() -> bool:
    import ray

    return any(a["name"] == "SERVE_CONTROLLER_ACTOR"
               for a in ray.util.list_named_actors(all_namespaces=True))


# ----- images of every mode ------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def mode_images() -> dict[str, bytes]:
    """One image per Pillow mode/format the product must accept."""
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (24, 20, 4), dtype=np.uint8)
    grey = Image.fromarray(rgb[:, :, 0])
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    return {
        "L": _encode(grey, "PNG"),
        "LA": _encode(Image.fromarray(np.ascontiguousarray(rgba[:, :, :2])), "PNG"),
        "P": _encode(Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE), "PNG",
                     transparency=0),
        "RGBA": _encode(Image.fromarray(rgba), "PNG"),
        "CMYK": _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "I;16": _encode(Image.fromarray(rgb[:, :, 1].astype(np.uint16) * 257), "PNG"),
        "GIF-animated": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "RGB-JPEG": _encode(Image.fromarray(rgb), "JPEG", quality=90),
        "BMP": _encode(Image.fromarray(rgb), "BMP"),
        "TIFF": _encode(Image.fromarray(rgb), "TIFF"),
        "WEBP": _encode(Image.fromarray(rgb), "WEBP", lossless=True),
    }


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` (pixel data stays tiny)."""
    data = bytearray(encode_image(0, size=(1, 1), mode="L"))
    struct.pack_into(">II", data, 16, width, height)  # IHDR data starts at byte 16
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# ----- offline checks (no Ray) ---------------------------------------------------------------


def test_config_yaml_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from serving.app import build_app
    from serving.schemas import LiveConfig, ServeArgs

    data = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data)
    app = schema.applications[0]
    assert app.import_path == "serving.app:build_app" and callable(build_app)
    assert data["http_options"]["host"] == "127.0.0.1"
    args = ServeArgs.model_validate(app.args)
    assert args.min_replicas <= args.max_replicas and args.num_cpus < 1
    assert "token" not in app.args  # secrets belong in the environment
    (model,) = app.deployments
    assert model.name == MODEL_DEPLOYMENT
    assert LiveConfig.model_validate(model.user_config).max_batch_size > 1


def test_num_gpus_puts_replicas_and_model_on_cuda(tmp_path):
    """``num_gpus`` reaches Ray's resource request and the replica's device; 0 stays on the CPU."""
    from serving.app import build_app

    bundle = make_test_bundle(tmp_path)
    for num_gpus, device in ((0, "cpu"), (0.5, "cuda")):
        deployment = build_app({"bundle": str(bundle), "num_gpus": num_gpus})._bound_deployment
        assert deployment.ray_actor_options["num_gpus"] == num_gpus
        (settings,) = deployment.init_args
        assert settings.device == device


def test_gpu_fit_fails_early_on_a_local_instance_and_warns_on_a_cluster(caplog):
    from imgpipe.config import ConfigError
    from serving.runner import check_gpu_fit
    from serving.schemas import ServeArgs

    two_halves = ServeArgs(bundle="b", num_gpus=0.5, min_replicas=2, max_replicas=2)
    check_gpu_fit(two_halves, cluster_gpus=1, local=True)  # two replicas share one GPU
    check_gpu_fit(ServeArgs(bundle="b"), cluster_gpus=0, local=True)  # CPU replicas
    with pytest.raises(ConfigError, match=r"num_gpus: 2 replicas .* need 2 GPU\(s\).* has 1"):
        check_gpu_fit(ServeArgs(bundle="b", num_gpus=1), cluster_gpus=1, local=True)
    with caplog.at_level("WARNING", logger="serving.runner"):
        check_gpu_fit(ServeArgs(bundle="b", num_gpus=1), cluster_gpus=0, local=False)
        check_gpu_fit(ServeArgs(bundle="b", num_gpus=0.5), cluster_gpus=1, local=True)
    assert "waiting for the cluster to add GPUs" in caplog.records[0].getMessage()
    assert "replicas beyond 2 wait for GPUs" in caplog.records[1].getMessage()


def test_resolve_serve_args_layers_and_errors(tmp_path):
    from imgpipe.config import ConfigError
    from serving.runner import resolve_serve_args

    args, http = resolve_serve_args(REPO / "serving" / "config.yaml",
                                    {"bundle": "b/v3", "max_batch_size": 1, "num_cpus": None})
    assert (args.bundle, args.max_batch_size, args.num_cpus, http["port"]) == ("b/v3", 1, 0.25,
                                                                               8000)
    with pytest.raises(ConfigError, match="max_batch_size"):
        resolve_serve_args(None, {"bundle": "b", "max_batch_size": 0})
    with pytest.raises(ConfigError, match="min_replicas"):
        resolve_serve_args(None, {"bundle": "b", "min_replicas": 3, "max_replicas": 2})


def test_exposed_without_token_warns(caplog):
    from serving.security import authorized, is_loopback, warn_if_exposed

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    with caplog.at_level("WARNING"):
        assert warn_if_exposed("0.0.0.0", None)
    assert "WITHOUT a bearer token" in caplog.text
    assert not warn_if_exposed("127.0.0.1", None)
    assert not warn_if_exposed("0.0.0.0", SecretStr("t"))
    assert authorized("Bearer t", SecretStr("t")) and authorized(None, None)
    assert not authorized("Bearer x", SecretStr("t")) and not authorized("t", SecretStr("t"))


def test_v2_binary_codec_round_trip():
    from serving import v2
    from serving.schemas import V2InferenceRequest

    items = [b"\x89PNG-ish", base64.b64encode(b"\xff\xd8jpeg-ish")]
    raw = b"".join(struct.pack("<I", len(b)) + b for b in items)
    header = (b'{"inputs":[{"name":"images","shape":[2],"datatype":"BYTES",'
              b'"parameters":{"binary_data_size":%d}}]}' % len(raw))
    req, tail = v2.parse_request(header + raw, str(len(header)))
    inputs = v2.decode_inputs(req, tail, channels=1, size=8, max_images=4)
    assert inputs.images == [b"\x89PNG-ish", b"\xff\xd8jpeg-ish"]
    out_req = V2InferenceRequest.model_validate(
        {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}],
         "parameters": {"binary_data_output": True}})
    meta = type("M", (), {"name": "m", "version": 2})()
    body, headers, media = v2.encode_response(out_req, meta, np.array([[0.25, 0.75]]), ["b"])
    n = int(headers[v2.HEADER_LENGTH])
    assert media == "application/octet-stream"
    assert np.frombuffer(body[n:n + 8], "<f4").tolist() == [0.25, 0.75]
    assert body[n + 8:] == struct.pack("<I", 1) + b"b"


def test_metrics_of_several_nodes_and_replicas_merge():
    """/metrics merges what every node's Ray metrics agent exports (two nodes, two replicas
    on the first; one replica restarted in a new worker process): Ray's per-process labels go,
    traffic labels stay, a restarted replica's counter series add up, other families are left
    out."""
    from serving.metrics import merge_families, render

    def node(addr: str, *series: tuple[str, str, float]) -> str:
        lines = ["# HELP ray_imgpipe_http_requests_total HTTP requests",
                 "# TYPE ray_imgpipe_http_requests_total counter"]
        for replica, worker, value in series:
            lines.append(
                f'ray_imgpipe_http_requests_total{{Component="core_worker",NodeAddress="{addr}",'
                f'WorkerId="{worker}",deployment="ImgpipeModel",endpoint="/v1/predict",'
                f'method="POST",replica="{replica}",status="200"}} {value}')
        lines += ["# HELP ray_imgpipe_prediction_log_buffered_rows backlog",
                  "# TYPE ray_imgpipe_prediction_log_buffered_rows gauge",
                  f'ray_imgpipe_prediction_log_buffered_rows{{NodeAddress="{addr}",WorkerId="w",'
                  'replica="r1"} 2.0',
                  "# HELP ray_serve_num_http_requests_total x",
                  "# TYPE ray_serve_num_http_requests_total counter",
                  'ray_serve_num_http_requests_total{route="/"} 7.0']
        return "\n".join(lines) + "\n"

    text = render(merge_families([
        node("10.0.0.1", ("r1", "w1", 3.0), ("r2", "w2", 4.0), ("r2", "w3", 1.0)),
        node("10.0.0.2", ("r3", "w4", 5.0)),
    ])).decode()
    assert _metric(text, "ray_imgpipe_http_requests_total", endpoint="/v1/predict") == 13
    assert _metric(text, "ray_imgpipe_http_requests_total", replica="r2") == 5
    assert _metric(text, "ray_imgpipe_http_requests_total", NodeAddress="10.0.0.2") == 5
    assert "WorkerId" not in text and "Component" not in text
    assert "ray_serve_" not in text
    assert text.count("# TYPE ray_imgpipe_http_requests_total counter") == 1
    assert _metric(text, "ray_imgpipe_prediction_log_buffered_rows", replica="r1") == 4

    # Histograms: each series' buckets in ascending le (+Inf last), then _count and _sum.
    def hist(replica: str) -> list[str]:
        out = ["# HELP ray_imgpipe_batch_size Images per forward pass",
               "# TYPE ray_imgpipe_batch_size histogram"]
        for le, n in (("1.0", 1), ("2.0", 2), ("10.0", 3), ("+Inf", 3)):
            out.append(f'ray_imgpipe_batch_size_bucket{{WorkerId="w",le="{le}",replica="{replica}"}} {n}')
        out += [f'ray_imgpipe_batch_size_count{{WorkerId="w",replica="{replica}"}} 3',
                f'ray_imgpipe_batch_size_sum{{WorkerId="w",replica="{replica}"}} 7']
        return out

    text = render(merge_families(["\n".join(hist("r1") + hist("r2")) + "\n"])).decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("ray_imgpipe_batch_size")]
    order = [(ln.split("replica=")[1][:4], ln.split("{")[0].rsplit("_", 1)[1],
              ln.split('le="')[1].split('"')[0] if 'le="' in ln else "") for ln in lines]
    expected = [(f'"{r}"', part, le) for r in ("r1", "r2") for part, le in (
        ("bucket", "1.0"), ("bucket", "2.0"), ("bucket", "10.0"), ("bucket", "+Inf"),
        ("count", ""), ("sum", ""))]
    assert order == expected, lines


def test_builder_refuses_broken_bundles_before_deploying(tmp_path):
    from imgpipe.bundle import BundleChecksumError, BundleError
    from serving.app import build_app

    bundle = make_test_bundle(tmp_path)
    with pytest.raises(BundleError, match="deployment_prior"):
        build_app({"bundle": str(bundle), "deployment_prior": [0.5, 0.5]})
    with pytest.raises(BundleError, match="binary"):
        build_app({"bundle": str(bundle), "decision_threshold": 0.5})
    weights = bundle / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(BundleChecksumError):
        build_app({"bundle": str(bundle)})


# ----- the live server -----------------------------------------------------------------------


@dataclass
class Server:
    url: str
    port: int
    bundle: Path
    client: httpx.Client
    predictor: Predictor

    def offline(self, images: list[bytes]) -> np.ndarray:
        return self.predictor.predict_images(images)


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from ray import serve

    from serving.app import build_app

    bundle = make_test_bundle(tmp_path_factory.mktemp("bundles"), name=MODEL, mode="RGB",
                              train_class_counts=[100, 30, 5], temperature=1.5,
                              deployment_prior="balanced", metrics={"val": {"macro_f1": 0.5}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"bundle": str(bundle), **SERVE_ARGS}), name=APP, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, headers=AUTH, timeout=60,
                      limits=httpx.Limits(max_connections=32)) as client:
        yield Server(url, port, bundle, client, Predictor.load(bundle))
    if _serve_controller_alive():
        serve.shutdown()


def _v1_probs(prediction: dict, names: list[str]) -> np.ndarray:
    by_label = {e["label"]: e["probability"] for e in prediction["top_k"]}
    return np.array([by_label[n] for n in names])


def test_served_probabilities_equal_offline_for_every_format(server):
    names = server.predictor.class_names
    images = mode_images()
    offline = {k: server.offline([v])[0] for k, v in images.items()}
    png = images["RGBA"]
    # raw body, one image
    for ctype in ("image/png", "application/octet-stream"):
        r = server.client.post("/v1/predict?top_k=10", content=png,
                               headers={"Content-Type": ctype})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["model_name"], body["model_version"]) == (MODEL, "1")
        np.testing.assert_allclose(_v1_probs(body["predictions"][0], names), offline["RGBA"],
                                   atol=1e-5, rtol=0)
    # multipart: every image mode in one request (converted exactly as training does)
    some = list(images)[:MAX_IMAGES]
    r = server.client.post("/v1/predict", files=[("files", (f"{k}.img", images[k], "image/x"))
                                                 for k in some])
    assert r.status_code == 200, r.text
    for k, pred in zip(some, r.json()["predictions"], strict=True):
        np.testing.assert_allclose(_v1_probs(pred, names), offline[k], atol=1e-5, rtol=0)
        assert pred["label"] == names[int(np.argmax(offline[k]))]
    # JSON base64 with the remaining modes
    rest = list(images)[MAX_IMAGES:]
    r = server.client.post("/v1/predict", json={"instances": [
        {"b64": base64.b64encode(images[k]).decode()} for k in rest]})
    assert r.status_code == 200, r.text
    for k, pred in zip(rest, r.json()["predictions"], strict=True):
        np.testing.assert_allclose(_v1_probs(pred, names), offline[k], atol=1e-5, rtol=0)


def test_served_equals_offline_evaluation(server, tmp_path):
    """The issue's proof: ``imgpipe.evaluate.run_evaluation`` on shards holding the images of
    every mode, and the server, give the same probabilities per image within 1e-5."""
    from imgpipe.data.datasets import make_record
    from imgpipe.data.shards import write_shards
    from imgpipe.evaluate import run_evaluation

    images = mode_images()
    names = server.predictor.class_names
    splits = {split: [make_record(img, i % 3, names, key if split == "test" else f"{split}-{key}")
                      for i, (key, img) in enumerate(images.items())]
              for split in ("train", "val", "test")}
    data = str(tmp_path / "shards")
    write_shards(data, splits, names, {"source": "serving-test", "mode": "RGB"})
    ev = run_evaluation(server.bundle, data, "test")
    assert sorted(ev.preds.ids) == sorted(images)  # every mode decoded, none skipped
    offline = dict(zip(ev.preds.ids, ev.probs, strict=True))
    keys = list(images)
    for chunk in (keys[:MAX_IMAGES], keys[MAX_IMAGES:]):
        r = server.client.post("/v1/predict", files=[("files", (k, images[k], "image/x"))
                                                     for k in chunk])
        assert r.status_code == 200, r.text
        for k, pred in zip(chunk, r.json()["predictions"], strict=True):
            np.testing.assert_allclose(_v1_probs(pred, names), offline[k], atol=1e-5, rtol=0,
                                       err_msg=k)


def test_top_k_default_and_cap(server):
    png = encode_image(3)
    r = server.client.post("/v1/predict", content=png, headers={"Content-Type": "image/png"})
    top = r.json()["predictions"][0]["top_k"]
    assert len(top) == 3  # default 5, capped at the class count
    assert [e["probability"] for e in top] == sorted((e["probability"] for e in top), reverse=True)
    r = server.client.post("/v1/predict?top_k=1", content=png,
                           headers={"Content-Type": "image/png"})
    assert len(r.json()["predictions"][0]["top_k"]) == 1


def test_v2_infer_bytes_and_pixels_equal_offline(server):
    images = [encode_image(i, size=(30, 26)) for i in range(3)]
    offline = server.offline(images)
    req = {"id": "req-1", "inputs": [{"name": "images", "shape": [3], "datatype": "BYTES",
                                      "data": [base64.b64encode(b).decode() for b in images]}]}
    r = server.client.post(f"/v2/models/{MODEL}/infer", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_name"], body["model_version"], body["id"]) == (MODEL, "1", "req-1")
    out = {o["name"]: o for o in body["outputs"]}
    assert out["probabilities"]["shape"] == [3, 3] and out["probabilities"]["datatype"] == "FP32"
    probs = np.array(out["probabilities"]["data"]).reshape(3, 3)
    np.testing.assert_allclose(probs, offline, atol=1e-5, rtol=0)
    assert out["labels"]["data"] == [server.predictor.class_names[i] for i in offline.argmax(1)]
    # the preprocessed FP32 tensor input, nested data, versioned path, one requested output
    x = server.predictor.preprocess(images[:2]).numpy()
    req = {"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "FP32",
                       "data": x.tolist()}], "outputs": [{"name": "probabilities"}]}
    r = server.client.post(f"/v2/models/{MODEL}/versions/1/infer", json=req)
    assert r.status_code == 200, r.text
    outputs = r.json()["outputs"]
    assert [o["name"] for o in outputs] == ["probabilities"]
    np.testing.assert_allclose(np.array(outputs[0]["data"]).reshape(2, 3), offline[:2],
                               atol=1e-5, rtol=0)


def test_metadata_endpoints(server):
    card = server.client.get("/v1/models").json()["models"][0]
    assert card["name"] == MODEL and card["version"] == "1"
    assert card["class_names"] == ["class_0", "class_1", "class_2"]
    assert card["metrics"]["val"] == {"macro_f1": 0.5}
    assert card["calibration"]["temperature"] == 1.5
    assert card["calibration"]["deployment_prior"] == "balanced"
    c = server.client
    assert c.get("/v2/health/live").json() == {"live": True}
    assert c.get("/v2/health/ready").json() == {"ready": True}
    assert c.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    meta = c.get(f"/v2/models/{MODEL}").json()
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert {t["name"]: t["shape"] for t in meta["inputs"]} == {"images": [-1],
                                                               "pixels": [-1, 3, 16, 16]}
    assert {t["name"]: t["datatype"] for t in meta["outputs"]} == {"probabilities": "FP32",
                                                                   "labels": "BYTES"}
    assert c.get(f"/v2/models/{MODEL}/versions/1").json() == meta
    assert c.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
    for path in ("/v2/models/nope", f"/v2/models/{MODEL}/versions/7/ready", "/v2/nothing"):
        r = c.get(path)
        assert r.status_code == 404 and r.json()["error"], path


def test_docs_page_and_openapi(server):
    r = server.client.get("/docs")
    assert r.status_code == 200 and "swagger" in r.text.lower()
    # every asset the page loads is served locally: the page works with no network
    assert "http://" not in r.text and "https://" not in r.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        a = server.client.get(f"/docs-assets/{asset}")
        assert a.status_code == 200 and len(a.content) > 10_000, asset
    spec = server.client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/models", "/v2/models/{name}/infer", "/metrics"} <= set(spec["paths"])
    assert {"V2ImagesInput", "V2PixelsInput", "ErrorDetail", "V2Error"} <= set(
        spec["components"]["schemas"])
    # every status the app answers is documented with its body; FastAPI's unused 422 is not
    predict = spec["paths"]["/v1/predict"]["post"]["responses"]
    assert {"200", "400", "401", "413", "415", "503"} <= set(predict) and "422" not in predict
    assert "Retry-After" in predict["503"]["headers"]
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]["responses"]
    assert infer["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/V2Error")


def _mp(files: int) -> dict:
    return {"files": [("files", (f"{i}.png", encode_image(i), "image/png")) for i in range(files)]}


PNG = encode_image(11, size=(40, 40))
BAD_V1 = {
    "not-an-image": ({"content": b"hello, world", "headers": {"Content-Type": "image/png"}}, 400),
    "corrupt": ({"content": PNG[:60] + bytes(b ^ 0x5A for b in PNG[60:]),
                 "headers": {"Content-Type": "image/png"}}, 400),
    "truncated": ({"content": PNG[: len(PNG) // 2], "headers": {"Content-Type": "image/png"}},
                  400),
    "empty": ({"content": b"", "headers": {"Content-Type": "image/png"}}, 400),
    "bomb-dimensions": ({"content": _png_with_size(30_000, 30_000),
                         "headers": {"Content-Type": "image/png"}}, 400),
    "over-max-pixels": ({"content": _png_with_size(5000, 4000),
                         "headers": {"Content-Type": "image/png"}}, 400),
    "too-large": ({"content": b"\0" * (MAX_BODY + 1), "headers": {"Content-Type": "image/png"}},
                  413),
    "too-large-chunked": ({"content": iter([b"\0" * 65536] * 9),
                           "headers": {"Content-Type": "image/png"}}, 413),
    "gzip-bomb": ({"content": gzip.compress(b"\0" * (8 * MAX_BODY)),
                   "headers": {"Content-Type": "image/png", "Content-Encoding": "gzip"}}, 413),
    "unknown-encoding": ({"content": PNG, "headers": {"Content-Type": "image/png",
                                                      "Content-Encoding": "br"}}, 415),
    "text-plain": ({"content": PNG, "headers": {"Content-Type": "text/plain"}}, 415),
    "no-content-type": ({"content": PNG, "headers": {"Content-Type": ""}}, 415),
    "json-malformed": ({"content": b'{"instances": [', "headers":
                        {"Content-Type": "application/json"}}, 400),
    "json-wrong-shape": ({"json": {"images": ["x"]}}, 400),
    "json-empty": ({"json": {"instances": []}}, 400),
    "json-bad-base64": ({"json": {"instances": [{"b64": "!!not base64!!"}]}}, 400),
    "json-not-an-image": ({"json": {"instances": [{"b64": base64.b64encode(b"hi").decode()}]}},
                          400),
    "multipart-no-files": ({"files": {"note": (None, "just text")}}, 400),
    "multipart-malformed": ({"content": b"--xyz\r\ngarbage", "headers": {
        "Content-Type": "multipart/form-data; boundary=xyz"}}, 400),
    "too-many-images": (_mp(MAX_IMAGES + 1), 413),
}


@pytest.mark.parametrize("case", list(BAD_V1))
def test_bad_v1_input_gets_clear_4xx(server, case):
    kwargs, status = BAD_V1[case]
    r = server.client.post("/v1/predict", **kwargs)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["detail"], str) and len(r.json()["detail"]) > 10


def test_bad_query_gets_400(server):
    for q in ("top_k=0", "top_k=abc"):
        r = server.client.post(f"/v1/predict?{q}", content=PNG,
                               headers={"Content-Type": "image/png"})
        assert r.status_code == 400 and "top_k" in r.json()["detail"]


def _img_input(data, **kw) -> dict:
    return {"inputs": [{"name": "images", "shape": [len(data)], "datatype": "BYTES",
                        "data": data, **kw}]}


B64 = base64.b64encode(PNG).decode()
BINARY_HEADER = (b'{"inputs":[{"name":"images","shape":[1],"datatype":"BYTES",'
                 b'"parameters":{"binary_data_size":50}}]}')
BAD_V2 = {
    "malformed-json": ({"content": b"{nope"}, 400),
    "no-inputs": ({"json": {"inputs": []}}, 400),
    "missing-shape": ({"json": {"inputs": [{"name": "images", "datatype": "BYTES",
                                            "data": [B64]}]}}, 400),
    "wrong-datatype": ({"json": _img_input([B64], datatype="FP32")}, 400),
    "shape-mismatch": ({"json": _img_input([B64], shape=[2])}, 400),
    "bad-base64": ({"json": _img_input(["%%%"])}, 400),
    "not-an-image": ({"json": _img_input([base64.b64encode(b"text").decode()])}, 400),
    "unknown-input": ({"json": {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES",
                                            "data": [B64]}]}}, 400),
    "both-inputs": ({"json": {"inputs": _img_input([B64])["inputs"] + [
        {"name": "pixels", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": [0.0] * 768}]}},
                    400),
    "pixels-wrong-shape": ({"json": {"inputs": [{"name": "pixels", "shape": [1, 1, 16, 16],
                                                 "datatype": "FP32", "data": [0.0] * 256}]}}, 400),
    "pixels-not-numbers": ({"json": {"inputs": [{"name": "pixels", "shape": [1, 3, 16, 16],
                                                 "datatype": "FP32", "data": ["a"] * 768}]}}, 400),
    "unknown-output": ({"json": {**_img_input([B64]), "outputs": [{"name": "logits"}]}}, 400),
    "bad-header-length": ({"content": b'{"inputs": []}',
                           "headers": {"Inference-Header-Content-Length": "999"}}, 400),
    "binary-size-mismatch": ({"content": BINARY_HEADER + b"abc", "headers": {
        "Inference-Header-Content-Length": str(len(BINARY_HEADER))}}, 400),
    "too-many-images": ({"json": _img_input([B64] * (MAX_IMAGES + 1))}, 413),
    "too-large": ({"content": b"{" + b" " * MAX_BODY + b"}"}, 413),
}


@pytest.mark.parametrize("case", list(BAD_V2))
def test_malformed_v2_request_gets_v2_error(server, case):
    kwargs, status = BAD_V2[case]
    r = server.client.post(f"/v2/models/{MODEL}/infer", **kwargs)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and len(r.json()["error"]) > 10


def test_unknown_model_is_404_with_v2_error(server):
    r = server.client.post("/v2/models/other/infer", json=_img_input([B64]))
    assert r.status_code == 404 and "not found" in r.json()["error"]


def test_bearer_token_on_every_endpoint_but_health(server):
    anon = httpx.Client(base_url=server.url, timeout=30)
    wrong = {"Authorization": "Bearer not-the-token"}
    guarded = [("GET", "/v1/models"), ("POST", "/v1/predict"), ("GET", "/v2"),
               ("GET", f"/v2/models/{MODEL}"), ("GET", f"/v2/models/{MODEL}/ready"),
               ("POST", f"/v2/models/{MODEL}/infer"), ("GET", "/metrics"), ("GET", "/docs"),
               ("GET", "/openapi.json")]
    for method, path in guarded:
        for headers in ({}, wrong):
            r = anon.request(method, path, headers=headers, content=PNG)
            assert r.status_code == 401, (path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert ("error" if path.startswith("/v2") else "detail") in r.json()
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert anon.get(path).status_code == 200
    anon.close()


def test_standard_v2_client_works_unchanged(server):
    """tritonclient's HTTP client, as shipped: binary tensors by default, JSON on request."""
    http = pytest.importorskip("tritonclient.http")
    # headers=dict(AUTH): tritonclient adds Inference-Header-Content-Length to the dict it gets.
    images = [encode_image(i, size=(21, 19)) for i in range(2)]
    offline = server.offline(images)
    client = http.InferenceServerClient(url=server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL, headers=dict(AUTH))
    assert client.get_model_metadata(MODEL, headers=dict(AUTH))["platform"] == "pytorch_safetensors"
    assert client.get_server_metadata(headers=dict(AUTH))["name"] == "imgpipe"
    inp = http.InferInput("images", [2], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=np.object_))  # binary_data=True (default)
    res = client.infer(MODEL, [inp], headers=dict(AUTH))  # no outputs → binary_data_output
    np.testing.assert_allclose(res.as_numpy("probabilities"), offline, atol=1e-5, rtol=0)
    names = server.predictor.class_names
    assert [s.decode() for s in res.as_numpy("labels")] == [names[i] for i in offline.argmax(1)]
    inp = http.InferInput("images", [2], "BYTES")
    inp.set_data_from_numpy(np.array([base64.b64encode(b) for b in images], dtype=np.object_),
                            binary_data=False)
    res = client.infer(MODEL, [inp], headers=dict(AUTH),
                       outputs=[http.InferRequestedOutput("probabilities", binary_data=False)])
    np.testing.assert_allclose(res.as_numpy("probabilities"), offline, atol=1e-5, rtol=0)
    x = server.predictor.preprocess(images).numpy()
    inp = http.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer(MODEL, [inp], headers=dict(AUTH), model_version="1")
    np.testing.assert_allclose(res.as_numpy("probabilities"), offline, atol=1e-5, rtol=0)
    with pytest.raises(Exception, match="not found"):
        client.infer("missing-model", [inp], headers=dict(AUTH))
    client.close()


def _metric(text: str, metric: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        named = line.startswith(metric + "{") or line.startswith(metric + " ")
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _replica_ids(client) -> list[str]:
    details = client.get_serve_details()["applications"][APP]["deployments"][MODEL_DEPLOYMENT]
    return sorted(r["replica_id"] for r in details["replicas"])


def test_serve_deploy_config_reconfigures_in_place(server):
    """The ``serve deploy`` path with the repo's config file (bundle and port swapped in): a
    changed ``user_config`` reaches the running replica through reconfigure(), no restart."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    # Private, but it is exactly what `serve deploy` asks the controller to do.
    client = _get_global_client()
    serve.delete(APP)  # a config deploy does not take over an app deployed with serve.run
    config = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    config.pop("proxy_location")
    config["http_options"]["port"] = server.port
    app = config["applications"][0]
    app["name"] = APP
    app["args"].update(bundle=str(server.bundle), token=TOKEN, min_replicas=1, max_replicas=1,
                       max_images_per_request=MAX_IMAGES, max_body_bytes=MAX_BODY)

    def deploy(user_config: dict) -> None:
        app["deployments"][0]["user_config"] = user_config
        client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)

    deploy({"max_batch_size": 8, "batch_wait_timeout_s": 0.01})
    before = _replica_ids(client)
    png = encode_image(5)
    deploy({"max_batch_size": 1, "temperature": 3.0, "deployment_prior": "train"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        cal = server.client.get("/v1/models").json()["models"][0]["calibration"]
        if cal["temperature"] == 3.0:
            break
        time.sleep(0.5)
    assert (cal["temperature"], cal["deployment_prior"]) == (3.0, "train")
    assert _replica_ids(client) == before  # reconfigured in place, not restarted
    expected = Predictor.load(server.bundle)
    expected.set_adjustment(temperature=3.0, deployment_prior="train")
    r = server.client.post("/v1/predict", content=png, headers={"Content-Type": "image/png"})
    np.testing.assert_allclose(_v1_probs(r.json()["predictions"][0], expected.class_names),
                               expected.predict_images([png])[0], atol=1e-5, rtol=0)
    deployed = client.get_serve_details()["applications"][APP]["deployments"][MODEL_DEPLOYMENT]
    cfg = deployed["deployment_config"]
    assert cfg["user_config"]["max_batch_size"] == 1
    assert cfg["autoscaling_config"]["target_ongoing_requests"] == 8
    assert cfg["ray_actor_options"]["num_cpus"] == 0.25
    assert cfg["health_check_period_s"] == 10
    status = serve.status().applications[APP]
    assert status.status == "RUNNING"
    assert status.deployments[MODEL_DEPLOYMENT].status == "HEALTHY"
    # Back to batching and the bundle's calibration, still the same replica.
    deploy({"max_batch_size": 8, "batch_wait_timeout_s": 0.01})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = server.client.post("/v1/predict", content=png, headers={"Content-Type": "image/png"})
        if r.status_code == 200 and np.allclose(
                _v1_probs(r.json()["predictions"][0], expected.class_names),
                server.offline([png])[0], atol=1e-5, rtol=0):
            break
        time.sleep(0.5)
    np.testing.assert_allclose(_v1_probs(r.json()["predictions"][0], expected.class_names),
                               server.offline([png])[0], atol=1e-5, rtol=0)
    assert _replica_ids(client) == before


def test_bounded_load_has_no_5xx_and_batches(server):
    """2,000 requests at concurrency 16 (v1 raw and v2 JSON mixed): all 200, and batching."""
    pngs = [encode_image(i, size=(24, 24)) for i in range(16)]
    v2_bodies = [_img_input([base64.b64encode(b).decode()]) for b in pngs]

    def one(i: int) -> int:
        if i % 4 == 3:
            r = server.client.post(f"/v2/models/{MODEL}/infer", json=v2_bodies[i % 16])
        else:
            r = server.client.post("/v1/predict", content=pngs[i % 16],
                                   headers={"Content-Type": "image/png"})
        return r.status_code

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, range(2000)))
    elapsed = time.perf_counter() - start
    print(f"\nload: 2000 requests, concurrency 16: {2000 / elapsed:.0f} req/s")
    assert statuses.count(200) == 2000, {s: statuses.count(s) for s in set(statuses)}
    # Ray's metrics agents export what the replicas recorded every few seconds.
    deadline = time.monotonic() + 60
    while True:
        text = server.client.get("/metrics").text
        if _metric(text, "ray_imgpipe_predictions_total") >= 2000 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert _metric(text, "ray_imgpipe_http_requests_total", endpoint="/v1/predict",
                   status="200") >= 1500
    assert _metric(text, "ray_imgpipe_http_requests_total",
                   endpoint="/v2/models/{name}/infer", status="200") >= 500
    assert not any('status="5' in line for line in text.splitlines())
    assert _metric(text, "ray_imgpipe_predictions_total") >= 2000
    batches = _metric(text, "ray_imgpipe_batch_size_count")
    assert _metric(text, "ray_imgpipe_batch_size_sum") > batches > 0  # some batches held > 1 image
    assert _metric(text, "ray_imgpipe_http_request_duration_seconds_count",
                   endpoint="/v1/predict") >= 1500
    assert _metric(text, "imgpipe_model_info", name=MODEL) == 1


def test_shutdown_leaves_no_serve_application(server):
    from ray import serve

    serve.delete(APP)
    assert APP not in serve.status().applications
    serve.shutdown()
    assert not _serve_controller_alive()
    deadline = time.monotonic() + 30
    while _port_open(server.port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _port_open(server.port)


def test_cli_serves_until_ctrl_c(ray_session, tmp_path):
    """``jobs/serve.py`` on the shared cluster: serves, then SIGINT shuts everything down."""
    import ray

    bundle = make_test_bundle(tmp_path, name="cli-model")
    port = _free_port()
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "IMGPIPE_SERVE_TOKEN": "cli-token", "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "jobs" / "serve.py"), "--bundle", str(bundle.parent),
             "--host", "127.0.0.1", "--port", str(port), "--num-cpus", "0.25"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            if "Ctrl-C to stop" in log_path.read_text():
                break
            time.sleep(0.5)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models",
                      headers={"Authorization": "Bearer cli-token"}, timeout=30)
        assert r.json()["models"][0]["name"] == "cli-model"
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).status_code == 401
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not _serve_controller_alive()
    assert not _port_open(port)


@pytest.mark.slow
def test_cli_refuses_more_gpus_than_its_own_instance_has(tmp_path):
    """``--num-gpus 1`` with the two default replicas on a local instance without two GPUs:
    exit 2 naming the field, before Serve starts (it would wait for the GPUs forever)."""
    bundle = make_test_bundle(tmp_path, name="gpu-model")
    env = {k: v for k, v in os.environ.items()
           if k != "RAY_ADDRESS" and not k.startswith("RAY_SERVE_")}
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "serve.py"), "--bundle", str(bundle.parent),
         "--port", str(_free_port()), "--num-gpus", "1", "--ingress", "proxy", "--smoke"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    assert "num_gpus: 2 replicas (min_replicas) × 1 GPU need 2 GPU(s)" in out.stderr
    assert "serving " not in out.stdout


def test_cli_on_its_own_instance_through_serves_python_proxy(tmp_path):
    """``jobs/serve.py --ingress proxy`` starting its own Ray instance: Serve's classic Python
    proxy path answers the same API (the session's instance runs the HAProxy default)."""
    bundle = make_test_bundle(tmp_path, name="proxy-model")
    port = _free_port()
    # Not the session's settings: no RAY_ADDRESS, no RAY_SERVE_* from tests/conftest.py.
    env = {k: v for k, v in os.environ.items()
           if k != "RAY_ADDRESS" and not k.startswith("RAY_SERVE_")}
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "serve.py"), "--bundle", str(bundle.parent),
         "--port", str(port), "--num-cpus", "0.25", "--ingress", "proxy", "--smoke"],
        cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
        timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "ingress proxy)" in out.stdout
    assert "smoke: POST /v1/predict answered: " in out.stdout  # a real prediction ran
    # Serve's controller announces the high-throughput bundle (direct ingress) when it is on.
    assert "Direct ingress enabled" not in out.stdout + out.stderr
    served = json.loads(out.stdout.strip().splitlines()[-1])
    assert served["served"]["name"] == "proxy-model"
    assert not _port_open(port)
