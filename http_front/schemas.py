"""The HTTP API's request and response bodies as msgspec types.

The front decodes requests into these types (http_front.validation) and /openapi.json
publishes their JSON Schemas (http_front.openapi), so the document cannot drift from what
the front accepts. Response types describe the dicts the resources write; tests/test_fuzz.py
checks real responses against them. Response types accept unknown fields: clients must too.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from genserve import catalog
from genserve.spec import LoraRef
from genserve.urls import MAX_URL_LENGTH

# Literals spelled out for readers and type checkers; tests/test_openapi.py checks them against the catalog.
Mode = Literal["text2img", "img2img", "fill", "controlnet", "redux"]
ControlType = Literal["depth", "canny", "openpose"]
TaskStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
OutputFormat = Literal["png", "jpeg", "webp"]
Speed = Literal["quality", "fast"]
WebhookEvent = Literal["start", "completed", "failed", "cancelled"]  # genserve.catalog.WEBHOOK_EVENTS
Permission = Literal["generation", "readonly", "admin", "all", "metrics"]

MAX_SEED = 2**63 - 1
IMAGE_NOTE = "a data URI (data:image/png;base64,...) or bare base64 of a PNG, JPEG or WebP image, at most 10 MB"


# ---- requests -----------------------------------------------------------------------------

class LoraRequest(msgspec.Struct, frozen=True):
    """One LoRA to apply: a file listed by GET /loras, with or without `.safetensors`."""

    name: Annotated[str, Meta(min_length=1, max_length=512, examples=["cute_cat_lora"])]
    weight: Annotated[float, Meta(ge=0, le=2)] = catalog.DEFAULT_LORA_WEIGHT


def _size(max_size: int, which: str) -> Any:
    return Annotated[int, Meta(ge=catalog.SIZE_STEP, le=max_size, description=(
        f"output {which}, rounded down to a multiple of {catalog.SIZE_STEP}; default "
        f"{catalog.DEFAULT_WIDTH}, or the input image's for {', '.join(catalog.SIZE_FROM_IMAGE)}"))]


def _image(mode_list: str) -> Any:
    return Annotated[str, Meta(description=f"{IMAGE_NOTE}; needed by {mode_list}, ignored otherwise")]


def _needed_by(field: str) -> str:
    return ", ".join(mode for mode, names in catalog.REQUIRED_IMAGES.items() if field in names)


@lru_cache(maxsize=8)
def generate_body_type(max_prompt: int = 1000, max_size: int = 2048) -> type[msgspec.Struct]:
    """The POST /generate body type for these limits (MAX_PROMPT_LENGTH, MAX_IMAGE_SIZE)."""
    models = ", ".join(catalog.MODEL_IDS)
    defaults = ", ".join(f"{mode}: {model}" for mode, model in catalog.DEFAULT_MODEL.items())
    fields: list[tuple[str, Any, Any]] = [
        ("prompt", Annotated[str, Meta(max_length=max_prompt, description=(
            "what to draw; required and not blank, except for redux"))] | UnsetType, UNSET),
        ("model_id", Annotated[str, Meta(min_length=1, max_length=64, description=(
            f"one of {models}; default by mode ({defaults}; controlnet: the model of controlnet_type)"
            ". An unknown id is a 400 naming the served ones; a model no live node serves, a 503"))] | UnsetType, UNSET),
        ("mode", Mode, catalog.DEFAULT_MODE),
        ("width", _size(max_size, "width") | UnsetType, UNSET),
        ("height", _size(max_size, "height") | UnsetType, UNSET),
        ("num_inference_steps", Annotated[int, Meta(ge=1, le=100)], catalog.DEFAULT_STEPS),
        ("cfg", Annotated[float, Meta(ge=0, le=50, description=(
            f"guidance scale; default {catalog.FILL_DEFAULT_CFG:g} for fill, else {catalog.DEFAULT_CFG:g}"))]
         | UnsetType, UNSET),
        ("seed", Annotated[int, Meta(ge=0, le=MAX_SEED)], catalog.DEFAULT_SEED),
        ("priority", Annotated[int, Meta(ge=catalog.MIN_PRIORITY, le=catalog.MAX_PRIORITY, description=(
            f"lower runs first; default {catalog.DEFAULT_PRIORITY}, or the key's priority_floor when that is"
            " higher; a key may not ask for a lower number than its priority_floor (403)"))] | UnsetType, UNSET),
        ("strength", Annotated[float, Meta(gt=0, le=1, description="img2img: how much changes")],
         catalog.DEFAULT_STRENGTH),
        ("controlnet_type", Annotated[ControlType, Meta(description=(
            "controlnet only; default: the model's own; another type than the model's is a 422"))]
         | UnsetType, UNSET),
        ("loras", Annotated[list[LoraRequest], Meta(max_length=catalog.MAX_LORAS)], []),
        ("output_format", Annotated[OutputFormat, Meta(description="the result's image format")],
         catalog.DEFAULT_OUTPUT_FORMAT),
        ("output_quality", Annotated[int, Meta(ge=1, le=100, description=(
            "jpeg and webp quality; png is lossless and ignores it"))], catalog.DEFAULT_OUTPUT_QUALITY),
        ("speed", Annotated[Speed, Meta(description=(
            "fast: the node's step cache (First Block Cache) skips transformer passes whose first block barely"
            " changed; quality: every pass runs. Default: the node's setting. The result's metadata says which"
            " ran"))] | UnsetType, UNSET),
        ("webhook", Annotated[str, Meta(max_length=MAX_URL_LENGTH, description=(
            "http(s) URL the server POSTs the task's events to, signed as Standard Webhooks; by default"
            " loopback, private and link-local targets are refused"))] | UnsetType, UNSET),
        ("webhook_events_filter", Annotated[list[WebhookEvent], Meta(min_length=1, max_length=4, description=(
            "which events to send (default: all): start, completed, failed, cancelled"))] | UnsetType, UNSET),
        ("is_async", Annotated[bool, Meta(description="true: answer 202 at once and poll /task/{task_id}")],
         msgspec.field(default=False, name="async")),
        *((name, _image(_needed_by(name)) | UnsetType, UNSET) for name in catalog.IMAGE_FIELDS),
    ]
    body = msgspec.defstruct("GenerateRequest", fields, module=__name__)
    body.__doc__ = ("A generation request. Unknown fields are ignored; types are strict (\"64\" is not "
                    "an integer; NaN and Infinity are refused).")
    return body


GenerateBody = generate_body_type()  # with the default limits


_WEIGHT_NOTE = (f"fair share against other keys at the same priority, {catalog.MIN_WEIGHT:g} to "
                f"{catalog.MAX_WEIGHT:g} (default 1): a key of weight 2 gets twice the GPU time of a key of weight 1")
_FLOOR_NOTE = (f"the most urgent priority the key may ask for, {catalog.MIN_PRIORITY} to {catalog.MAX_PRIORITY}; "
               f"default {catalog.DEFAULT_PRIORITY_FLOOR} ({catalog.MIN_PRIORITY} for admin keys)")


class NewKeyRequest(msgspec.Struct):
    """POST /auth/generate-key: a name and a comma list of permissions (JSON: also a list)."""

    name: Annotated[str, Meta(min_length=1, max_length=100, description="printable, without ':'")]
    permissions: Annotated[str, Meta(examples=["generation,readonly"])] | list[Permission]
    weight: Annotated[str | float, Meta(description=_WEIGHT_NOTE, examples=["2"])] | UnsetType = UNSET
    priority_floor: Annotated[str | int, Meta(description=_FLOOR_NOTE, examples=["0"])] | UnsetType = UNSET


class UpdateKeyRequest(msgspec.Struct):
    """POST /auth/update-key: a file key's scheduling, by key_id (at least one of the two fields)."""

    key_id: Annotated[str, Meta(min_length=1, description="as GET /auth/keys shows it; must name one key")]
    weight: Annotated[str | float, Meta(description=_WEIGHT_NOTE, examples=["2"])] | UnsetType = UNSET
    priority_floor: Annotated[str | int, Meta(description=_FLOOR_NOTE + "; `default` resets it",
                                              examples=["-10"])] | UnsetType = UNSET


