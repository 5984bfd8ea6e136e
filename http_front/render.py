"""Task results as JSON: the guide's response shape plus the earlier implementation's fields."""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any

import falcon

from broker.protocol import CANCELLED, COMPLETED, FAILED
from http_front.keys import Principal


# Replaced by the base64 bytes when the body is written; random per process so that
# no client text (a prompt, say) can ever equal it.
IMAGE_PLACEHOLDER = f"<image:{secrets.token_hex(16)}>"


def auth_info(principal: Principal) -> dict[str, Any]:
    """The guide's `auth_info` block."""
    return {"user": principal.name, "permissions": list(principal.permissions)}


def render_task(task: dict[str, Any], png: bytes | None, principal: Principal) -> dict[str, Any]:
    """Body for /generate and /task/{id}: status, progress, and the image once completed."""
    params = task.get("params", {})
    meta = task.get("meta", {})
    status = task["status"]
    body: dict[str, Any] = {
        "success": status not in (FAILED, CANCELLED),
        "task_id": task["task_id"],
        "status": status,
        "model_id": task["model_id"],
        "mode": task["mode"],
        "controlnet_type": params.get("controlnet_type") if task["mode"] == "controlnet" else None,
        "priority": task.get("priority", 0),
        "error": task.get("error"),
        "node_id": task.get("node_id"),
        "attempts": task.get("attempts", 0),
        "created_at": task.get("created_at"),
        "started_at": task.get("started_at"),
        "finished_at": task.get("finished_at"),
        "auth_info": auth_info(principal),
    }
    if "queue_position" in task:
        body["queue_position"] = task["queue_position"]
    if "progress" in task:
        body["progress"] = task["progress"]
    if status == COMPLETED and png is not None:
        body["image"] = body["image_base64"] = IMAGE_PLACEHOLDER
        body["metadata"] = {
            "prompt": params.get("prompt", ""), "model_id": task["model_id"], "mode": task["mode"],
            "generation_time": meta.get("generation_time"), "seed": params.get("seed"),
            "cfg": meta.get("cfg", params.get("cfg")), "steps": params.get("num_inference_steps"),
            "width": meta.get("width"), "height": meta.get("height"),
            "loras": params.get("loras", []),
        }
        started, finished = task.get("started_at"), task.get("finished_at")
        body["elapsed_time"] = round(finished - task["created_at"], 4) if finished else None
        body["gpu_id"] = meta.get("device")
        body["queue_time"] = round(started - task["created_at"], 4) if started else None
    if task.get("error_code"):
        body["error_code"] = task["error_code"]
    return body


def send_task(resp: falcon.Response, task: dict[str, Any], png: bytes | None, principal: Principal) -> None:
    """Write a task body; the PNG goes in as base64 without passing through the JSON encoder.

    The image travels twice (the guide's `image` data URI and the legacy `image_base64`),
    about 0.4 MB for a small PNG: encoding it once and splicing the bytes in keeps the
    JSON encoder from scanning and re-encoding it (base64 never needs JSON escaping).
    """
    body = render_task(task, png, principal)
    text = json.dumps(body, ensure_ascii=False)
    resp.content_type = falcon.MEDIA_JSON
    if body.get("image") != IMAGE_PLACEHOLDER:
        resp.data = text.encode("utf-8")
        return
    encoded = base64.b64encode(png)
    head, middle, tail = text.encode("utf-8").split(b'"' + IMAGE_PLACEHOLDER.encode() + b'"', 2)
    resp.data = b"".join([head, b'"data:image/png;base64,', encoded, b'"', middle, b'"', encoded, b'"', tail])
