"""GET /task/{task_id}/events: the task's progress as Server-Sent Events (text/event-stream).

Every stream, new or resumed with `Last-Event-ID`, starts with a `snapshot` event (the
task body as GET /task/{id} shows it, without the image), then sends `position`,
`running` and `progress` events as they happen, and ends with one `completed`, `failed`
or `cancelled` event carrying the task body and its signed `image_url`. A task already
ended gets only that final event. Event ids come from the broker, so a client may resume
on any front; comment lines keep idle connections open and reveal clients that left.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from typing import Any, Callable, Iterator

import falcon

from genserve import wire as w
from http_front.errors import ApiError
from http_front.events import EventHub, Stream, StreamSlots, TaskState, event_data
from http_front.render import render_task
from http_front.resources.tasks import visible
from http_front.services import Services
from http_front.waits import DISCONNECTED_KEY

log = logging.getLogger(__name__)

RETRY_MS = 2000  # how soon a browser's EventSource reconnects after a drop
SLICE = 2.5  # seconds between hang-up checks of an idle stream


def sse(kind: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    """One event in the text/event-stream format (JSON never contains a raw newline)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class _Body:
    """The response iterable: `close()` (which waitress always calls) gives the stream's slot back.

    A plain generator would not do: one closed before its first item never runs its `finally`.
    """

    def __init__(self, events: Iterator[bytes], on_close: Callable[[], None]) -> None:
        self._events = events
        self._on_close: Callable[[], None] | None = on_close

    def __iter__(self) -> Iterator[bytes]:
        return self._events

    def close(self) -> None:
        """End the stream (idempotent)."""
        self._events.close()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()


class TaskEvents:
    """The event stream of one task, for its key, an admin, or a signed URL."""

    auth = {"GET": ("readonly", "generation")}
    signed_urls = True  # the task body's events_url: a browser's EventSource cannot send key headers

    def __init__(self, services: Services, hub: EventHub, slots: StreamSlots) -> None:
        self.services = services
        self.hub = hub
        self.slots = slots

    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        """Open the stream (404 for a task the caller may not see, 429 past the stream caps)."""
        last = req.get_header("Last-Event-ID")
        if last is not None and not (last.isascii() and last.isdigit() and len(last) <= 20):
            raise ApiError(400, "invalid Last-Event-ID", "Last-Event-ID must be an id this API sent (digits)")
        stream, view, event_id = self.hub.open(task_id)
        if view is None or not visible(req, view):
            self.hub.close(stream)
            raise ApiError(404, "task not found", "no task with this id for this API key")
        key = view.owner
        refusal = None if view.status in w.FINAL_STATES else self.slots.acquire(key)
        if refusal is not None:
            self.hub.close(stream)
            raise ApiError(429, "too many event streams", f"{refusal}; poll /task/{{task_id}} instead",
                           retry_after=5)
        if view.status in w.FINAL_STATES:
            body: Iterator[bytes] = self._ended(view, event_id)
            on_close: Callable[[], None] = lambda: None  # noqa: E731
        else:
            body = self._events(stream, view, event_id, req.env.get(DISCONNECTED_KEY))

            def on_close() -> None:
                self.hub.close(stream)
                self.slots.release(key)
        resp.content_type = "text/event-stream; charset=utf-8"
        resp.set_header("Cache-Control", "no-store")
        resp.set_header("X-Accel-Buffering", "no")  # a reverse proxy must not hold events back
        resp.stream = _Body(body, on_close)

    def _ended(self, view: w.TaskView, event_id: int) -> Iterator[bytes]:
        yield f"retry: {RETRY_MS}\n\n".encode()
        yield self._final(view, event_id)

    def _final(self, view: w.TaskView, event_id: int | None) -> bytes:
        return sse(view.status, render_task(view, None, None, self.services.image_url(view)), event_id)

    def _events(self, stream: Stream, view: w.TaskView, floor: int,
                hung_up: Callable[[], bool] | None) -> Iterator[bytes]:
        keepalive = self.services.config.stream_keepalive
        yield f"retry: {RETRY_MS}\n\n".encode()
        yield sse("snapshot", render_task(view, None, None), floor)
        state = TaskState.of(view)
        quiet_since = time.monotonic()
        while True:
            try:
                item = stream.items.get(timeout=SLICE)
            except queue.Empty:
                if hung_up is not None and hung_up():
                    return
                if time.monotonic() - quiet_since >= keepalive:
                    quiet_since = time.monotonic()
                    yield b": keep-alive\n\n"
                self.hub.maybe_renew()
                continue
            if isinstance(item, w.Event):
                if item.event_id <= floor:
                    continue  # sent before the snapshot, which already shows it
                floor, current, event_id = item.event_id, item.task, item.event_id
            else:
                current, event_id = item, None  # a renewal: say what changed, without a new id
            for kind in state.changes(current):
                quiet_since = time.monotonic()
                if kind in w.FINAL_STATES:
                    yield self._final(current, event_id)
                    return
                yield sse(kind, event_data(kind, current), event_id)
