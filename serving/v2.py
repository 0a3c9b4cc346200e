"""Open Inference Protocol (KServe v2) REST codec: request parsing, tensors, responses.

The model has two alternative inputs — give exactly one per request:

* ``images``: BYTES, shape ``[N]`` (or ``[N, 1]``), each element one encoded image file. In JSON
  ``data`` an element is a base64 string (JSON cannot carry raw bytes; a ``data:`` URL prefix is
  accepted). With the binary tensor data extension (what ``tritonclient.http`` sends by
  default) elements are the raw file bytes; an element that is pure base64 text is decoded too.
* ``pixels``: FP32, shape ``[N, C, S, S]``, already preprocessed exactly as ``/v2`` metadata says.

Outputs: ``probabilities`` FP32 ``[N, num_classes]`` (calibrated, prior-corrected) and
``labels`` BYTES ``[N]`` (the decision per image). Tensor data may be flat or nested (row-major).
Binary outputs are returned when ``binary_data_output`` (request) or ``binary_data`` (output)
parameters ask for them, as in Triton's ``binary_tensor_data`` extension.
"""

from __future__ import annotations

import json
import math
import struct
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

import imgpipe
from imgpipe.bundle import BundleMeta
from serving.errors import ApiError
from serving.inputs import decode_b64
from serving.schemas import (
    V2InferenceRequest,
    V2InferenceResponse,
    V2MetadataTensor,
    V2ModelMetadata,
    V2RequestInput,
    V2ResponseOutput,
    V2ServerMetadata,
)

PLATFORM = "pytorch_safetensors"
EXTENSIONS = ["binary_tensor_data"]
INPUT_IMAGES, INPUT_PIXELS = "images", "pixels"
OUTPUT_PROBABILITIES, OUTPUT_LABELS = "probabilities", "labels"
HEADER_LENGTH = "Inference-Header-Content-Length"
_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_\r\n")


@dataclass
class V2Inputs:
    """The one input a request carried: encoded images or a preprocessed float batch."""

    images: list[bytes] | None = None
    pixels: np.ndarray | None = None  # float32 (N, C, S, S)


def server_metadata() -> V2ServerMetadata:
    return V2ServerMetadata(name="imgpipe", version=imgpipe.__version__, extensions=EXTENSIONS)


def model_metadata(meta: BundleMeta) -> V2ModelMetadata:
    """``GET /v2/models/{name}``: the two alternative inputs and the two outputs."""
    pre, c = meta.preprocess, meta.architecture.num_classes
    return V2ModelMetadata(
        name=meta.name, versions=[str(meta.version)], platform=PLATFORM,
        inputs=[
            V2MetadataTensor(name=INPUT_IMAGES, datatype="BYTES", shape=[-1]),
            V2MetadataTensor(name=INPUT_PIXELS, datatype="FP32",
                             shape=[-1, pre.channels, pre.image_size, pre.image_size]),
        ],
        outputs=[
            V2MetadataTensor(name=OUTPUT_PROBABILITIES, datatype="FP32", shape=[-1, c]),
            V2MetadataTensor(name=OUTPUT_LABELS, datatype="BYTES", shape=[-1]),
        ],
    )


def parse_request(body: bytes, header_length: str | None) -> tuple[V2InferenceRequest, bytes]:
    """Split the JSON header from the binary tail (if any) and validate the JSON.

    Raises ApiError(400) with a message for anything malformed.
    """
    split = len(body)
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise ApiError(400, f"invalid {HEADER_LENGTH} header {header_length!r} "
                                f"for a body of {len(body)} bytes")
        split = int(header_length)
    try:
        req = V2InferenceRequest.model_validate_json(body[:split])
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, f"invalid inference request at {loc}: {first['msg']}") from None
    return req, body[split:]


