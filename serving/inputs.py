"""Reading request bodies safely and turning ``/v1/predict`` bodies into encoded images.

Limits are enforced while the body streams in (a lying or missing Content-Length cannot get
past them), compressed bodies are capped after decompression, and a source image's dimensions
are checked from its header before any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import zlib

from pydantic import ValidationError
from starlette.requests import Request

from imgpipe.data.decode import ImageDecodeError, ImageTooLargeError, read_image_header
from serving.errors import ApiError
from serving.schemas import PredictJSON

RAW_IMAGE_TYPES = ("application/octet-stream",)


def media_type(request: Request) -> str:
    """The request's media type, lower case, without parameters (``""`` when absent)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body exceeds the maximum of {limit} bytes")


async def read_body(request: Request, limit: int) -> bytes:
    """The (decompressed) body, refusing more than ``limit`` bytes with 413.

    Raises:
        ApiError: 400 bad Content-Length or corrupt compressed data, 413 too large,
            415 an unsupported Content-Encoding.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, f"invalid Content-Length header {declared!r}")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return _decompress(b"".join(chunks), request.headers.get("content-encoding", ""), limit)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ApiError(415, f"unsupported Content-Encoding {encoding!r} (use gzip or deflate)")
    # wbits: 16+MAX_WBITS reads gzip, MAX_WBITS reads zlib ("deflate" on the wire).
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)  # cap the output: a zip bomb stops here
    except zlib.error as e:
        raise ApiError(400, f"corrupt {encoding} body: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise _too_large(limit)
    return out


def decode_b64(text: str, what: str) -> bytes:
    """Standard or URL-safe base64 (a ``data:...;base64,`` prefix is allowed) → bytes."""
    if not isinstance(text, str):
        raise ApiError(400, f"{what}: expected a base64 string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    text = "".join(text.split())
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{what}: invalid base64: {e}") from None


def check_image_header(data: bytes, max_pixels: int, what: str) -> tuple[int, int] | None:
    """``(width, height)`` from the header, refusing more than ``max_pixels`` before decoding.

    Uses the shared decoder's guard, which never depends on warning filters, so the answer is
    the same whatever other requests in the replica's thread pool are doing. None when the
    header is unreadable: the decoder then reports it with the shared message.

    Raises:
        ApiError: 400 when the image declares more than ``max_pixels`` pixels.
    """
    try:
        width, height, _ = read_image_header(data, max_pixels=max_pixels)
    except ImageTooLargeError as e:
        raise ApiError(400, f"{what}: {e}") from None
    except ImageDecodeError:
        return None
    return width, height


async def images_from_v1(request: Request, body: bytes, max_images: int) -> list[bytes]:
    """Encoded images of a ``/v1/predict`` body: raw image, multipart files, or JSON base64.

    Raises:
        ApiError: 415 for other content types, 400 malformed bodies, 413 too many images.
    """
    kind = media_type(request)
    if kind.startswith("image/") or kind in RAW_IMAGE_TYPES:
        images = [body]
    elif kind == "multipart/form-data":
        images = await _multipart_files(request, body, max_images)
    elif kind == "application/json":
        images = _json_instances(body)
    else:
        raise ApiError(415, f"unsupported Content-Type {kind or '(none)'!r}: send an image "
                            "(image/png, image/jpeg, ...), multipart/form-data files, or "
                            'application/json {"instances": [{"b64": "..."}]}')
    if not images or not any(images):
        raise ApiError(400, "the request holds no image data")
    if len(images) > max_images:
        raise ApiError(413, f"{len(images)} images in one request; the maximum is {max_images}")
    return images


async def _multipart_files(request: Request, body: bytes, max_images: int) -> list[bytes]:
    sent = False

    async def receive() -> dict:
        # Replays the already size-checked body to Starlette's multipart parser.
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    replay = Request(request.scope, receive)
    try:
        form = await replay.form(max_files=max_images + 1, max_fields=max_images + 16)
    except Exception as e:  # python-multipart / Starlette raise several types for bad bodies
        status = 413 if "too many" in str(e).lower() else 400
        raise ApiError(status, f"malformed multipart body: {e}") from None
    files = [v for _, v in form.multi_items() if hasattr(v, "read")]
    if not files:
        raise ApiError(400, "multipart body holds no file parts")
    try:
        return [await f.read() for f in files]
    finally:
        await form.close()


def _json_instances(body: bytes) -> list[bytes]:
    try:
        req = PredictJSON.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, f'invalid JSON body at {loc}: {first["msg"]} (expected '
                            '{"instances": [{"b64": "..."}]})') from None
    return [decode_b64(inst.b64, f"instances[{i}].b64") for i, inst in enumerate(req.instances)]
