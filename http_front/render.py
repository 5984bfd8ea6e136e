"""Task results as JSON: the guide's response shape plus the earlier implementation's fields."""

from __future__ import annotations

import base64
import secrets
from typing import Any

import falcon
import msgspec

from genserve.catalog import OUTPUT_FORMATS
from genserve.wire import CANCELLED, COMPLETED, FAILED, TaskView
from http_front.jsonout import dumps
from http_front.keys import Principal

# Replaced by the base64 bytes when the body is written; random per process so that
# no client text (a prompt, say) can ever equal it.
IMAGE_PLACEHOLDER = f"<image:{secrets.token_hex(16)}>"


def auth_info(principal: Principal) -> dict[str, Any]:
    """The guide's `auth_info` block."""
    return {"user": principal.name, "permissions": list(principal.permissions)}


def render_task(task: TaskView, png: bytes | None, principal: Principal | None,
                image_url: str | None = None, events_url: str | None = None) -> dict[str, Any]:
    """Body for /generate, /task/{id} and /tasks: status, progress, and the image once completed.

    `image_url` is the task's signed image URL, shown once the task has an image;
    `events_url` the signed URL of its event stream, shown while it has not ended.
    """
    params, meta = task.params, task.meta
    body: dict[str, Any] = {
        "success": task.status not in (FAILED, CANCELLED),
        "task_id": task.task_id,
        "status": task.status,
        "model_id": task.model_id,
        "mode": task.mode,
        "controlnet_type": params.controlnet_type if task.mode == "controlnet" else None,
        "priority": task.priority,
        "error": task.error,
        "node_id": task.node_id,
        "attempts": task.attempts,
        "created_at": task.created_at,
        "started_at": task.started_at,
        "finished_at": task.finished_at,
    }
    if principal is not None:
        body["auth_info"] = auth_info(principal)
    if events_url is not None and task.status not in (COMPLETED, FAILED, CANCELLED):
        body["events_url"] = events_url
    if task.queue_position is not None:
        body["queue_position"] = task.queue_position
    if task.progress is not None:
        body["progress"] = msgspec.to_builtins(task.progress)
    if task.status == COMPLETED:
        if png is not None:
            body["image"] = body["image_base64"] = IMAGE_PLACEHOLDER
        if image_url is not None and not task.result_expired:
            body["image_url"] = image_url
        if png is None and task.result_expired:
            body["result_expired"] = True
            body["detail"] = "the image was removed to respect the server's disk budget"
        body["metadata"] = {
            "prompt": params.prompt, "model_id": task.model_id, "mode": task.mode,
            "generation_time": meta.generation_time if meta else None, "seed": params.seed,
            "cfg": meta.cfg if meta and meta.cfg is not None else params.cfg,
            "steps": params.num_inference_steps,
            "width": meta.width if meta else params.width, "height": meta.height if meta else params.height,
            "loras": msgspec.to_builtins(params.loras), "format": meta.format if meta else params.output_format,
        }
        if meta is not None:
            extra = {"speed": meta.speed, "lora_load": meta.lora_load, "lora_seconds": meta.lora_seconds,
                     "batch": meta.batch}
            body["metadata"].update({k: v for k, v in extra.items() if v is not None})
        started, finished = task.started_at, task.finished_at
        body["elapsed_time"] = round(finished - task.created_at, 4) if finished else None
        body["gpu_id"] = meta.device if meta else None
        body["queue_time"] = round(started - task.created_at, 4) if started else None
    if task.error_code:
        body["error_code"] = task.error_code
    return body


def send_task(resp: falcon.Response, task: TaskView, png: bytes | None, principal: Principal,
              image_url: str | None = None, events_url: str | None = None) -> None:
    """Write a task body; the PNG goes in as base64 without passing through the JSON encoder.

    The image travels twice (the guide's `image` data URI and the legacy `image_base64`),
    about 0.4 MB for a small PNG: encoding it once and splicing the bytes in keeps the
    JSON encoder from scanning and re-encoding it (base64 never needs JSON escaping).
    """
    body = render_task(task, png, principal, image_url, events_url)
    text = dumps(body)
    resp.content_type = falcon.MEDIA_JSON
    if body.get("image") != IMAGE_PLACEHOLDER:
        resp.data = text
        return
    encoded = base64.b64encode(png)
    mime = OUTPUT_FORMATS.get(task.meta.format if task.meta else "png", "image/png").encode()
    head, middle, tail = text.split(b'"' + IMAGE_PLACEHOLDER.encode() + b'"', 2)
    resp.data = b"".join([head, b'"data:', mime, b';base64,', encoded, b'"', middle, b'"', encoded, b'"', tail])
