"""HTTP routes of one replica: ``/v1`` (simple JSON), ``/v2`` (Open Inference Protocol), ops.

Built per replica by ``create_api(model)``; every route is a thin adapter from HTTP to the
replica's methods. A middleware checks the bearer token (except on the two health probes) and
counts every request for ``/metrics``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from fastapi import FastAPI, Query, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path

import imgpipe
from serving import v2
from serving.errors import ApiError, error_response, install_error_handlers
from serving.inputs import images_from_v1, read_body
from serving.live import LiveState
from serving.openapi import install_contract
from serving.schemas import (
    Calibration,
    ImagePrediction,
    LabelProbability,
    ModelCard,
    ModelsResponse,
    PredictResponse,
    V2InferenceRequest,
    V2InferenceResponse,
    V2ModelMetadata,
    V2ServerMetadata,
)
from serving.security import PUBLIC_PATHS, authorized

if TYPE_CHECKING:
    from serving.app import ImgpipeModel

_IMAGE_SCHEMA = {"type": "string", "format": "binary"}
PREDICT_BODY_DOC = {"requestBody": {"required": True, "content": {
    "image/png": {"schema": _IMAGE_SCHEMA},
    "image/jpeg": {"schema": _IMAGE_SCHEMA},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": _IMAGE_SCHEMA}}}},
    "application/json": {"schema": {
        "type": "object", "required": ["instances"], "properties": {"instances": {
            "type": "array", "items": {"type": "object", "required": ["b64"],
                                       "properties": {"b64": {"type": "string"}}}}}}},
}}}


def create_api(model: ImgpipeModel) -> FastAPI:
    """The FastAPI app serving ``model`` (docs at ``/docs``, schema at ``/openapi.json``)."""
    meta = model.bundle_meta
    api = FastAPI(
        title=f"imgpipe — {meta.name} v{meta.version}", version=imgpipe.__version__,
        description="Image classification with calibrated, prior-corrected probabilities. "
                    "`/v1`: simple JSON; `/v2`: KServe Open Inference Protocol (REST).",
        docs_url=None, redoc_url=None,
    )
    _add_offline_docs(api)
    install_error_handlers(api)
    api.add_middleware(AuthAndObserve, model=model)
    _add_v1_routes(api, model)
    _add_v2_routes(api, model)
    _add_ops_routes(api, model)
    install_contract(api, PUBLIC_PATHS, V2_REQUEST_COMPONENTS)
    return api


DOCS_ASSETS = "/docs-assets"


def _add_offline_docs(api: FastAPI) -> None:
    """Swagger UI from the installed swagger-ui-bundle: FastAPI's default page loads it from a
    CDN and renders blank on a machine without internet access."""
    api.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @api.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=api.openapi_url, title=f"{api.title} — API docs",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")


class AuthAndObserve:
    """Pure ASGI middleware: bearer token check (not on the health probes) and request counts.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs
    every request through an extra task and memory streams, which showed in the profile.
    """

    def __init__(self, app: ASGIApp, model: ImgpipeModel) -> None:
        self.app = app
        self.model = model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope["path"]
        status = 500

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if path in PUBLIC_PATHS or authorized(_header(scope, b"authorization"),
                                                  self.model.settings.token):
                await self.app(scope, receive, send_observed)
            else:
                response = error_response(path, 401, "missing or invalid bearer token",
                                          {"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send_observed)
        finally:
            # Route templates, not raw paths, keep label cardinality bounded.
            endpoint = getattr(scope.get("route"), "path", None) or "(unmatched)"
            self.model.observe_request(endpoint, scope["method"], status,
                                       time.perf_counter() - start)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def v1_predictions(live: LiveState, probs: np.ndarray, labels: list[str],
                   top_k: int) -> PredictResponse:
    """Top-k ``{label, probability}`` per image plus the decision label."""
    names = live.meta.class_names
    k = min(top_k, len(names))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    preds = [
        ImagePrediction(label=decision, top_k=[
            LabelProbability(label=names[j], probability=float(row[j])) for j in idx])
        for row, idx, decision in zip(probs, order, labels, strict=True)
    ]
    return PredictResponse(model_name=live.meta.name, model_version=str(live.meta.version),
                           predictions=preds)


def model_card(live: LiveState) -> ModelCard:
    m = live.meta
    prior = m.deployment_prior
    return ModelCard(
        name=m.name, version=str(m.version), class_names=m.class_names,
        num_classes=m.architecture.num_classes, architecture=m.architecture.model_dump(),
        preprocess=m.preprocess.model_dump(), train_class_counts=m.train_class_counts,
        calibration=Calibration(temperature=m.temperature, deployment_prior=prior,
                                decision_threshold=m.decision_threshold,
                                model_prior=m.model_prior),
        metrics=m.metrics.model_dump(), created_at=m.created_at.isoformat(),
        code_version=m.code_version,
    )


def _answer(model: ImgpipeModel, live: LiveState, logits: np.ndarray
            ) -> tuple[np.ndarray, list[str]]:
    """Probabilities and decisions with the request's own live settings; the hook sees them."""
    probs = live.probabilities(logits)
    labels = live.labels(probs)
    model.observe_predictions(live, probs, labels)
    return probs, labels


