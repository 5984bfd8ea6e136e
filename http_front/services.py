"""What the resources share: the broker client, a short-lived INFO cache, the validator."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from genserve import wire as w
from http_front.broker_client import BrokerClient
from http_front.config import FrontConfig
from http_front.final_tasks import FinalTasks
from http_front.signing import UrlSigner
from http_front.validation import RequestValidator


@dataclass
class Services:
    """Injected into every resource by create_app."""

    broker: BrokerClient
    config: FrontConfig
    validator: RequestValidator
    signer: UrlSigner
    version: str = "0.1.0"
    finished: FinalTasks = field(default_factory=FinalTasks, repr=False)  # polls of ended tasks skip the broker
    _info: tuple[float, w.InfoBody] | None = field(default=None, repr=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _refreshing: bool = field(default=False, repr=False)
    _info_fresh_for_waiters: bool = field(default=False, repr=False)  # the last refresh they waited for worked

    def info(self, max_age: float = 1.0, timeout: float | None = None) -> w.InfoBody:
        """The broker's INFO snapshot, cached for `max_age` seconds, fetched by one thread at a time.

        While one thread refreshes an expired snapshot, the others wait for it, or (with a
        `max_age` above 0) take the previous one if it is less than a second past its age.
        """
        waited = False
        with self._cond:
            while True:
                cached = self._info
                age = time.monotonic() - cached[0] if cached is not None else None
                if age is not None and (age <= max_age or (waited and self._info_fresh_for_waiters)):
                    return cached[1]
                if not self._refreshing:
                    self._refreshing = True
                    break
                if age is not None and max_age > 0 and age <= max_age + 1.0:
                    return cached[1]
                self._cond.wait(timeout if timeout is not None else 10.0)
                waited = True
        body = None
        try:
            body = self.broker.request(w.InfoRequest(0), timeout=timeout).header.body
        finally:
            with self._cond:
                if body is not None:
                    self._info = (time.monotonic(), body)
                self._info_fresh_for_waiters = body is not None
                self._refreshing = False
                self._cond.notify_all()
        return body

    def task(self, task_id: str, fetch: bool = False) -> tuple[w.TaskView, bytes | None]:
        """One task from the broker, and its image when `fetch` and it has one (an ended task: up to 1 s old)."""
        kept = self.finished.get(task_id, fetch)
        if kept is not None:
            return kept
        msg = self.broker.request(w.Fetch(0, task_id) if fetch else w.Status(0, task_id))
        task, image = msg.header.body.task, (msg.blobs[0] if msg.blobs else None)
        self.finished.put(task, image, fetch)
        return task, image

    def image_url(self, task: w.TaskView) -> str | None:
        """A signed URL of the task's image (no key needed), once it has one."""
        if task.status != w.COMPLETED or task.result_expired:
            return None
        return self.signer.sign(f"/task/{task.task_id}/image")

    def events_url(self, task: w.TaskView) -> str | None:
        """A signed URL of the task's event stream (no key needed), while it has not ended."""
        if task.status in w.FINAL_STATES:
            return None
        return self.signer.sign(f"/task/{task.task_id}/events")

    def loras(self) -> list[w.LoraInfo]:
        """LoRA files reported by live nodes, merged by name and sorted."""
        merged: dict[str, w.LoraInfo] = {}
        for node in self.info().nodes:
            for entry in node.loras:
                merged.setdefault(entry.name, entry)
        return [merged[name] for name in sorted(merged)]


def builtins(value: Any) -> Any:
    """A typed broker value as plain JSON-ready data."""
    return msgspec.to_builtins(value)