class DeleteKeyRequest(msgspec.Struct):
    """POST /auth/delete-key: the whole key."""

    api_key: Annotated[str, Meta(min_length=1)]


class DeleteKeyByIdRequest(msgspec.Struct):
    """POST /auth/delete-key-by-id: the key's first 8 and last 4 characters, as `first8-last4`."""

    key_id: Annotated[str, Meta(min_length=1)]


class DeleteKeyByNameRequest(msgspec.Struct):
    """POST /auth/delete-key-by-name: every file key with this name."""

    name: Annotated[str, Meta(min_length=1)]


# ---- errors -------------------------------------------------------------------------------

class ErrorBody(msgspec.Struct):
    """Every error except authentication, permission and per-key rate limits."""

    success: Annotated[bool, Meta(description="always false")]
    error: Annotated[str, Meta(description="short description")]
    detail: Annotated[str, Meta(description="longer explanation")]
    field: Annotated[str, Meta(description="the request field at fault")] | UnsetType = UNSET
    supported: Annotated[list[str], Meta(description="modes the model supports")] | UnsetType = UNSET
    served: Annotated[list[str], Meta(description="model ids live nodes serve")] | UnsetType = UNSET
    error_code: Annotated[str, Meta(description="why a task failed")] | UnsetType = UNSET
    task_status: str | UnsetType = UNSET
    task_id: str | UnsetType = UNSET