def _add_v1_routes(api: FastAPI, model: ImgpipeModel) -> None:
    settings = model.settings

    @api.post("/v1/predict", response_model=PredictResponse, openapi_extra=PREDICT_BODY_DOC,
              summary="Classify images: raw body, multipart files, or JSON base64")
    async def predict(request: Request,
                      top_k: int = Query(5, ge=1, le=100_000, description="capped at the "
                                         "number of classes")) -> PredictResponse:
        live = model.live  # one snapshot for the whole request
        body = await read_body(request, settings.max_body_bytes)
        images = await images_from_v1(request, body, settings.max_images_per_request)
        logits = await model.logits_for_images(images, live)
        probs, labels = _answer(model, live, logits)
        return v1_predictions(live, probs, labels, top_k)

    @api.get("/v1/models", response_model=ModelsResponse,
             summary="Classes, version, metrics and calibration of the served bundle")
    async def models() -> ModelsResponse:
        return ModelsResponse(models=[model_card(model.live)])


def _check_model(live: LiveState, name: str, version: str | None) -> None:
    meta = live.meta
    if name != meta.name:
        raise ApiError(404, f"model {name!r} not found; this server serves {meta.name!r}")
    if version is not None and version.removeprefix("v") != str(meta.version):
        raise ApiError(404, f"model {name!r} version {version!r} not found; "
                            f"available: {[str(meta.version)]}")


async def _infer(model: ImgpipeModel, live: LiveState, request: Request) -> Response:
    settings, pre = model.settings, live.meta.preprocess
    body = await read_body(request, settings.max_body_bytes)
    req, tail = v2.parse_request(body, request.headers.get(v2.HEADER_LENGTH))
    inputs = v2.decode_inputs(req, tail, pre.channels, pre.image_size,
                              settings.max_images_per_request)
    if inputs.images is not None:
        logits = await model.logits_for_images(inputs.images, live)
    else:
        logits = await model.logits_for_tensor(torch.from_numpy(inputs.pixels), live)
    probs, labels = _answer(model, live, logits)
    content, headers, media_type = v2.encode_response(req, live.meta, probs, labels)
    return Response(content, media_type=media_type, headers=headers)


def _add_v2_routes(api: FastAPI, model: ImgpipeModel) -> None:
    @api.get("/v2", response_model=V2ServerMetadata, tags=["v2"])
    async def server_metadata() -> V2ServerMetadata:
        return v2.server_metadata()

    @api.get("/v2/health/live", tags=["v2"])
    async def live() -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready", tags=["v2"])
    async def ready() -> dict[str, bool]:
        # Serve routes traffic only to replicas whose constructor (bundle load) finished.
        return {"ready": True}

    _add_v2_model_routes(api, model)


def _add_v2_model_routes(api: FastAPI, model: ImgpipeModel) -> None:
    """Model metadata / ready / infer, each with and without ``/versions/{version}``."""
    base, versioned = "/v2/models/{name}", "/v2/models/{name}/versions/{version}"
    infer_doc = {"responses": {200: {"model": V2InferenceResponse}},
                 "openapi_extra": {"requestBody": {"required": True, "content": {
                     "application/json": {"schema": V2_REQUEST_SCHEMA}}}}}

    def metadata(name: str, version: str | None = None) -> V2ModelMetadata:
        live = model.live
        _check_model(live, name, version)
        return v2.model_metadata(live.meta)

    def model_ready(name: str, version: str | None = None) -> dict[str, str | bool]:
        _check_model(model.live, name, version)
        return {"name": name, "ready": True}

    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        live = model.live  # one snapshot for the whole request
        _check_model(live, name, version)
        return await _infer(model, live, request)

    @api.get(base, response_model=V2ModelMetadata, tags=["v2"])
    async def get_metadata(name: str) -> V2ModelMetadata:
        return metadata(name)

    @api.get(versioned, response_model=V2ModelMetadata, tags=["v2"])
    async def get_version_metadata(name: str, version: str) -> V2ModelMetadata:
        return metadata(name, version)

    @api.get(base + "/ready", tags=["v2"])
    async def get_ready(name: str) -> dict[str, str | bool]:
        return model_ready(name)

    @api.get(versioned + "/ready", tags=["v2"])
    async def get_version_ready(name: str, version: str) -> dict[str, str | bool]:
        return model_ready(name, version)

    @api.post(base + "/infer", tags=["v2"], **infer_doc)
    async def post_infer(request: Request, name: str) -> Response:
        return await infer(request, name)

    @api.post(versioned + "/infer", tags=["v2"], **infer_doc)
    async def post_version_infer(request: Request, name: str, version: str) -> Response:
        return await infer(request, name, version)


def _v2_request_schema() -> tuple[dict, dict]:
    """JSON schema of the infer body and its nested models, for the OpenAPI components (the
    handler reads the raw body itself, for the binary extension, so FastAPI cannot)."""
    schema = V2InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    return schema, schema.pop("$defs", {})


V2_REQUEST_SCHEMA, V2_REQUEST_COMPONENTS = _v2_request_schema()


def _add_ops_routes(api: FastAPI, model: ImgpipeModel) -> None:
    @api.get("/metrics", response_class=PlainTextResponse, tags=["ops"],
             summary="Prometheus metrics (all replicas)")
    async def metrics() -> Response:
        return Response(await model.render_metrics(), media_type=CONTENT_TYPE_LATEST)
