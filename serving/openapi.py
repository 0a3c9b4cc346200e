"""The published contract: every status an operation can answer, with its error body.

FastAPI documents only the success response and a 422 this app never sends (validation errors
are 400 here). ``install_contract`` rewrites the generated OpenAPI document once: it drops the
422s, adds each error status an operation can return with the body that protocol uses
(``{"detail"}`` for /v1 and ops, the Open Inference Protocol ``{"error"}`` under /v2), the
``Retry-After`` / ``WWW-Authenticate`` headers, and the component schemas of bodies the
handlers parse themselves (the v2 infer request).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from serving.errors import is_v2_path
from serving.schemas import ErrorDetail, V2Error

DESCRIPTIONS = {
    400: "Malformed request, invalid parameter, or an image that cannot be decoded",
    401: "Missing or invalid bearer token (only when the server has a token)",
    404: "No such model or model version",
    413: "Body, image count, image pixels or decoded size over the server's limits",
    415: "Unsupported Content-Type or Content-Encoding",
    503: "Replica busy (decode budget full); retry after `Retry-After` seconds",
}
HEADERS = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}},
}


def error_statuses(path: str, method: str, public: bool) -> set[int]:
    """The error statuses ``method path`` can answer (see ``serving.inputs``/``v2``/``budget``)."""
    codes = set() if public else {401}
    if method == "post":  # the body is read with limits, then images decoded under the budget
        codes |= {400, 413, 415, 503}
    if path == "/v1/predict":
        codes.add(400)  # top_k
    if path.startswith("/v2/models/"):
        codes.add(404)
    return codes


def install_contract(api: FastAPI, public_paths: frozenset[str],
                     components: dict[str, Any]) -> None:
    """Make ``api.openapi()`` return the completed document (built once, then cached)."""
    original: Callable[[], dict[str, Any]] = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            spec = original()
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(components)
            for name, model in (("ErrorDetail", ErrorDetail), ("V2Error", V2Error)):
                schemas[name] = model.model_json_schema()
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            for path, ops in spec.get("paths", {}).items():
                for method, op in ops.items():
                    _document(op, path, method, path in public_paths)
        return api.openapi_schema

    api.openapi = openapi


def _document(op: dict[str, Any], path: str, method: str, public: bool) -> None:
    responses = op.setdefault("responses", {})
    responses.pop("422", None)
    body = "V2Error" if is_v2_path(path) else "ErrorDetail"
    for code in sorted(error_statuses(path, method, public)):
        entry: dict[str, Any] = {"description": DESCRIPTIONS[code], "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}}}
        if code in HEADERS:
            entry["headers"] = HEADERS[code]
        responses[str(code)] = entry
