"""One error type for the HTTP layer, rendered in the shape each protocol expects.

``/v1`` and the rest answer FastAPI's ``{"detail": "..."}``; ``/v2`` answers the Open Inference
Protocol error object ``{"error": "..."}``. Every client mistake becomes a 4xx with a message that
says what was wrong; nothing a client sends reaches a 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request that cannot be served, with the HTTP status to answer."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def is_v2_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def error_response(path: str, status: int, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """``{"error": message}`` under ``/v2``, ``{"detail": message}`` elsewhere."""
    key = "error" if is_v2_path(path) else "detail"
    return JSONResponse({key: message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(api: FastAPI) -> None:
    """Map ApiError, FastAPI validation, routing errors and crashes to protocol-shaped bodies."""

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request.url.path, exc.status, exc.message, exc.headers)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, 400, _validation_message(exc))

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request.url.path, exc.status_code, str(exc.detail),
                              getattr(exc, "headers", None))

    @api.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request.url.path, 500, f"internal error: {type(exc).__name__}")
