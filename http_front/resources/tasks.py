"""GET /task/{task_id} (status, progress, result) and DELETE /task/{task_id} (cancel)."""

from __future__ import annotations

import falcon

from genserve import wire as w
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
        send_task(resp, task, png, req.context.principal)

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