class AuthErrorBody(msgspec.Struct):
    """Authentication (401), permission (403) and rate-limit (429) errors."""

    detail: str


# ---- service information ------------------------------------------------------------------

class RootBody(msgspec.Struct):
    """GET /."""

    service: str
    version: str
    status: str
    endpoints: list[str]


class HealthBody(msgspec.Struct):
    """GET /health, 200 when healthy and 503 when not."""

    status: Literal["healthy", "unhealthy"]
    broker: Literal["ok", "unreachable"]
    nodes: int
    reason: str | None
    queue_length: int | UnsetType = UNSET


class LoraInfo(msgspec.Struct):
    """A LoRA file the nodes can load."""

    name: Annotated[str, Meta(description="relative to the LoRA folder, with .safetensors")]
    size_mb: float
    category: Annotated[str, Meta(description="its sub-folder; \"root\" at the top")]


class NodeInfo(msgspec.Struct):
    """A registered GPU node."""

    node_id: str
    device: str
    host: str
    pid: int
    state: Annotated[str, Meta(examples=["idle", "busy", "draining"])]
    draining: bool
    task_id: Annotated[str | None, Meta(description="its running task; null for keys without admin")]
    models: Annotated[dict[str, list[str]], Meta(description="model id to modes")]
    loaded: Annotated[list[str], Meta(description="models in memory")]
    loras: list[LoraInfo]
    memory_total: Annotated[int, Meta(description="bytes")]
    memory_free: Annotated[int, Meta(description="bytes")]
    last_heartbeat_age_s: float
    jobs_done: int


class QueueInfo(msgspec.Struct):
    """Waiting tasks, in all and per model."""

    length: int
    by_model: dict[str, int]


class StatusBody(msgspec.Struct):
    """GET /status."""

    success: bool
    status: str
    queue: QueueInfo
    tasks: Annotated[dict[str, int], Meta(description="task counts by state")]
    nodes: list[NodeInfo]
    node_count: int
    busy_nodes: int


class ModelInfo(msgspec.Struct):
    """A model some live node serves."""

    model_id: str
    modes: list[Mode]
    controlnet_type: ControlType | None
    nodes: list[str]
    loaded_on: list[str]
    loaded: bool


class ModelsBody(msgspec.Struct):
    """GET /models."""

    success: bool
    models: list[ModelInfo]
    total: int
    known_model_ids: list[str]
    default_model: str


class LorasBody(msgspec.Struct):
    """GET /loras."""

    success: bool
    loras: list[LoraInfo]
    total: int


# ---- tasks --------------------------------------------------------------------------------

class AuthInfo(msgspec.Struct):
    """The key a request was made with."""

    user: str
    permissions: list[str]


class Progress(msgspec.Struct):
    """Denoising steps done of those planned."""

    step: int
    total: int


class ImageMetadata(msgspec.Struct):
    """How a completed task's image was made."""

    prompt: str
    model_id: str
    mode: Mode
    generation_time: float | None
    seed: int | None
    cfg: Annotated[float | None, Meta(description="the guidance used")]
    steps: int | None
    width: int | None
    height: int | None
    loras: list[LoraRef]
    format: OutputFormat
    speed: Annotated[Speed, Meta(description="quality: every transformer pass ran; fast: the step cache was on")] \
        | UnsetType = UNSET
    lora_load: Annotated[Literal["hotswap", "reload"], Meta(description=(
        "hotswap: packed into the node's resident LoRA slots (no recompilation); reload: loaded for this"
        " job only"))] | UnsetType = UNSET
    lora_seconds: Annotated[float, Meta(description="seconds spent putting the LoRAs on the model")] \
        | UnsetType = UNSET
    batch: Annotated[int, Meta(ge=2, description=(
        "images made in the same pipeline call as this one (other tasks with the same model, size, steps,"
        " cfg, speed and LoRAs); absent when it ran alone"))] | UnsetType = UNSET


