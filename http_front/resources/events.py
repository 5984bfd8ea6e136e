"""GET /task/{task_id}/events: the task's progress as Server-Sent Events (text/event-stream).

Every stream, new or resumed with `Last-Event-ID`, starts with a `snapshot` event (the
task body as GET /task/{id} shows it, without the image), then sends `position`,
`running` and `progress` events as they happen, and ends with one `completed`, `failed`
or `cancelled` event carrying the task body and its signed `image_url`. A task already
ended gets only that final event. Event ids come from the broker, so a client may resume
on any front; comment lines keep idle connections open and reveal clients that left.
"""

from __future__ import annotations

import logging
import queue
import time
from typing import Any, Callable, Iterator

import falcon

from genserve import wire as w
from http_front.errors import ApiError
from http_front.events import Closer, EventHub, EventWriter, Stream, StreamSlots, sse
from http_front.pump import Pumped
from http_front.render import render_task
from http_front.resources.tasks import visible
from http_front.services import Services
from http_front.waits import DISCONNECTED_KEY

log = logging.getLogger(__name__)

RETRY_MS = 2000  # how soon a browser's EventSource reconnects after a drop
SLICE = 2.5  # seconds between hang-up checks of an idle stream written by its own thread
HAND_OVER = "genserve.hand_over"  # http_front.server.HAND_OVER (waitress); absent elsewhere


class _Body:
    """The response iterable: `close()` (which every WSGI server calls) runs the stream's clean-up.

    A plain generator would not do: one closed before its first item never runs its `finally`.
    """

    def __init__(self, events: Iterator[bytes], closer: Closer) -> None:
        self._events = events
        self._closer = closer

    def __iter__(self) -> Iterator[bytes]:
        return self._events

    def close(self) -> None:
        """End the stream here (a no-op for the part a pump took over)."""
        self._events.close()
        self._closer()


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
        refusal = self.slots.full()  # before the broker round trip
        if refusal is not None:
            raise ApiError(429, "too many event streams", f"{refusal}; poll /task/{{task_id}} instead",
                           retry_after=5)
        stream, view, event_id = self.hub.open(task_id)
        if view is None or not visible(req, view):
            self.hub.close(stream)
            raise ApiError(404, "task not found", "no task with this id for this API key")
        key = view.owner
        ended = view.status in w.FINAL_STATES
        if ended and last is not None:
            # A browser's EventSource reconnects whenever a stream closes; 204 tells it to stop.
            resp.status = 204
            return
        refusal = None if ended else self.slots.acquire(key)
        if refusal is not None:
            self.hub.close(stream)
            raise ApiError(429, "too many event streams", f"{refusal}; poll /task/{{task_id}} instead",
                           retry_after=5)
        if ended:
            body, closer = self._ended(view, event_id), Closer(lambda: None)
        else:
            def release() -> None:
                self.hub.close(stream)
                self.slots.release(key)
            closer = Closer(release)
            body = self._events(stream, EventWriter(view, event_id, self._final), view, event_id, req.env, closer)
        resp.content_type = "text/event-stream; charset=utf-8"
        resp.set_header("Cache-Control", "no-store")
        resp.set_header("X-Accel-Buffering", "no")  # a reverse proxy must not hold events back
        resp.stream = _Body(body, closer)

    def _ended(self, view: w.TaskView, event_id: int) -> Iterator[bytes]:
        yield f"retry: {RETRY_MS}\n\n".encode()
        yield self._final(view, event_id)

    def _final(self, view: w.TaskView, event_id: int | None) -> bytes:
        return sse(view.status, render_task(view, None, None, self.services.image_url(view)), event_id)

    def _events(self, stream: Stream, writer: EventWriter, view: w.TaskView, snapshot_id: int,
                env: dict[str, Any], closer: Closer) -> Iterator[bytes]:
        yield f"retry: {RETRY_MS}\n\n".encode() + sse("snapshot", render_task(view, None, None), snapshot_id)
        hand_over = env.get(HAND_OVER)
        if hand_over is not None:
            # Waitress: the stream pump writes the rest, and its end runs the clean-up.
            hand_over(lambda sock, chunked: Pumped(sock, chunked, stream, writer, self.hub, closer.transfer()))
            return
        yield from self._on_this_thread(stream, writer, env.get(DISCONNECTED_KEY))

    def _on_this_thread(self, stream: Stream, writer: EventWriter,
                        hung_up: Callable[[], bool] | None) -> Iterator[bytes]:
        """Another WSGI server (a test client): this thread writes the stream to its end."""
        keepalive = self.services.config.stream_keepalive
        quiet_since = time.monotonic()
        while not writer.done:
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
            data = writer.feed(item)
            if data:
                quiet_since = time.monotonic()
                yield data
