"""Validation of generation requests (JSON and form-data) against one JSON Schema.

Size policy: width and height are rounded *down* to a multiple of 16 (the
earlier implementation passed sizes to diffusers, which does the same, so old
scripts keep working); the size actually produced is in ``metadata``. For
img2img / fill / redux without an explicit size, the input image's size is
used, scaled down to fit MAX_IMAGE_SIZE. Input, mask and control images are
resized to the output size on the node, so a 1x1 mask works as the guide shows.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator

from broker.protocol import CONTROL_TYPES, IMAGE_FIELDS, MODEL_MODES, MODES
from http_front.errors import ApiError
from http_front.images import inspect

IMAGE_MODES = {"img2img": "input_image", "fill": "input_image", "redux": "input_image"}
REQUIRED_IMAGES = {"img2img": ("input_image",), "fill": ("input_image", "mask_image"),
                   "controlnet": ("control_image",), "redux": ("input_image",)}
MAX_DEPTH = 16  # a valid request nests 3 levels (body, loras, one LoRA)
MAX_DETAIL = 300
# Form numbers: plain ASCII decimals only (int()/float() also take "1_0", Arabic-Indic digits, "nan").
_FORM_INT = re.compile(r"[+-]?[0-9]+")
_FORM_NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
_FORM_SPACE = " \t\r\n"


def check_values(value: Any) -> None:
    """Refuse what JSON Schema lets through: NaN/Infinity, lone surrogates, deep nesting (422).

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
    where = ".".join(reversed(parts)) or "body"
    if len(where) > 100:  # paths hold client keys: bound the echo
        where = where[:100] + "..."
    raise ApiError(422, "validation error", f"{where}: {problem}", field=where)


def build_schema(max_prompt: int, max_size: int) -> dict[str, Any]:
    """The /generate request schema (also published in openapi.yaml)."""
    return {
        "type": "object",
        "properties": {
            "prompt": {"type": "string", "maxLength": max_prompt},
            "model_id": {"type": "string", "minLength": 1, "maxLength": 64},
            "mode": {"enum": list(MODES)},
            "height": {"type": "integer", "minimum": 16, "maximum": max_size},
            "width": {"type": "integer", "minimum": 16, "maximum": max_size},
            "num_inference_steps": {"type": "integer", "minimum": 1, "maximum": 100},
            "cfg": {"type": "number", "minimum": 0, "maximum": 50},
            "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
            "priority": {"type": "integer", "minimum": -1000, "maximum": 1000},
            "strength": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "controlnet_type": {"enum": sorted(set(CONTROL_TYPES.values()))},
            "loras": {"type": "array", "maxItems": 8, "items": {
                "type": "object", "required": ["name"],
                "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 512},
                               "weight": {"type": "number", "minimum": 0, "maximum": 2}}}},
            "async": {"type": "boolean"},
            **{name: {"type": "string"} for name in IMAGE_FIELDS},
        },
    }


@dataclass
class GenerateRequest:
    """A validated request: what the broker queues and the node runs."""

    model_id: str
    mode: str
    priority: int
    params: dict[str, Any]
    images: dict[str, bytes] = field(default_factory=dict)
    is_async: bool = False

    def task_spec(self) -> dict[str, Any]:
        """The SUBMIT `task` header."""
        return {"model_id": self.model_id, "mode": self.mode, "priority": self.priority, "params": self.params}


