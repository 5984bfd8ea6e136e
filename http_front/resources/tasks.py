"""GET /task/{task_id} (status, progress, result), DELETE /task/{task_id} (cancel),
GET /task/{task_id}/image (the image as a file) and GET /tasks (the caller's tasks, newest first)."""

from __future__ import annotations

import hashlib

import falcon

from genserve import wire as w
from genserve.catalog import OUTPUT_FORMATS
from http_front.auth import SUPER
from http_front.errors import ApiError
from http_front.render import render_task, send_task
from http_front.services import Services


class Task:
    """One task, visible only to the key that submitted it (and admins)."""

    auth = {"GET": ("readonly", "generation"), "DELETE": ("generation",)}

    def __init__(self, services: Services) -> None:
        self.services = services

    def _visible(self, req: falcon.Request, task: w.TaskView) -> None:
        principal = req.context.principal
        # `owner` is unique per key; the display key_id is not and must never authorise.
        if task.owner != principal.owner and not set(principal.permissions) & SUPER:
            raise ApiError(404, "task not found", "no task with this id for this API key")

    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        """Status while queued/running; the image once completed."""
        task, png = self.services.task(task_id, fetch=True)
        self._visible(req, task)
        send_task(resp, task, png, req.context.principal, self.services.image_url(task),
                  self.services.events_url(task))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        """Cancel: a queued task leaves the queue; a running one stops at its next step.

        200 with ``success: true`` when the task is cancelled (now or earlier); 409 when it
        had already completed or failed, since there was nothing left to cancel.
        """
        task, _ = self.services.task(task_id)
        self._visible(req, task)
        task = self.services.broker.request(w.CancelTask(0, task_id)).header.body.task
        status = task.status
        if status != w.CANCELLED:
            raise ApiError(409, "task already finished",
                           f"task {task_id} is already {status}; there is nothing to cancel", task_status=status)
        body = render_task(task, None, req.context.principal)
        body["success"] = True
        body["message"] = "task cancelled"
        resp.media = body


def visible(req: falcon.Request, task: w.TaskView) -> bool:
    """Whether the caller may see the task: its own key, an admin key, or a URL signed for it."""
    if req.context.signed:
        return True
    principal = req.context.principal
    return task.owner == principal.owner or bool(set(principal.permissions) & SUPER)


class TaskImage:
    """GET /task/{task_id}/image: the result as a file (`curl -o`, `<img src>` with a signed URL)."""

    auth = {"GET": ("readonly", "generation")}
    signed_urls = True  # ?expires=...&sig=... from the task body's image_url stands in for a key

    def __init__(self, services: Services) -> None:
        self.services = services

    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        """The image bytes with their media type, an ETag and caching headers (304 when unchanged)."""
        task, image = self.services.task(task_id, fetch=True)
        if not visible(req, task):
            raise ApiError(404, "task not found", "no task with this id for this API key")
        if task.status != w.COMPLETED:
            raise ApiError(409, "no image yet", f"task {task_id} is {task.status}", task_status=task.status)
        if image is None:
            raise ApiError(410, "image gone", "the image was removed (result retention or disk budget)")
        etag = '"' + hashlib.sha256(image).hexdigest()[:32] + '"'
        resp.set_header("ETag", etag)
        # A result never changes once made; private, since it belongs to one key.
        resp.set_header("Cache-Control", "private, max-age=3600, immutable")
        if etag in (req.get_header("If-None-Match") or "").replace(" ", "").split(","):
            resp.status = 304
            return
        fmt = task.meta.format if task.meta else "png"
        resp.content_type = OUTPUT_FORMATS.get(fmt, "application/octet-stream")
        stem = task.task_id if task.task_id.isascii() and task.task_id.isalnum() else "image"  # header-safe
        resp.set_header("Content-Disposition", f'inline; filename="{stem}.{fmt}"')
        resp.data = image


class Tasks:
    """GET /tasks?status=&limit=&cursor=: the caller's tasks, newest first (every key's for admins)."""

    auth = {"GET": ("readonly", "generation")}

    def __init__(self, services: Services) -> None:
        self.services = services

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """One page, without images; `next_cursor` fetches the next (null at the end)."""
        principal = req.context.principal
        status = req.get_param("status")
        if status is not None and status not in w.STATES:
            raise ApiError(422, "validation error", f"status: must be one of {list(w.STATES)}", field="status")
        limit = req.get_param("limit") or "20"
        if not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= MAX_LIMIT):
            raise ApiError(422, "validation error", f"limit: must be an integer 1-{MAX_LIMIT}", field="limit")
        cursor = req.get_param("cursor")
        if cursor is not None and not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 18):
            raise ApiError(422, "validation error", "cursor: use the next_cursor of the previous page",
                           field="cursor")
        owner = None if set(principal.permissions) & SUPER else principal.owner
        body = self.services.broker.request(w.ListTasks(0, owner, status, int(limit),
                                                        int(cursor) if cursor else None)).header.body
        tasks = [render_task(t, None, None, self.services.image_url(t)) for t in body.tasks]
        resp.media = {"success": True, "tasks": tasks, "count": len(tasks),
                      "next_cursor": str(body.next_before) if body.next_before is not None else None}


MAX_LIMIT = 100
