"""Task event streams on the front: one broker subscription per task, fanned out to its streams.

The broker pushes an EVENT for every change of a task some stream on this front follows
(`EventHub.open` subscribes with WATCH; the last stream of a task to close unsubscribes).
The broker-I/O thread only puts each event on the queues of that task's streams and
wakes their writer, so an idle stream costs no CPU and an event touches only the streams
of its task.

Pushes can be lost: a broker restart forgets subscriptions, and a full queue drops
messages. So every few seconds one stream thread renews the subscriptions of every task
this front follows, in one WATCH, and hands each stream its task's current view; the
stream sends whatever changed since it last wrote (`TaskState.changes`).

`StreamSlots` caps open streams, globally and per API key. Under waitress a stream is
written by the stream pump (http_front.pump) after its snapshot; elsewhere (a test client)
by the thread that serves it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

from genserve import wire as w
from http_front.broker_client import BrokerClient, BrokerError, BrokerUnavailable
from http_front.jsonout import dumps
from http_front.slots import KeyedSlots

log = logging.getLogger(__name__)

RENEW_INTERVAL = 5.0  # seconds between renewals of every subscription of this front
MAX_RENEW = 5000  # task ids per renewal WATCH (the broker's limit)


class Renewal(NamedTuple):
    """A task's view from a renewal WATCH, and the broker's event id when it was taken."""

    view: w.TaskView
    event_id: int


class Stream:
    """One client's stream of one task: the hub puts Events and renewed TaskViews on `items`.

    `notify`, when set, is called after each put (the stream pump's wake-up for this stream).
    """

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.items: queue.SimpleQueue[w.Event | Renewal] = queue.SimpleQueue()
        self.notify: Callable[[], None] | None = None

    def put(self, item: w.Event | Renewal) -> None:
        """Queue an item for the stream's writer."""
        self.items.put(item)
        notify = self.notify
        if notify is not None:
            notify()


class EventHub:
    """Subscriptions of this front's streams, shared per task."""

    def __init__(self, broker: BrokerClient, renew_interval: float = RENEW_INTERVAL) -> None:
        self.broker = broker
        self.renew_interval = renew_interval
        self._streams: dict[str, set[Stream]] = {}
        self._lock = threading.Lock()
        self._renewing = threading.Lock()
        self._next_renewal = time.monotonic() + renew_interval
        if broker is not None:  # None: an app built without a broker (documentation, some tests)
            broker.event_listeners.append(self._on_event)

    @property
    def open_streams(self) -> int:
        """Streams open now."""
        with self._lock:
            return sum(map(len, self._streams.values()))

    def open(self, task_id: str) -> tuple[Stream, w.TaskView | None, int]:
        """Subscribe a new stream; returns it, the task's view (None: unknown) and the event id now.

        The stream is registered before the WATCH is sent, so no event after the snapshot
        can be missed; events queued before it have ids at most the returned one.
        """
        stream = Stream(task_id)
        with self._lock:
            self._streams.setdefault(task_id, set()).add(stream)
        try:
            body: w.WatchBody = self.broker.request(w.Watch(0, [task_id])).header.body
        except (BrokerError, BrokerUnavailable):
            self.close(stream)
            raise
        view = body.tasks[0] if body.tasks else None
        if view is None or view.status in w.FINAL_STATES:
            self.close(stream)
        return stream, view, body.event_id

    def close(self, stream: Stream) -> None:
        """Forget a stream; the task's last stream unsubscribes this front."""
        with self._lock:
            streams = self._streams.get(stream.task_id)
            if streams is None or stream not in streams:
                return
            streams.discard(stream)
            if not streams:
                del self._streams[stream.task_id]
                # Queued under the lock: a concurrent open() of this task sends its WATCH after it.
                self.broker.post(w.Watch(0, [stream.task_id], subscribe=False))

    def _on_event(self, event: w.Event) -> None:
        with self._lock:
            streams = tuple(self._streams.get(event.task.task_id, ()))
        for stream in streams:
            stream.put(event)

    def maybe_renew(self) -> None:
        """Renew every subscription if it is time (one caller at a time; the others return at once)."""
        if time.monotonic() < self._next_renewal or not self._renewing.acquire(blocking=False):
            return
        try:
            self._next_renewal = time.monotonic() + self.renew_interval
            with self._lock:
                task_ids = list(self._streams)
            for start in range(0, len(task_ids), MAX_RENEW):
                try:
                    body: w.WatchBody = self.broker.request(w.Watch(0, task_ids[start:start + MAX_RENEW])).header.body
                except (BrokerError, BrokerUnavailable) as exc:
                    log.warning("renewing %d event subscriptions failed: %s", len(task_ids), exc)
                    return
                for view in body.tasks:
                    with self._lock:
                        streams = tuple(self._streams.get(view.task_id, ()))
                    for stream in streams:
                        stream.put(Renewal(view, body.event_id))
        finally:
            self._renewing.release()


class StreamSlots(KeyedSlots):
    """Open event streams, globally and per key."""

    def __init__(self, limit: int, per_key: int) -> None:
        super().__init__(limit, per_key, "event streams are open on this server", "event streams open")


@dataclass
class TaskState:
    """What a stream last told its client about the task."""

    status: str
    position: int | None
    step: int | None
    node_id: str | None

    @classmethod
    def of(cls, view: w.TaskView) -> "TaskState":
        """The state a view shows."""
        return cls(view.status, view.queue_position, view.progress.step if view.progress else None, view.node_id)

    def changes(self, view: w.TaskView) -> Iterator[str]:
        """Event kinds that take a client from this state to the view's (and update this state)."""
        new = TaskState.of(view)
        if new.status in w.FINAL_STATES:
            yield new.status
        elif new.status == w.QUEUED and (self.status != w.QUEUED or new.position != self.position):
            yield "position"
        elif new.status == w.RUNNING:
            if self.status != w.RUNNING or new.node_id != self.node_id:
                yield "running"
            if new.step is not None and new.step != self.step:
                yield "progress"
        self.status, self.position, self.step, self.node_id = new.status, new.position, new.step, new.node_id


def event_data(kind: str, view: w.TaskView) -> dict[str, Any]:
    """The JSON payload of a non-final event (final ones carry the whole task body)."""
    data: dict[str, Any] = {"task_id": view.task_id, "status": view.status}
    if kind == "position":
        data.update(queue_position=view.queue_position, attempts=view.attempts)
    elif kind == "running":
        data.update(node_id=view.node_id, attempts=view.attempts, started_at=view.started_at)
    elif kind == "progress" and view.progress is not None:
        data.update(step=view.progress.step, total=view.progress.total, node_id=view.node_id)
    return data


def sse(kind: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    """One event in the text/event-stream format (JSON never contains a raw newline)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: ".encode() + dumps(data) + b"\n\n"


class EventWriter:
    """Turns a stream's items into event-stream bytes, whoever writes them (a thread or the pump).

    Events the snapshot already covered (ids up to `floor`) are skipped; renewed views are
    compared with what the client was told and become events without an id.
    """

    def __init__(self, view: w.TaskView, floor: int, final: Callable[[w.TaskView, int | None], bytes]) -> None:
        self.state = TaskState.of(view)
        self.floor = floor
        self.final = final
        self.done = False

    def feed(self, item: w.Event | Renewal) -> bytes:
        """The bytes to send for one item (maybe none); sets `done` after the final event."""
        if isinstance(item, w.Event):
            if item.event_id <= self.floor:
                return b""
            self.floor, current, event_id = item.event_id, item.task, item.event_id
        elif item.event_id < self.floor:
            return b""  # taken before an event already written: older than what the client knows
        else:
            current, event_id = item.view, None
        out = []
        for kind in self.state.changes(current):
            if kind in w.FINAL_STATES:
                out.append(self.final(current, event_id))
                self.done = True
                break
            out.append(sse(kind, event_data(kind, current), event_id))
        return b"".join(out)


class Closer:
    """A clean-up that runs once, by whoever owns the stream when it ends (`transfer` moves it)."""

    def __init__(self, action: Callable[[], None]) -> None:
        self._action: Callable[[], None] | None = action
        self._lock = threading.Lock()

    def transfer(self) -> "Closer":
        """A new Closer with the action; this one becomes a no-op."""
        with self._lock:
            action, self._action = self._action, None
        return Closer(action or (lambda: None))

    def __call__(self) -> None:
        with self._lock:
            action, self._action = self._action, None
        if action is not None:
            action()
