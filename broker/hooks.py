"""Task webhooks: which transitions become deliveries, their payload, and the deployment's secret.

The broker calls `TaskWebhooks.started` and `.ended` from its thread; each only journals a
delivery in the outbox (broker.webhooks), whose own threads POST it, so a slow or dead
receiver never slows dispatch. Message ids are ``msg_<task_id>_<event>``: one per task and
event, so journaling the same event twice (after a restart, say) still delivers it once.

A crash between a task's transition (in the task journal) and its delivery row (in the
outbox) would lose the webhook, so `recover` journals, insert-or-ignore, every delivery a
recovered task should have had. It only looks at transitions younger than the outbox's
retry window: an older delivery row may have been purged, and re-adding it would
deliver the event again.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import msgspec

from broker.tasks import Task
from broker.webhooks import WebhookOutbox, new_secret, parse_secret
from genserve.logs import ids, key_ref
from genserve.views import ResultMeta
from genserve.wire import CANCELLED, COMPLETED, FAILED, FINAL_STATES

log = logging.getLogger(__name__)

START = "start"
EVENT_TYPES = {START: "task.started", COMPLETED: "task.completed", FAILED: "task.failed",
               CANCELLED: "task.cancelled"}
SECRET_FILE = "webhook_secret"


class WebhookTask(msgspec.Struct):
    """The task as a webhook shows it: its state without images (the image is at `image_path`)."""

    task_id: str
    status: str
    model_id: str
    mode: str
    priority: int
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    node_id: str | None
    error_code: str | None
    error: str | None
    metadata: ResultMeta | None
    image_path: str | None


class WebhookPayload(msgspec.Struct):
    """The JSON body of a delivery (Standard Webhooks' recommended type/timestamp/data shape)."""

    type: str
    timestamp: str
    data: WebhookTask


_ENCODER = msgspec.json.Encoder()


def payload(task: Task, event: str, now: float) -> bytes:
    """The delivery body for `event` of `task`."""
    data = WebhookTask(
        task_id=task.task_id, status=task.state, model_id=task.model, mode=task.mode, priority=task.priority,
        attempts=task.attempts, created_at=task.created, started_at=task.started, finished_at=task.finished,
        node_id=task.node_id, error_code=task.error_code, error=task.error if task.error_code else None,
        metadata=task.meta, image_path=f"/task/{task.task_id}/image" if task.state == COMPLETED else None)
    stamp = datetime.fromtimestamp(now, timezone.utc).isoformat().replace("+00:00", "Z")
    return _ENCODER.encode(WebhookPayload(EVENT_TYPES[event], stamp, data))


def load_secret(configured: str | None, data_dir: Path) -> bytes:
    """The deployment's signing key: the configured "whsec_..." secret, else one kept in the data dir.

    A generated secret is written once, readable by its owner only; operators hand it to
    receivers (`genservectl webhook-secret`). ValueError for a malformed secret.
    """
    if configured:
        return parse_secret(configured)
    path = data_dir / SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_secret() + "\n")
        log.info("generated the webhook signing secret in %s (genservectl webhook-secret prints it)", path)
    return parse_secret(path.read_text().strip())


class TaskWebhooks:
    """Journals the webhook deliveries of task transitions (no sockets, no network)."""

    def __init__(self, outbox: WebhookOutbox) -> None:
        self.outbox = outbox

    def _send(self, task: Task, event: str, now: float) -> None:
        hook = task.webhook
        if hook is None or event not in hook.events:
            return
        msg_id = f"msg_{task.task_id}_{event}"
        try:
            queued = self.outbox.enqueue(msg_id, hook.url, EVENT_TYPES[event], payload(task, event, now), now)
        except Exception:  # the outbox's database failing must not stop the broker loop
            log.exception("webhook %s of task %s could not be journaled", event, task.task_id,
                          extra=ids(task.task_id, key_id=key_ref(task.owner)))
            return
        if not queued:
            log.warning("webhook %s of task %s not queued (see above)", event, task.task_id,
                        extra=ids(task.task_id, key_id=key_ref(task.owner)))

    def started(self, task: Task, now: float) -> None:
        """A node started the task (only its first start is delivered)."""
        self._send(task, START, now)

    def ended(self, task: Task, now: float) -> None:
        """The task completed, failed or was cancelled."""
        if task.state in FINAL_STATES:
            self._send(task, task.state, now)

    def recover(self, tasks: Iterable[Task], now: float) -> None:
        """Journal the deliveries recovered tasks should have had, for transitions within the retry window."""
        since = now - self.outbox.config.max_age
        for task in tasks:
            if task.webhook is None:
                continue
            if task.started is not None and task.started >= since:
                self._send(task, START, task.started)
            if task.final and task.finished is not None and task.finished >= since:
                self._send(task, task.state, task.finished)
