"""Validation of generation requests (JSON and form-data) into one typed TaskSpec.

A body is first checked for what no type can express (NaN/Infinity, lone surrogates, deep
nesting), then converted by msgspec into the request type of http_front.schemas, whose
constraints /openapi.json publishes; then the rules that span fields apply (the images a
mode needs, the model a mode implies, sizes), and every default is filled in.

Size policy: width and height are rounded *down* to a multiple of 16 (the earlier
implementation passed sizes to diffusers, which does the same, so old scripts keep
working); the size actually produced is in ``metadata``. For img2img / fill / redux
without an explicit size, the input image's size is used, scaled down to fit
MAX_IMAGE_SIZE. Input, mask and control images are resized to the output size on the
node, so a 1x1 mask works as the guide shows.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from msgspec import UNSET

from genserve import catalog
from genserve.spec import GenerationParams, LoraRef, TaskSpec, WebhookSpec
from genserve.urls import WebhookRefused, check_url
from http_front.errors import ApiError
from http_front.images import from_base64, inspect
from http_front.schemas import generate_body_type

MAX_DEPTH = 16  # a valid request nests 3 levels (body, loras, one LoRA)
MAX_DETAIL = 300
MAX_FORM_FIELD = 1024 * 1024  # bytes of one text field of a form (a prompt is at most a few KB)
LORA_SUFFIX = ".safetensors"
# Form numbers: plain ASCII decimals only (int()/float() also take "1_0", Arabic-Indic digits, "nan").
_FORM_INT = re.compile(r"[+-]?[0-9]+")
_FORM_NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
_FORM_SPACE = " \t\r\n"
_FORM_BOOLS = {"true": True, "false": False, "1": True, "0": False}
# msgspec's messages end with " - at `$.loras[0].weight`"; missing fields are named in backquotes.
_AT = re.compile(r"^(?P<problem>.*?)(?: - at (?:`key` in )?`\$(?P<path>[^`]*)`)?$", re.DOTALL)
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]+)`")
_INDEX = re.compile(r"\[(\d+)\]")


def check_values(value: Any) -> None:
    """Refuse what a type cannot: NaN/Infinity, lone surrogates, deep nesting (422).

    Iterative, so that no body can exhaust the stack here. Paths are kept as (key, parent)
    links and spelled out only for the error, so wide bodies with long keys cost no copies.
    """
    stack: list[tuple[Any, Any, int]] = [(value, None, 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            _refuse(path, f"nested more than {MAX_DEPTH} levels")
        if isinstance(item, float) and not math.isfinite(item):
            _refuse(path, "must be a finite number (not NaN or Infinity)")
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, dict):
            for key, sub in item.items():
                _check_text(str(key), path)
                stack.append((sub, (key, path), depth + 1))
        elif isinstance(item, list):
            stack.extend((sub, (i, path), depth + 1) for i, sub in enumerate(item))


def _check_text(text: str, path: Any) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        _refuse(path, "not valid Unicode text (lone surrogate)")


def _refuse(path: Any, problem: str) -> None:
    parts: list[str] = []
    while path is not None:
        parts.append(str(path[0]))
        path = path[1]
    raise invalid(".".join(reversed(parts)), problem)


def invalid(where: str, problem: str) -> ApiError:
    """The 422 for one field (`where` a dotted path, "" for the body); client text is bounded."""
    where = where or "body"
    if len(where) > 100:  # paths hold client keys: bound the echo
        where = where[:100] + "..."
    if len(problem) > MAX_DETAIL:
        problem = problem[:MAX_DETAIL] + "..."
    return ApiError(422, "validation error", f"{where}: {problem}", field=where)


def from_msgspec(exc: msgspec.ValidationError) -> ApiError:
    """A msgspec ValidationError as the 422 naming its field (`loras.0.weight`)."""
    match = _AT.match(str(exc))
    problem, path = (match.group("problem"), match.group("path") or "") if match else (str(exc), "")
    parts = [p for p in _INDEX.sub(r".\1", path).split(".") if p]
    missing = _MISSING.match(problem)
    if missing:
        parts.append(missing.group("name"))
        problem = "field required"
    return invalid(".".join(parts), problem.replace("`", ""))


def form_text(name: str, data: bytes) -> str:
    """A form field's bytes as text: UTF-8, at most MAX_FORM_FIELD bytes, or a 422 naming it."""
    if len(data) > MAX_FORM_FIELD:
        raise invalid(name, f"longer than {MAX_FORM_FIELD // 1024} KB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(name, "not UTF-8 text") from None


def _form_kind(kind: Any) -> str:
    """The JSON type a form field's text converts to: integer, number, boolean, array or string."""
    if isinstance(kind, msgspec.inspect.Metadata):  # Annotated with a description or examples
        return _form_kind(kind.type)
    if isinstance(kind, msgspec.inspect.UnionType):
        kinds = [k for k in kind.types if not isinstance(k, (msgspec.inspect.UnsetType, msgspec.inspect.NoneType))]
        return _form_kind(kinds[0]) if len(kinds) == 1 else "string"
    return {msgspec.inspect.IntType: "integer", msgspec.inspect.FloatType: "number",
            msgspec.inspect.BoolType: "boolean", msgspec.inspect.ListType: "array"}.get(type(kind), "string")


@dataclass(frozen=True)
class GenerateRequest:
    """A validated request: the task spec the broker queues and the node runs, and its images."""

    spec: TaskSpec
    images: dict[str, bytes] = field(default_factory=dict)
    is_async: bool = False
    priority_given: bool = True  # False: the default, which the key's priority floor may raise


class RequestValidator:
    """Turns JSON bodies and forms into GenerateRequests, or raises ApiError (400/413/422)."""

    def __init__(self, max_prompt: int = 1000, max_size: int = 2048) -> None:
        self.max_size = max_size
        self.body_type = generate_body_type(max_prompt, max_size)
        info = msgspec.inspect.type_info(self.body_type)
        self.form_kinds = {f.encode_name: _form_kind(f.type) for f in info.fields}

    def coerce_form(self, form: dict[str, str]) -> dict[str, Any]:
        """Turn form-data strings into the JSON types the body type expects (bad ones stay strings)."""
        out: dict[str, Any] = {}
        for name, value in form.items():
            kind = self.form_kinds.get(name)
            text = value.strip(_FORM_SPACE)
            try:
                if kind == "integer" and _FORM_INT.fullmatch(text):
                    out[name] = int(text)
                elif kind == "number" and _FORM_NUMBER.fullmatch(text):
                    out[name] = float(text)  # may overflow to inf: check_values refuses it
                elif kind == "boolean":
                    out[name] = _FORM_BOOLS[text.lower()]
                elif kind == "array":
                    out[name] = json.loads(text) if text else []
                else:
                    out[name] = value
            except (ValueError, KeyError, RecursionError):
                out[name] = value  # the conversion reports the wrong type
        return out

    def validate(self, body: Any, images: Mapping[str, Any]) -> GenerateRequest:
        """Check a decoded body (images taken out) and its images: bytes, or JSON values to decode.

        Only the images the mode needs are decoded and inspected; the others are ignored.
        """
        if not isinstance(body, dict):
            raise ApiError(422, "validation error", "the request body must be a JSON object", field="body")
        check_values(body)
        try:
            parsed = msgspec.convert(integral(body), self.body_type)
        except msgspec.ValidationError as exc:
            raise from_msgspec(exc) from None
        return self._build(parsed, images)

    def _build(self, b: Any, images: Mapping[str, Any]) -> GenerateRequest:
        """Rules across fields, then every default; `b` is an instance of self.body_type."""
        mode: str = b.mode
        prompt = "" if b.prompt is UNSET else b.prompt
        if mode != "redux":
            if b.prompt is UNSET:
                raise invalid("prompt", "field required")
            if not prompt.strip():
                raise invalid("prompt", "must not be empty")
        control = None if b.controlnet_type is UNSET else b.controlnet_type
        model_id = catalog.default_model(mode, control) if b.model_id is UNSET else b.model_id
        # An id outside the catalog goes on to the broker, which answers 400 naming the served ones.
        supported = catalog.MODEL_MODES.get(model_id)
        if supported is not None and mode not in supported:
            raise ApiError(422, "mode not supported by this model",
                           f"{model_id} does not support mode {mode!r}; it supports {list(supported)}",
                           field="mode", supported=list(supported))
        own = catalog.CONTROL_TYPES.get(model_id)
        if mode == "controlnet" and control and own and own != control:
            raise ApiError(422, "mode not supported by this model",
                           f"{model_id} is a {own} model; controlnet_type {control!r} needs "
                           f"{catalog.CONTROL_MODELS[control]}", field="controlnet_type")
        steps = b.num_inference_steps
        if mode == "img2img" and steps - int(max(steps - min(steps * b.strength, steps), 0)) < 1:
            # The step count diffusers' img2img runs: with none (a strength like 1e-20), the job would fail.
            raise ApiError(422, "validation error", "strength: too small for any denoising step to run",
                           field="strength")
        needed = catalog.REQUIRED_IMAGES[mode]
        missing = [name for name in needed if name not in images]
        if missing:
            raise ApiError(400, "missing image", f"mode {mode} requires {', '.join(missing)}", field=missing[0])
        used = {name: _image_bytes(images[name], name) for name in needed}  # any other image is ignored
        sizes = {name: inspect(data, name) for name, data in used.items()}
        width, height = self._output_size(b, mode, sizes)
        params = GenerationParams(
            prompt=prompt, width=width, height=height, num_inference_steps=b.num_inference_steps,
            seed=b.seed, cfg=catalog.default_cfg(mode, model_id) if b.cfg is UNSET else float(b.cfg),
            strength=float(b.strength), controlnet_type=(own or control) if mode == "controlnet" else None,
            loras=[LoraRef(canonical_lora(lora.name), float(lora.weight)) for lora in b.loras],
            output_format=b.output_format, output_quality=b.output_quality,
            speed=None if b.speed is UNSET else b.speed)
        given = b.priority is not UNSET
        spec = TaskSpec(model_id=model_id, mode=mode, priority=b.priority if given else catalog.DEFAULT_PRIORITY,
                        params=params, webhook=webhook(b))
        return GenerateRequest(spec, used, bool(b.is_async), given)

    def _output_size(self, b: Any, mode: str, sizes: dict[str, tuple[int, int]]) -> tuple[int, int]:
        step = catalog.SIZE_STEP
        source = catalog.SIZE_FROM_IMAGE.get(mode)
        if b.width is not UNSET or b.height is not UNSET or source is None:
            width = catalog.DEFAULT_WIDTH if b.width is UNSET else b.width
            height = catalog.DEFAULT_HEIGHT if b.height is UNSET else b.height
        else:
            width, height = sizes[source]
            scale = min(1.0, self.max_size / max(width, height))
            width, height = max(step, int(width * scale)), max(step, int(height * scale))
        return width // step * step, height // step * step


def webhook(b: Any) -> WebhookSpec | None:
    """The request's webhook: its URL checked (syntax only; the broker checks the address it
    resolves to at delivery) and its event filter without duplicates."""
    if b.webhook is UNSET:
        if b.webhook_events_filter is not UNSET:
            raise invalid("webhook_events_filter", "needs a webhook URL")
        return None
    try:
        check_url(b.webhook)
    except WebhookRefused as exc:
        raise invalid("webhook", str(exc)) from None
    events = catalog.WEBHOOK_EVENTS if b.webhook_events_filter is UNSET else b.webhook_events_filter
    return WebhookSpec(b.webhook, [e for e in catalog.WEBHOOK_EVENTS if e in events])


def integral(value: Any) -> Any:
    """`value` with integral floats as ints: in JSON 64.0 is the integer 64, as JSON Schema says.

    Only for bodies check_values passed (finite numbers, at most MAX_DEPTH levels deep).
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: integral(sub) for key, sub in value.items()}
    if isinstance(value, list):
        return [integral(sub) for sub in value]
    return value


def _image_bytes(value: Any, name: str) -> bytes:
    """An uploaded file's bytes, or a JSON value decoded from a data URI or base64 (400 if neither)."""
    return value if isinstance(value, bytes) else from_base64(value, name)


def canonical_lora(name: str) -> str:
    """A LoRA name as the nodes list it: relative, ending in .safetensors."""
    return name if name.endswith(LORA_SUFFIX) else name + LORA_SUFFIX