class TaskBody(msgspec.Struct):
    """A task: its state and, once completed, its image (GET /task/{task_id}, synchronous /generate)."""

    success: bool
    task_id: str
    status: TaskStatus
    model_id: str
    mode: Mode
    controlnet_type: ControlType | None
    priority: int
    error: str | None
    node_id: str | None
    attempts: int
    created_at: float | None
    started_at: float | None
    finished_at: float | None
    auth_info: Annotated[AuthInfo, Meta(description="the key of this request (not in /tasks pages)")] \
        | UnsetType = UNSET
    queue_position: Annotated[int | None, Meta(description="tasks ahead; null once out of the queue")] \
        | UnsetType = UNSET
    progress: Progress | UnsetType = UNSET
    image: Annotated[str, Meta(description="the PNG as a data URI")] | UnsetType = UNSET
    image_base64: Annotated[str, Meta(description="the same PNG as bare base64")] | UnsetType = UNSET
    image_url: Annotated[str, Meta(description=(
        "GET it without a key: /task/{task_id}/image with a signed expires and sig, valid 15 minutes"))] \
        | UnsetType = UNSET
    events_url: Annotated[str, Meta(description=(
        "while the task has not ended: its event stream, /task/{task_id}/events with a signed expires and"
        " sig (for a browser's EventSource, which cannot send a key), valid 15 minutes"))] | UnsetType = UNSET
    metadata: ImageMetadata | UnsetType = UNSET
    elapsed_time: float | None | UnsetType = UNSET
    queue_time: float | None | UnsetType = UNSET
    gpu_id: str | None | UnsetType = UNSET
    error_code: str | UnsetType = UNSET
    result_expired: Annotated[bool, Meta(description=(
        "completed, but the image was removed to respect the disk budget"))] | UnsetType = UNSET
    detail: str | UnsetType = UNSET


class CancelledBody(TaskBody, kw_only=True):
    """DELETE /task/{task_id}: the cancelled task."""

    message: str


class AcceptedBody(msgspec.Struct):
    """202: an asynchronous submission, or a synchronous one that outlived the task timeout."""

    success: bool
    task_id: str
    status: Literal["queued", "pending"]
    queue_position: int | None | UnsetType = UNSET
    events_url: Annotated[str, Meta(description="the task's event stream, signed (no key needed)")] \
        | UnsetType = UNSET
    detail: str | UnsetType = UNSET


# ---- key administration -------------------------------------------------------------------

class KeyListing(msgspec.Struct):
    """One API key, never the key itself."""

    key_id: str
    key_preview: str
    name: str
    permissions: list[str]
    source: Literal["environment", "file", "default"]
    created_at: float
    last_used: float | None
    usage_count: int
    can_delete: bool
    weight: Annotated[float, Meta(description="fair-share weight against other keys at one priority")]
    priority_floor: Annotated[int, Meta(description="the most urgent priority this key may ask for")]


class UpdateKeyBody(msgspec.Struct):
    """200: the key after the change."""

    success: bool
    key: KeyListing


class KeysBody(msgspec.Struct):
    """GET /auth/keys."""

    success: bool
    keys: list[KeyListing]
    total: int


class NewKeyBody(msgspec.Struct):
    """201: a new key, shown this once."""

    success: bool
    api_key: str
    key_id: str
    name: str
    permissions: list[str]
    config_string: Annotated[str, Meta(description="key:name:permissions, as API_KEY_N takes it")]
    weight: float
    priority_floor: int
    message: str


class DeletedKey(msgspec.Struct):
    """A deleted key."""

    key_id: str
    key_preview: str
    name: str
    permissions: list[str]


class DeletedBody(msgspec.Struct):
    """The keys a delete removed."""

    success: bool
    message: str
    deleted_keys: list[DeletedKey]


class ReloadBody(msgspec.Struct):
    """POST /auth/reload-keys."""

    success: bool
    message: str
    total_keys: int


class TaskListBody(msgspec.Struct):
    """GET /tasks: one page of tasks, newest first, without images."""

    success: bool
    tasks: list[TaskBody]
    count: int
    next_cursor: Annotated[str | None, Meta(description="pass as cursor for the next page; null at the end")]


RESPONSE_TYPES: tuple[type, ...] = (
    ErrorBody, AuthErrorBody, RootBody, HealthBody, StatusBody, ModelsBody, LorasBody, TaskBody,
    CancelledBody, AcceptedBody, KeysBody, NewKeyBody, UpdateKeyBody, DeletedBody, ReloadBody, TaskListBody)
REQUEST_TYPES: tuple[type, ...] = (NewKeyRequest, UpdateKeyRequest, DeleteKeyRequest, DeleteKeyByIdRequest,
                                   DeleteKeyByNameRequest)