def _binary_sections(req: V2InferenceRequest, tail: bytes) -> dict[str, bytes]:
    out, offset = {}, 0
    for inp in req.inputs:
        size = (inp.parameters or {}).get("binary_data_size")
        if size is None:
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ApiError(400, f"input {inp.name!r}: binary_data_size must be an integer >= 0")
        if offset + size > len(tail):
            raise ApiError(400, f"input {inp.name!r}: binary data is shorter than declared")
        out[inp.name] = tail[offset:offset + size]
        offset += size
    if offset != len(tail):
        raise ApiError(400, f"{len(tail) - offset} bytes of binary data belong to no input")
    return out


def decode_inputs(req: V2InferenceRequest, tail: bytes, channels: int, size: int,
                  max_images: int) -> V2Inputs:
    """Validate names/datatypes/shapes and decode the request's single input."""
    names = [i.name for i in req.inputs]
    if len(set(names)) != len(names):
        raise ApiError(400, f"duplicate input names {names}")
    unknown = set(names) - {INPUT_IMAGES, INPUT_PIXELS}
    if unknown:
        raise ApiError(400, f"unknown input(s) {sorted(unknown)}; this model takes "
                            f"{INPUT_IMAGES!r} (BYTES) or {INPUT_PIXELS!r} (FP32)")
    if len(names) != 1:
        raise ApiError(400, f"give exactly one of {INPUT_IMAGES!r} or {INPUT_PIXELS!r}, "
                            f"got {names}")
    binary = _binary_sections(req, tail)
    inp = req.inputs[0]
    if inp.data is not None and inp.name in binary:
        raise ApiError(400, f"input {inp.name!r}: both data and binary_data_size given")
    if inp.data is None and inp.name not in binary:
        raise ApiError(400, f"input {inp.name!r}: no data")
    if inp.name == INPUT_IMAGES:
        return V2Inputs(images=_decode_images(inp, binary.get(inp.name), max_images))
    return V2Inputs(pixels=_decode_pixels(inp, binary.get(inp.name), channels, size, max_images))


def _batch_size(inp: V2RequestInput, max_images: int) -> int:
    if not inp.shape or any(isinstance(d, bool) or d < 0 for d in inp.shape):
        raise ApiError(400, f"input {inp.name!r}: shape must be non-negative integers, "
                            f"got {inp.shape}")
    n = inp.shape[0]
    if n < 1:
        raise ApiError(400, f"input {inp.name!r}: empty batch (shape {inp.shape})")
    if n > max_images:
        raise ApiError(413, f"input {inp.name!r}: {n} images in one request; the maximum "
                            f"is {max_images}")
    return n


def _flatten(data: list[Any], depth: int = 0) -> list[Any]:
    if depth > 8:
        raise ApiError(400, "tensor data nested too deeply")
    out: list[Any] = []
    for x in data:
        out.extend(_flatten(x, depth + 1) if isinstance(x, list) else [x])
    return out


