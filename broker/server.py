"""The broker: one thread, one poller, two ROUTER sockets, a handler per command.

Fronts talk to the frontend ROUTER (SUBMIT, STATUS, FETCH, CANCEL_TASK, INFO, ADMIN,
LEASE: broker/front_side.py); nodes talk to the backend ROUTER (READY, HEARTBEAT,
PROGRESS, RESULT, ERROR, DISCONNECT: broker/node_side.py). All state lives in plain
classes (TaskQueue, NodeRegistry, TaskTable, Journal, TokenLedger); this class only
moves typed messages between them and the sockets.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from functools import partial
from typing import Any, Callable

import zmq

from broker.config import BrokerConfig
from broker.events import Subscriptions
from broker.front_side import FrontSide, RequestError  # noqa: F401  (RequestError: part of the broker's API)
from broker.hooks import TaskWebhooks, load_secret
from broker.journal import Journal
from broker.metrics import BrokerMetrics
from broker.node_side import NodeSide
from broker.nodes import Node, NodeRegistry
from broker.placement import Placement
from broker.queue import TaskQueue
from broker.ratelimit import TokenLedger
from broker.tasks import Task, TaskTable
from broker.webhooks import WebhookConfig, WebhookOutbox
from genserve import errors as e
from genserve import wire as w
from genserve.logs import ids, key_ref

log = logging.getLogger(__name__)
SendFailed = Callable[[zmq.ZMQError], None]
BATCH_SECONDS = 0.02  # at most this much handling shares one commit


class Broker(FrontSide, NodeSide, Placement):
    """Priority-queue broker between HTTP fronts and GPU nodes."""

    def __init__(self, config: BrokerConfig, context: zmq.Context | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.context = context or zmq.Context.instance()
        self.queue = TaskQueue(config.affinity_window, config.affinity_slack, config.lora_slack)
        self.nodes = NodeRegistry()
        self.journal = Journal(config.data_dir / "journal.sqlite3")
        self.table = TaskTable(self.journal, self.queue)
        self.ledger = TokenLedger()
        self.subs = Subscriptions()
        self._positions_at = -1  # TaskQueue.changes when positions were last compared
        self.tasks = self.table.tasks  # read-only view for INFO and tests
        self._stop = threading.Event()
        self.failed = False  # run() ended because the journal could not commit
        # Inside a batch of messages, what is sent (and webhooks queued) waits for the batch's journal commit.
        self._held: list[Callable[[], None]] | None = None
        self.frontend = self.context.socket(zmq.ROUTER)
        self.backend = self.context.socket(zmq.ROUTER)
        for sock in (self.frontend, self.backend):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # A tick may push one position event per streamed task to a front: room for bursts of them.
        self.frontend.setsockopt(zmq.SNDHWM, w.FRONT_HWM)
        self._curve = None
        self.frontend_endpoint = ""
        self.backend_endpoint = ""
        self._front_handlers: dict[bytes, Callable[[bytes, w.Message], None]] = {
            w.SUBMIT: self._on_submit, w.STATUS: self._on_status, w.FETCH: self._on_fetch,
            w.CANCEL_TASK: self._on_cancel, w.INFO: self._on_info, w.ADMIN: self._on_admin,
            w.LEASE: self._on_lease, w.LIST: self._on_list, w.WATCH: self._on_watch,
            w.METRICS: self._on_metrics,
        }
        self._node_handlers: dict[bytes, Callable[[bytes, Any, w.Message], None]] = {
            w.READY: self._on_ready, w.HEARTBEAT: self._on_heartbeat, w.PROGRESS: self._on_progress,
            w.RESULT: self._on_result, w.ERROR: self._on_error, w.DISCONNECT: self._on_disconnect,
        }
        self._warned_peers: set[bytes] = set()
        self.table.recover(self.clock(), grace=config.recovery_grace)
        self.outbox = WebhookOutbox(config.data_dir / "webhooks.sqlite3", WebhookConfig(
            secret=load_secret(config.webhook_secret, config.data_dir), allow_private=config.webhook_allow_private,
            max_age=config.webhook_max_age, first_delay=config.webhook_first_delay,
            max_delay=config.webhook_max_delay, timeout=config.webhook_timeout, workers=config.webhook_workers))
        self.webhooks = TaskWebhooks(self.outbox)
        self.metrics = BrokerMetrics(self)
        self.webhooks.recover(self.tasks.values(), self.clock())

    # ---- lifecycle -------------------------------------------------------

    def bind(self) -> tuple[str, str]:
        """Bind both sockets; returns the actual endpoints (ports resolved)."""
        from genserve.curve import check_exposure, setup_server  # local: only needed when binding

        check_exposure((self.config.frontend, self.config.backend), self.config.curve_secret_file is not None,
                       self.config.insecure)
        self._curve = setup_server(self.context, self.config, (self.frontend, self.backend))
        self.frontend.bind(self.config.frontend)
        self.backend.bind(self.config.backend)
        self.frontend_endpoint = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend_endpoint = self.backend.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("broker frontend %s backend %s", self.frontend_endpoint, self.backend_endpoint)
        return self.frontend_endpoint, self.backend_endpoint

    def stop(self) -> None:
        """Ask the loop to exit (thread-safe)."""
        self._stop.set()

    def close(self) -> None:
        """Close sockets with linger 0, the webhook outbox (its threads joined with a timeout) and the journal."""
        self.frontend.close(linger=0)
        self.backend.close(linger=0)
        if self._curve is not None:
            self._curve.stop()
        self.outbox.close(timeout=5.0)
        self.journal.close()

    def run(self) -> None:
        """Serve until stop(): poll both sockets, then run timers; webhooks go out meanwhile."""
        self.outbox.start()
        self.table.hold_until(self.clock() + self.config.recovery_grace)
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        tick = max(0.05, self.config.heartbeat_interval / 4)
        next_timers = 0.0
        while not self._stop.is_set():
            events = dict(poller.poll(timeout=int(tick * 1000)))
            try:
                if self.backend in events:
                    self._drain(self.backend, self._handle_node)
                if self.frontend in events:
                    self._drain(self.frontend, self._handle_front)
            except sqlite3.Error:
                # Memory is now ahead of the journal: only a restart from the journal is consistent.
                log.critical("the journal cannot commit; stopping without replying", exc_info=True)
                self.failed = True
                return
            now = self.clock()
            if now >= next_timers:
                self._timers(now)
                next_timers = now + tick

    def _drain(self, sock: zmq.Socket, handler: Callable[[list[bytes]], None]) -> None:
        """Handle what is waiting on `sock` as one batch: one journal commit, then the replies (group commit)."""
        self._held = []
        until = time.monotonic() + BATCH_SECONDS  # an ACK waits for its batch's commit: keep batches short
        try:
            with self.journal.batch():
                for _ in range(1000):  # bounded so one busy side cannot starve the other
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    handler(frames)
                    if time.monotonic() > until:
                        break
        except sqlite3.Error:
            self._held = None  # the commit failed: no ACK may claim what is not journaled
            raise
        finally:
            if self._held is not None:
                self._flush()

    def _flush(self) -> None:
        """Run what the batch held back, in order; what that sends or defers goes out after it."""
        held, i = self._held or [], 0
        try:
            while i < len(held):
                i += 1
                try:
                    held[i - 1]()
                except Exception:  # one send's follow-up must not cost the others theirs
                    log.exception("error after a journal commit")
        finally:
            self._held = None

    def _later(self, work: Callable[[], None]) -> None:
        """Run `work` once what the running batch wrote is committed (at once outside a batch)."""
        if self._held is not None:
            self._held.append(work)
        else:
            work()

    def _emit(self, sock: zmq.Socket, frames: list[Any], failed: SendFailed,
              sent: Callable[[], None] | None = None) -> None:
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # peer gone (ROUTER_MANDATORY) or queue full
            failed(exc)
            return
        if sent is not None:
            sent()

    def _out(self, sock: zmq.Socket, frames: list[Any], failed: SendFailed,
             sent: Callable[[], None] | None = None) -> None:
        """Send `frames` once what the running batch wrote is committed (at once outside a batch)."""
        self._later(partial(self._emit, sock, frames, failed, sent))

    def _send(self, sock: zmq.Socket, identity: bytes, header: Any, blobs: list[bytes] | tuple = (),
              failed: SendFailed | None = None, sent: Callable[[], None] | None = None) -> None:
        def warn(exc: zmq.ZMQError) -> None:
            log.warning("cannot send %s to %r: %s", type(header).__name__, identity, exc)

        self._out(sock, w.routed(identity, header, blobs), failed or warn, sent)

    def _to_node(self, node: Node, header: Any, blobs: list[bytes] | tuple = (),
                 failed: SendFailed | None = None, sent: Callable[[], None] | None = None) -> None:
        node.last_sent = self.clock()
        self._send(self.backend, node.identity, header, blobs, failed, sent)

    # ---- scheduling and task transitions --------------------------------

    def _job_undelivered(self, task: Task, node: Node, exc: zmq.ZMQError) -> None:
        log.warning("cannot send task %s to node %s: %s", task.task_id, node.node_id, exc,
                    extra=ids(task.task_id, node.node_id))
        riders = [self.tasks.get(r) for r in task.riders]
        if any(one is not None and one.state == w.RUNNING and one.node == node.identity for one in (task, *riders)):
            self.nodes.remove(node.identity)
            self._requeue_node_task(node, "node unreachable", undelivered={task.task_id, *task.riders})

    def _requeue_node_task(self, node: Node, why: str, undelivered: set[str] | frozenset = frozenset()) -> None:
        """Put back the tasks a lost or re-registering node was running, holding or carrying as riders."""
        held = [node.task_id, node.next_id, *sorted(node.riders)]
        node.task_id = node.next_id = None
        node.riders = set()
        for task_id in held:
            task = self.tasks.get(task_id or "")
            if task is not None and not task.final:
                # A job that never reached the node, or waited there unstarted, spends no attempt.
                self._requeue(task, why, refund=task.prefetched or task_id in undelivered)

    def _requeue(self, task: Task, why: str, refund: bool = False) -> None:
        """Back to the queue at its original priority and place, or failed after max_retries.

        `refund`: the attempt is given back (the task never started, or an operator stopped its node).
        """
        if refund:
            task.attempts -= 1
        task.node = task.node_id = None
        if task.attempts > self.config.max_retries:
            self._fail(task, w.FAILED, e.NODE_LOST,
                       f"{why}; gave up after {task.attempts} attempts")
            return
        log.warning("re-queueing task %s (%s, attempt %d)", task.task_id, why, task.attempts,
                    extra=ids(task.task_id, key_id=key_ref(task.owner)))
        self.table.enqueue(task, self.clock())
        self._publish(task, "position")

    def _detach(self, task: Task, reason: str = "finished elsewhere") -> None:
        """Take an ending task out of the queue, or stop it on the node that runs or holds it."""
        self.table.withdraw(task.task_id)
        if task.state == w.RUNNING and task.node is not None:
            node = self.nodes.get(task.node)
            if node is not None and task.task_id in node.riders:
                # It stops alone (its call runs on for the others); it stays listed until its report,
                # which comes when the call ends, so that report is not taken for its call's end.
                self._to_node(node, w.Cancel(task.task_id, reason))
            elif node is not None and task.task_id in (node.task_id, node.next_id):
                self._to_node(node, w.Cancel(task.task_id, reason))
                if node.task_id == task.task_id:
                    node.unwind({task.task_id})  # the node keeps BUSY until it reports, so nothing overlaps
                elif not node.riders.intersection(task.riders):
                    node.next_id = None  # a waiting job is dropped at once (or stops if it just started)
                # else its riders may have started in its call: its place stays taken until the node reports
        task.prefetched = False

    def _fail(self, task: Task, state: str, code: str, message: str) -> None:
        self._detach(task, code)
        task.state, task.error_code, task.error = state, code, message
        task.finished = self.clock()
        self.table.finish(task, None)
        self._notify(task, [])

    def _notify(self, task: Task, blobs: list[bytes]) -> None:
        log.info("task %s %s%s", task.task_id, task.state, f" ({task.error_code})" if task.error_code else "",
                 extra=ids(task.task_id, task.node_id, key_ref(task.owner)))
        task.inputs = []
        done = w.Done(task.view())
        for identity in task.watchers:
            self._send(self.frontend, identity, done, blobs)
        task.watchers.clear()
        self._publish(task, task.state)
        self._later(partial(self.webhooks.ended, task, self.clock()))  # its webhook outbox commits on its own
        self.metrics.ended(task)

    # ---- events for streams ---------------------------------------------

    def _publish(self, task: Task, kind: str) -> None:
        """Push an EVENT to the fronts subscribed to `task`; a final one ends its subscriptions."""
        peers = self.subs.peers(task.task_id)
        if peers:
            position = self.queue.position(task.task_id)
            if kind == "position":
                self.subs.position_changed(task.task_id, position)
            frames = w.encode(w.Event(kind, self.subs.next_id(), task.view(position)))
            for peer in peers:
                self._out(self.frontend, [peer, *frames], partial(self._event_undelivered, task.task_id, peer))
        if task.final:
            self.subs.forget(task.task_id)

    def _event_undelivered(self, task_id: str, peer: bytes, exc: zmq.ZMQError) -> None:
        if isinstance(exc, zmq.Again):  # that front's queue is full: its renewal resends the state
            log.debug("event for task %s dropped: front %r is not reading", task_id, peer, extra=ids(task_id))
        elif exc.errno == zmq.EHOSTUNREACH:
            self.subs.drop_peer(peer)  # that front is gone
        else:
            log.warning("cannot send an event to front %r: %s", peer, exc)

    def _publish_positions(self) -> None:
        """A `position` event for each subscribed queued task whose place moved since it was told."""
        if self._positions_at == self.queue.changes or not len(self.subs):
            return
        self._positions_at = self.queue.changes
        for task_id in self.subs.task_ids():
            position = self.queue.position(task_id)
            if position is not None and self.subs.position_changed(task_id, position):
                self._publish(self.tasks[task_id], "position")

    # ---- timers ----------------------------------------------------------

    def _timers(self, now: float) -> None:
        self.table.housekeeping(now, self.config.result_ttl)
        self.table.trim(self.config.disk_budget_bytes)
        for node in self.nodes.expired(now, self.config.node_timeout):
            log.warning("node %s expired after %.1fs of silence", node.node_id, now - node.last_seen)
            self.nodes.remove(node.identity)
            if node.task_id or node.next_id or node.riders:
                self._requeue_node_task(node, "node expired")
        for node in self.nodes:
            if now - node.last_sent >= self.config.heartbeat_interval:
                self._to_node(node, w.Heartbeat())
        for task in list(self.table.overdue(now)):
            self._fail(task, w.FAILED, e.TIMEOUT, "task timed out")
        self._dispatch()
        self._publish_positions()
