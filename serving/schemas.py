"""Typed shapes of the serving layer: builder args, live config, and HTTP bodies.

``ServeArgs`` is what ``serve run`` / ``serve deploy`` pass as ``args:`` (validated by the typed
builder). ``LiveConfig`` is the deployment's ``user_config``: operators change it without
restarting replicas (``reconfigure``). The v2 models follow the Open Inference Protocol REST
spec field for field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import CliSuppress

from imgpipe.config.specs import parse_prior
from imgpipe.constants import PRIOR_CHOICES
from serving.prediction_log import PredictionLogSettings

TOKEN_ENV = "IMGPIPE_SERVE_TOKEN"
MODEL_DEPLOYMENT = "ImgpipeModel"  # the name config files use to override its options
MiB = 1024 * 1024
DECODED_BYTES_PER_PIXEL = 8  # peak while decoding + converting: see serving.budget


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LiveConfig(_Strict):
    """Settings a running deployment takes through ``user_config`` (no replica restart).

    ``None`` calibration fields mean "as the bundle says"; each reconfigure starts from the
    bundle again, so removing an override restores the bundle value.
    """

    max_batch_size: int = Field(16, ge=1, le=1024, description="1 turns dynamic batching off")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=1)
    temperature: float | None = Field(None, gt=0)
    deployment_prior: Literal[PRIOR_CHOICES] | list[float] | None = None
    decision_threshold: float | None = Field(None, gt=0, lt=1)


class ServeArgs(_Strict):
    """Arguments of ``serving.app:build_app`` (the ``args:`` block of ``serving/config.yaml``)."""

    bundle: str = Field(description="bundle version folder, or bundles/<name> for the latest")
    max_batch_size: int = Field(16, ge=1, le=1024, description="1 turns dynamic batching off")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=1)
    min_replicas: int = Field(2, ge=1, description="replicas kept up: HTTP parsing and decoding "
                              "hold a replica's GIL, so two processes use two cores")
    max_replicas: int = Field(4, ge=1, description="autoscaling ceiling")
    target_ongoing_requests: float = Field(8.0, gt=0)
    max_ongoing_requests: int = Field(32, ge=1, description="per replica, HTTP requests")
    max_queued_requests: int = Field(64, ge=-1, description="requests waiting per replica "
                                     "(HAProxy ingress) or per proxy (Serve's proxy); beyond "
                                     "→ 503. -1: unbounded")
    num_cpus: float = Field(0.25, gt=0, description="logical CPUs per replica (fractional ok)")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (fractional ok: 0.25 packs "
                            "four replicas on one GPU); above 0 the model runs on CUDA")
    replica_memory_mb: int = Field(2048, ge=256, description="memory Ray reserves per replica "
                                   "(ray_actor_options.memory); the decode budget derives from it")
    decode_memory_fraction: float = Field(0.25, gt=0, le=0.9, description="share of "
                                          "replica_memory_mb for decoded pixels in flight")
    decode_wait_s: float = Field(2.0, ge=0, description="how long a request waits for decode "
                                 "budget before 503 + Retry-After")
    access_log: bool = Field(False, description="Serve's per-request access log lines (proxy "
                             "and replica); /metrics counts every request either way")
    torch_threads: int = Field(1, ge=1, description="intra-op threads per replica")
    max_body_bytes: int = Field(10 * MiB, ge=1024)
    max_images_per_request: int = Field(64, ge=1)
    max_image_pixels: int = Field(16_000_000, ge=1, description="width*height of a source image")
    # never a command-line flag (argv is visible to every user): jobs/serve.py refuses it
    token: CliSuppress[SecretStr | None] = Field(None, description=f"bearer token; else ${TOKEN_ENV}")
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    temperature: float | None = Field(None, gt=0, description="override the bundle's")
    deployment_prior: Literal[PRIOR_CHOICES] | list[float] | None = None
    decision_threshold: float | None = Field(None, gt=0, lt=1)
    prediction_log: PredictionLogSettings | None = Field(None, description="off when absent")

    @field_validator("deployment_prior", mode="before")
    @classmethod
    def _prior_text(cls, v: Any) -> Any:
        """``balanced`` / ``0.2,0.8`` as typed on the command line (where a lone name arrives
        as a one-element list) → the prior the field holds."""
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
            v = v[0]
        return parse_prior(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _replicas(self) -> ServeArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})"
            )
        one_image = self.max_image_pixels * DECODED_BYTES_PER_PIXEL
        if self.decode_budget_bytes < one_image:
            raise ValueError(
                f"decode budget (replica_memory_mb x decode_memory_fraction = "
                f"{self.decode_budget_bytes // MiB} MiB) cannot hold one image of "
                f"max_image_pixels ({one_image // MiB} MiB decoded)")
        return self

    @property
    def decode_budget_bytes(self) -> int:
        """Decoded pixel bytes one replica may hold in flight."""
        return int(self.replica_memory_mb * MiB * self.decode_memory_fraction)

    def live_config(self) -> LiveConfig:
        """The ``user_config`` part of these args."""
        return LiveConfig(**{k: getattr(self, k) for k in LiveConfig.model_fields})


class ReplicaSettings(_Strict):
    """What a replica needs at construction (everything not live-changeable)."""

    bundle: str
    torch_threads: int
    device: str = "cpu"
    max_body_bytes: int
    max_images_per_request: int
    max_image_pixels: int
    token: SecretStr | None
    decode_budget_bytes: int = 512 * MiB
    decode_wait_s: float = 2.0
    prediction_log: PredictionLogSettings | None = None


# ----- /v1 -----------------------------------------------------------------------------------


class B64Image(_Strict):
    b64: str = Field(description="base64 of the encoded image file (PNG, JPEG, ...)")


class PredictJSON(_Strict):
    """``POST /v1/predict`` with ``Content-Type: application/json``."""

    instances: list[B64Image] = Field(min_length=1)


class LabelProbability(BaseModel):
    label: str
    probability: float


class ImagePrediction(BaseModel):
    label: str = Field(description="decision: top-1, or the bundle's binary threshold")
    top_k: list[LabelProbability]


class PredictResponse(BaseModel):
    model_name: str
    model_version: str
    predictions: list[ImagePrediction]


class Calibration(BaseModel):
    temperature: float
    deployment_prior: str | list[float]
    decision_threshold: float | None
    model_prior: list[float]


class ModelCard(BaseModel):
    name: str
    version: str
    class_names: list[str]
    num_classes: int
    architecture: dict[str, Any]
    preprocess: dict[str, Any]
    train_class_counts: list[int]
    calibration: Calibration
    metrics: dict[str, Any]
    created_at: str
    code_version: str


class ModelsResponse(BaseModel):
    models: list[ModelCard]


# ----- /v2 (Open Inference Protocol) ---------------------------------------------------------

Parameters = dict[str, str | int | float | bool]


class _V2Request(BaseModel):
    # Strict: JSON "2" is not the integer 2 (the schema says integer; so does the server).
    model_config = ConfigDict(strict=True)


_Dim = Annotated[int, Field(gt=0)]  # a tensor dimension


class _V2Input(_V2Request):
    parameters: Parameters | None = None
    data: list[Any] | None = None  # absent when sent as binary (binary_data_size)


class V2ImagesInput(_V2Input):
    """Encoded image files: BYTES, shape ``[N]`` or ``[N, 1]``, base64 strings in JSON."""

    name: Literal["images"]
    shape: list[_Dim] = Field(min_length=1, max_length=2, description="[N] or [N, 1]")
    datatype: Literal["BYTES"]


class V2PixelsInput(_V2Input):
    """Preprocessed pixels: FP32, shape ``[N, C, S, S]`` as ``/v2/models/{name}`` says."""

    name: Literal["pixels"]
    shape: list[_Dim] = Field(min_length=4, max_length=4, description="[N, C, S, S]")
    datatype: Literal["FP32"]


# This model takes one of two inputs; the schema refuses anything else, as the server does.
V2RequestInput = Annotated[V2ImagesInput | V2PixelsInput, Field(discriminator="name")]


class V2RequestOutput(_V2Request):
    name: Literal["probabilities", "labels"]
    parameters: Parameters | None = None


class V2InferenceRequest(_V2Request):
    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[V2RequestInput] = Field(min_length=1, max_length=1,
                                         description="exactly one: images or pixels")
    outputs: list[V2RequestOutput] | None = None


class V2ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class V2InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str
    parameters: Parameters | None = None
    outputs: list[V2ResponseOutput]


class V2MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2MetadataTensor]
    outputs: list[V2MetadataTensor]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Error(BaseModel):
    """Open Inference Protocol error body (every /v2 error)."""

    error: str


class ErrorDetail(BaseModel):
    """Error body of /v1 and the ops routes (FastAPI's shape)."""

    detail: str
