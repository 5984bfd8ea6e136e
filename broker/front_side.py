"""The broker's handlers for front requests (SUBMIT, STATUS, FETCH, CANCEL_TASK, INFO, ADMIN, LEASE).

A mixin of `broker.server.Broker`: the one broker class, split by the socket its messages
arrive on so that each part reads in one sitting. Every handler gets the typed header.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from typing import TYPE_CHECKING, Any

import msgspec

from broker.metrics import CONTENT_TYPE
from broker.tasks import Task
from genserve import errors as e
from genserve import wire as w
from genserve.catalog import MODEL_MODES
from genserve.logs import ids, key_ref

if TYPE_CHECKING:
    from broker.server import Broker

log = logging.getLogger(__name__)
MAX_PAGE = 100  # tasks per LIST page
MAX_WATCH = 5000  # task ids per WATCH
_ENCODER = msgspec.msgpack.Encoder()


def fingerprint(spec: Any, blobs: list[bytes]) -> str:
    """What makes two SUBMITs the same request, for Idempotency-Key reuse checks."""
    digest = hashlib.sha256(_ENCODER.encode(spec))
    for blob in blobs:
        digest.update(hashlib.sha256(blob).digest())
    return digest.hexdigest()


class RequestError(Exception):
    """A front request the broker refuses, with an error code from genserve.errors."""

    def __init__(self, code: str, message: str, served: list[str] | None = None,
                 supported: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.served = served
        self.supported = supported


class FrontSide:
    """Handlers for the frontend ROUTER."""

    def _handle_front(self: Broker, frames: list[bytes]) -> None:
        try:
            identity, msg = w.split_routed(frames)
        except w.ProtocolError as exc:
            log.warning("bad front message: %s", exc)
            if frames:  # a clear answer, also to a peer that speaks another version
                self._send(self.frontend, bytes(frames[0]), w.Fail(w.request_id(frames[1:]) or 0, self.clock(),
                                                                    e.PROTOCOL, str(exc)))
            return
        handler = self._front_handlers.get(msg.command)
        req = getattr(msg.header, "req", 0)
        if handler is None:
            self._send(self.frontend, identity, w.Fail(req, self.clock(), e.PROTOCOL, f"unexpected {msg.name}"))
            return
        try:
            handler(identity, msg)
        except RequestError as exc:
            self._send(self.frontend, identity, w.Fail(req, self.clock(), exc.code, str(exc), exc.served,
                                                       exc.supported))
        except Exception:  # one request must never take the broker down
            log.exception("error handling %s from front", msg.name)
            self._send(self.frontend, identity, w.Fail(req, self.clock(), e.PROTOCOL, "internal broker error"))

    def _on_submit(self: Broker, identity: bytes, msg: w.Message) -> None:
        h: w.Submit = msg.header
        if h.deadline is not None and self.clock() > h.deadline:
            # Its front has answered 503 by now: running it would surprise a client that retries.
            raise RequestError(e.EXPIRED, "the request reached the broker after its front gave up on it")
        spec = h.task
        idem_hash = fingerprint(spec, msg.blobs) if h.idempotency_key else None
        if h.idempotency_key and self._replay(identity, h, idem_hash):
            return
        self._check_servable(spec.model_id, spec.mode)
        if len(self.queue) + len(self.nodes.prefetched()) >= self.config.max_queued:  # jobs waiting on nodes wait too
            raise RequestError(e.QUEUE_FULL, f"queue is full ({self.config.max_queued} tasks waiting)")
        if h.owner and self.table.unfinished_for(h.owner) >= self.config.max_queued_per_owner:
            raise RequestError(e.QUEUE_FULL, f"this key already has {self.config.max_queued_per_owner} tasks waiting")
        if spec.webhook is not None and self.outbox.full:
            raise RequestError(e.QUEUE_FULL, "too many webhook deliveries are waiting; retry later")
        if len(h.images) != len(msg.blobs):
            raise RequestError(e.BAD_REQUEST, "image names and blob frames differ in number")
        now = self.clock()
        task = Task(
            task_id=uuid.uuid4().hex, model=spec.model_id, mode=spec.mode, priority=spec.priority,
            seq=self.table.next_seq(), params=spec.params, owner=h.owner, image_names=list(h.images),
            inputs=list(msg.blobs), created=now, deadline=now + self.config.task_timeout,
            idem_key=h.idempotency_key, idem_hash=idem_hash, webhook=spec.webhook, weight=h.weight,
        )
        if h.watch:
            task.watchers.add(identity)
        if not self.table.make_room(task, self.config.disk_budget_bytes):
            raise RequestError(e.DISK_FULL, f"result storage is full ({self.table.disk_used} of"
                               f" {self.config.disk_budget_bytes} bytes in use or reserved); retry later")
        self.table.accept(task, now)  # journaled before the ACK
        self.metrics.submitted(task)
        log.info("task %s accepted: %s %s, priority %d", task.task_id, task.model, task.mode, task.priority,
                 extra=ids(task.task_id, key_id=key_ref(task.owner)))
        self._send(self.frontend, identity, w.Ack(h.req, now, task.task_id, self.queue.position(task.task_id)))
        self._dispatch()

    def _replay(self: Broker, identity: bytes, h: w.Submit, digest: str | None) -> bool:
        """Answer a retried SUBMIT with the task its Idempotency-Key already names; False if none."""
        task = self.table.by_idempotency_key(h.owner, h.idempotency_key or "")
        if task is None:
            return False
        if task.idem_hash != digest:
            raise RequestError(e.IDEMPOTENCY, "this Idempotency-Key was used with a different request")
        task.replayed = True  # some client now holds this task: an orphan cancel must not end it
        self._send(self.frontend, identity, w.Ack(h.req, self.clock(), task.task_id,
                                                  self.queue.position(task.task_id), replayed=True))
        if h.watch:
            if task.final:
                result = self.journal.result(task.task_id) if task.state == w.COMPLETED else None
                self._send(self.frontend, identity, w.Done(task.view()), [result] if result is not None else [])
            else:
                task.watchers.add(identity)
        return True

    def _check_servable(self: Broker, model: str, mode: str) -> None:
        if mode in MODEL_MODES.get(model, ()) and self.nodes.serves(model, mode):
            return  # the common case, without building the served-models summary
        served = sorted(self.nodes.served_models())
        if model not in MODEL_MODES:
            raise RequestError(e.UNKNOWN_MODEL, f"unknown model_id {model!r}; served models: {served}", served=served)
        if mode not in MODEL_MODES[model]:
            supported = list(MODEL_MODES[model])
            raise RequestError(e.UNSUPPORTED_MODE, f"model {model!r} does not support mode {mode!r};"
                               f" it supports {supported}", supported=supported)
        if model not in served:
            raise RequestError(e.NO_NODE, f"no live node serves {model!r}; served models: {served}", served=served)
        raise RequestError(e.NO_NODE, f"no live node serves {model!r} in mode {mode!r}", served=served)

    def _task(self: Broker, task_id: str) -> Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise RequestError(e.NOT_FOUND, "task not found")
        return task

    def _reply(self: Broker, identity: bytes, req: int, body: Any, blobs: list[bytes] | tuple = ()) -> None:
        # "now" lets each front keep SUBMIT deadlines in this clock, whatever its own says.
        self._send(self.frontend, identity, w.Reply(req, self.clock(), body), blobs)

    def _on_status(self: Broker, identity: bytes, msg: w.Message) -> None:
        h: w.Status = msg.header
        task = self._task(h.task_id)
        if h.watch and not task.final:
            task.watchers.add(identity)
        self._reply(identity, h.req, w.TaskBody(task.view(self.queue.position(task.task_id))))

    def _on_fetch(self: Broker, identity: bytes, msg: w.Message) -> None:
        h: w.Fetch = msg.header
        task = self._task(h.task_id)
        result = self.journal.result(task.task_id) if task.state == w.COMPLETED else None
        self._reply(identity, h.req, w.TaskBody(task.view(self.queue.position(task.task_id))),
                    [result] if result is not None else [])

    def _on_cancel(self: Broker, identity: bytes, msg: w.Message) -> None:
        h: w.CancelTask = msg.header
        task = self._task(h.task_id)
        if h.orphaned and not task.final and not task.replayed:
            # Accepted after its front had answered 503: the client never learnt of it.
            self._fail(task, w.CANCELLED, e.EXPIRED, "accepted after its client was told the submit failed")
            self.table.forget_idempotency_key(task)  # the client's retry must create it anew
        elif not task.final and not h.orphaned:
            waiting = task.state == w.RUNNING and task.prefetched
            self._fail(task, w.CANCELLED, e.CANCELLED, "cancelled by request")
            if waiting:
                self._dispatch()  # its node's waiting place, or what it held back elsewhere, may be free now
        self._reply(identity, h.req, w.TaskBody(task.view()))

    def _on_info(self: Broker, identity: bytes, msg: w.Message) -> None:
        now = self.clock()
        self._reply(identity, msg.header.req, w.InfoBody(
            nodes=[n.view(now) for n in self.nodes], models=self.nodes.served_models(),
            queue=w.QueueView(len(self.queue), self.queue.models_waiting()), tasks=self.table.counts(), time=now))

    def _on_lease(self: Broker, identity: bytes, msg: w.Message) -> None:
        h: w.Lease = msg.header
        if h.limit < 1 or not 0 < h.window <= 86_400 or h.want < 1:
            raise RequestError(e.BAD_REQUEST, "want and limit must be >= 1 and window in (0, 86400] seconds")
        granted, retry = self.ledger.grant(h.key, h.want, h.limit, h.window, self.clock(), max(0, h.returned))
        self._reply(identity, h.req, w.LeaseBody(granted, retry))

    def _on_list(self: Broker, identity: bytes, msg: w.Message) -> None:
        h: w.ListTasks = msg.header
        if not 1 <= h.limit <= MAX_PAGE:
            raise RequestError(e.BAD_REQUEST, f"limit must be 1-{MAX_PAGE}")
        if h.status is not None and h.status not in w.STATES:
            raise RequestError(e.BAD_REQUEST, f"status must be one of {list(w.STATES)}")
        tasks, next_before = self.table.listing(h.owner, h.status, h.limit, h.before)
        views = [t.view(self.queue.position(t.task_id) if t.state == w.QUEUED else None) for t in tasks]
        self._reply(identity, h.req, w.TaskListBody(views, next_before))

    def _on_watch(self: Broker, identity: bytes, msg: w.Message) -> None:
        h: w.Watch = msg.header
        if len(h.task_ids) > MAX_WATCH:
            raise RequestError(e.BAD_REQUEST, f"at most {MAX_WATCH} task ids per WATCH")
        views = []
        for task_id in h.task_ids:
            task = self.tasks.get(task_id)
            if not h.subscribe:
                self.subs.remove(task_id, identity)
            elif task is not None:
                if not task.final and not self.subs.add(task_id, identity):
                    raise RequestError(e.QUEUE_FULL, "this front follows too many tasks")
                position = self.queue.position(task_id)
                self.subs.position_changed(task_id, position)
                views.append(task.view(position))
        self._reply(identity, h.req, w.WatchBody(views, self.subs.last_id))

    def _on_metrics(self: Broker, identity: bytes, msg: w.Message) -> None:
        self._reply(identity, msg.header.req, w.MetricsBody(CONTENT_TYPE), [self.metrics.text()])

    def _on_admin(self: Broker, identity: bytes, msg: w.Message) -> None:
        h: w.Admin = msg.header
        node = self.nodes.find(h.node)
        if node is None:
            raise RequestError(e.NOT_FOUND, "no such node")
        node.draining = h.action == "drain"
        log.info("node %s %sed", node.node_id, h.action)
        self._reply(identity, h.req, w.NodeBody(node.view(self.clock())))
        self._dispatch()