def _deserialize_bytes(raw: bytes, name: str) -> list[bytes]:
    """Triton's BYTES wire format: each element is a little-endian uint32 length + bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ApiError(400, f"input {name!r}: truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise ApiError(400, f"input {name!r}: BYTES element longer than the data")
        items.append(raw[offset:offset + n])
        offset += n
    return items


def _maybe_b64(item: bytes, what: str) -> bytes:
    # Raw image files always hold bytes outside the base64 alphabet (PNG starts 0x89,
    # JPEG 0xFF, GIF/BMP/TIFF headers have binary fields), so pure base64 text is an encoding.
    if item and set(item) <= _B64_ALPHABET:
        try:
            return decode_b64(item.decode("ascii"), what)
        except ApiError:
            pass  # not base64 after all: let the image decoder say what it is not
    return item


def _decode_images(inp: V2RequestInput, raw: bytes | None, max_images: int) -> list[bytes]:
    if inp.datatype != "BYTES":
        raise ApiError(400, f"input {INPUT_IMAGES!r}: datatype must be BYTES, "
                            f"got {inp.datatype!r}")
    n = _batch_size(inp, max_images)
    if math.prod(inp.shape) != n:
        raise ApiError(400, f"input {INPUT_IMAGES!r}: shape must be [N] or [N, 1], "
                            f"got {inp.shape}")
    if raw is not None:
        items = [_maybe_b64(b, f"{INPUT_IMAGES}[{i}]")
                 for i, b in enumerate(_deserialize_bytes(raw, INPUT_IMAGES))]
    else:
        items = [decode_b64(s, f"{INPUT_IMAGES}[{i}]") for i, s in enumerate(_flatten(inp.data))]
    if len(items) != n:
        raise ApiError(400, f"input {INPUT_IMAGES!r}: shape {inp.shape} needs {n} elements, "
                            f"data has {len(items)}")
    return items


def _decode_pixels(inp: V2RequestInput, raw: bytes | None, channels: int, size: int,
                   max_images: int) -> np.ndarray:
    if inp.datatype != "FP32":
        raise ApiError(400, f"input {INPUT_PIXELS!r}: datatype must be FP32, "
                            f"got {inp.datatype!r}")
    n = _batch_size(inp, max_images)
    want = [n, channels, size, size]
    if list(inp.shape) != want:
        raise ApiError(400, f"input {INPUT_PIXELS!r}: shape must be {want} "
                            f"([N, C, S, S] as preprocessed), got {inp.shape}")
    try:
        if raw is not None:
            arr = np.frombuffer(raw, dtype="<f4")
        else:
            arr = np.asarray(_flatten(inp.data), dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise ApiError(400, f"input {INPUT_PIXELS!r}: data is not FP32 numbers: {e}") from None
    if arr.size != math.prod(want):
        raise ApiError(400, f"input {INPUT_PIXELS!r}: shape {want} needs {math.prod(want)} "
                            f"values, data has {arr.size}")
    if not np.isfinite(arr).all():
        raise ApiError(400, f"input {INPUT_PIXELS!r}: values must be finite")
    return arr.astype(np.float32).reshape(want)


def _wanted_outputs(req: V2InferenceRequest) -> list[tuple[str, bool]]:
    """(name, binary) for each output to return, in request order (all by default)."""
    default_binary = bool((req.parameters or {}).get("binary_data_output", False))
    if not req.outputs:
        return [(OUTPUT_PROBABILITIES, default_binary), (OUTPUT_LABELS, default_binary)]
    out = []
    for o in req.outputs:
        if o.name not in (OUTPUT_PROBABILITIES, OUTPUT_LABELS):
            raise ApiError(400, f"unknown output {o.name!r}; this model produces "
                                f"{OUTPUT_PROBABILITIES!r} and {OUTPUT_LABELS!r}")
        out.append((o.name, bool((o.parameters or {}).get("binary_data", default_binary))))
    return out


def encode_response(req: V2InferenceRequest, meta: BundleMeta, probs: np.ndarray,
                    labels: list[str]) -> tuple[bytes, dict[str, str], str]:
    """(body, extra headers, media type) of the inference response."""
    tensors: dict[str, tuple[list[int], str, Any, bytes]] = {
        OUTPUT_PROBABILITIES: (list(probs.shape), "FP32", probs.astype(np.float32),
                               probs.astype("<f4").tobytes()),
        OUTPUT_LABELS: ([len(labels)], "BYTES", labels,
                        b"".join(struct.pack("<I", len(b)) + b
                                 for b in (s.encode() for s in labels))),
    }
    outputs, tail = [], []
    for name, binary in _wanted_outputs(req):
        shape, dtype, values, raw = tensors[name]
        if binary:
            tail.append(raw)
            outputs.append(V2ResponseOutput(name=name, shape=shape, datatype=dtype,
                                            parameters={"binary_data_size": len(raw)}))
        else:
            data = values.reshape(-1).tolist() if isinstance(values, np.ndarray) else values
            outputs.append(V2ResponseOutput(name=name, shape=shape, datatype=dtype, data=data))
    resp = V2InferenceResponse(model_name=meta.name, model_version=str(meta.version),
                               id=req.id if req.id is not None else uuid.uuid4().hex,
                               outputs=outputs)
    header = json.dumps(resp.model_dump(exclude_none=True), separators=(",", ":")).encode()
    if not tail:
        return header, {}, "application/json"
    return header + b"".join(tail), {HEADER_LENGTH: str(len(header))}, "application/octet-stream"