class RequestValidator:
    """Validates and normalises generation requests."""

    def __init__(self, max_prompt: int = 1000, max_size: int = 2048) -> None:
        self.max_size = max_size
        self.schema = build_schema(max_prompt, max_size)
        self._validator = Draft202012Validator(self.schema)

    def coerce_form(self, form: dict[str, str]) -> dict[str, Any]:
        """Turn form-data strings into the JSON types the schema expects (bad ones stay strings)."""
        out: dict[str, Any] = {}
        props = self.schema["properties"]
        for name, value in form.items():
            kind = props.get(name, {}).get("type")
            text = value.strip(_FORM_SPACE)
            try:
                if kind == "integer" and _FORM_INT.fullmatch(text):
                    out[name] = int(text)
                elif kind == "number" and _FORM_NUMBER.fullmatch(text):
                    out[name] = float(text)  # may overflow to inf: check_values refuses it
                elif kind == "boolean":
                    out[name] = {"true": True, "false": False, "1": True, "0": False}[text.lower()]
                elif kind == "array":
                    out[name] = json.loads(text) if text else []
                else:
                    out[name] = value
            except (ValueError, KeyError, RecursionError):
                out[name] = value  # the schema reports the wrong type
        return out

    def validate(self, body: Any, images: dict[str, bytes]) -> GenerateRequest:
        """Check a decoded body plus its raw images; raises ApiError (400/413/422)."""
        if not isinstance(body, dict):
            raise ApiError(422, "validation error", "the request body must be a JSON object")
        check_values(body)
        errors = sorted(self._validator.iter_errors(body), key=lambda e: [str(x) for x in e.path])
        if errors:
            err = errors[0]
            where = ".".join(str(x) for x in err.path) or "body"
            message = err.message if len(err.message) <= MAX_DETAIL else err.message[:MAX_DETAIL] + "..."
            raise ApiError(422, "validation error", f"{where}: {message}", field=where)
        mode = body.get("mode", "text2img")
        prompt = body.get("prompt")
        if prompt is None and mode != "redux":
            raise ApiError(422, "validation error", "prompt: field required", field="prompt")
        if mode != "redux" and not prompt.strip():
            raise ApiError(422, "validation error", "prompt: must not be empty", field="prompt")
        model_id = body.get("model_id", "flux1-dev")
        supported = MODEL_MODES.get(model_id)
        if supported is not None and mode not in supported:
            raise ApiError(422, "mode not supported by this model",
                           f"{model_id} does not support mode {mode!r}; it supports {list(supported)}",
                           field="mode", supported=list(supported))
        missing = [n for n in REQUIRED_IMAGES.get(mode, ()) if n not in images]
        if missing:
            raise ApiError(422, "validation error", f"mode {mode} requires {', '.join(missing)}",
                           field=missing[0])
        sizes = {name: inspect(data, name) for name, data in images.items()}
        width, height = self._output_size(body, mode, sizes)
        control = body.get("controlnet_type")
        if mode == "controlnet" and control and CONTROL_TYPES.get(model_id, control) != control:
            raise ApiError(422, "mode not supported by this model",
                           f"{model_id} is a {CONTROL_TYPES[model_id]} model; controlnet_type {control!r}"
                           f" needs {[m for m, t in CONTROL_TYPES.items() if t == control][0]}")
        params = {
            "prompt": prompt or "", "width": width, "height": height,
            "num_inference_steps": int(body.get("num_inference_steps", 50)),
            "seed": int(body.get("seed", 42)),
            "cfg": float(body["cfg"]) if "cfg" in body else None,
            "strength": float(body.get("strength", 0.8)),
            "controlnet_type": control or CONTROL_TYPES.get(model_id),
            "loras": [{"name": lora["name"], "weight": float(lora.get("weight", 1.0))}
                      for lora in body.get("loras") or []],
        }
        used = {n: images[n] for n in images if n in REQUIRED_IMAGES.get(mode, ()) or
                (mode == "img2img" and n == "input_image")}
        return GenerateRequest(model_id, mode, int(body.get("priority", 0)), params, used,
                               bool(body.get("async", False)))

    def _output_size(self, body: dict[str, Any], mode: str, sizes: dict[str, tuple[int, int]]) -> tuple[int, int]:
        if "width" in body or "height" in body or mode not in IMAGE_MODES:
            width, height = int(body.get("width", 1024)), int(body.get("height", 1024))
        else:
            width, height = sizes[IMAGE_MODES[mode]]
            scale = min(1.0, self.max_size / max(width, height))
            width, height = max(16, int(width * scale)), max(16, int(height * scale))
        return width // 16 * 16, height // 16 * 16
