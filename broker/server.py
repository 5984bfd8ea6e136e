"""The broker: one thread, one poller, two ROUTER sockets, a handler per command.

Fronts talk to the frontend ROUTER (SUBMIT, STATUS, FETCH, CANCEL_TASK, INFO,
ADMIN); nodes talk to the backend ROUTER (READY, HEARTBEAT, PROGRESS, RESULT,
ERROR, DISCONNECT). All state lives in plain classes (TaskQueue, NodeRegistry,
Journal); this class only moves messages between them and the sockets.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from typing import Any, Callable

import msgpack
import zmq

from broker import protocol as p
from broker.config import BrokerConfig
from broker.journal import Journal
from broker.nodes import BUSY, IDLE, Node, NodeRegistry
from broker.queue import TaskQueue
from broker.ratelimit import TokenLedger
from broker.results import check_image
from broker.tasks import Task, TaskTable

log = logging.getLogger(__name__)


def fingerprint(spec: Any, blobs: list[bytes]) -> str:
    """What makes two SUBMITs the same request, for Idempotency-Key reuse checks."""
    digest = hashlib.sha256(msgpack.packb(spec, use_bin_type=True))
    for blob in blobs:
        digest.update(hashlib.sha256(blob).digest())
    return digest.hexdigest()


class RequestError(Exception):
    """A front request the broker refuses, with a protocol error code."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.extra = extra


class Broker:
    """Priority-queue broker between HTTP fronts and GPU nodes."""

    def __init__(self, config: BrokerConfig, context: zmq.Context | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.context = context or zmq.Context.instance()
        self.queue = TaskQueue(config.affinity_window)
        self.nodes = NodeRegistry()
        self.journal = Journal(config.data_dir / "journal.sqlite3")
        self.table = TaskTable(self.journal, self.queue)
        self.ledger = TokenLedger()
        self.tasks = self.table.tasks  # read-only view for INFO and tests
        self._stop = threading.Event()
        self.frontend = self.context.socket(zmq.ROUTER)
        self.backend = self.context.socket(zmq.ROUTER)
        for sock in (self.frontend, self.backend):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._curve = None
        self.frontend_endpoint = ""
        self.backend_endpoint = ""
        self._front_handlers = {
            p.SUBMIT: self._on_submit, p.STATUS: self._on_status, p.FETCH: self._on_fetch,
            p.CANCEL_TASK: self._on_cancel, p.INFO: self._on_info, p.ADMIN: self._on_admin,
            p.LEASE: self._on_lease,
        }
        self._node_handlers = {
            p.READY: self._on_ready, p.HEARTBEAT: self._on_heartbeat, p.PROGRESS: self._on_progress,
            p.RESULT: self._on_result, p.ERROR: self._on_error, p.DISCONNECT: self._on_disconnect,
        }
        self.table.recover(self.clock(), grace=config.node_timeout)

    # ---- lifecycle -------------------------------------------------------

    def bind(self) -> tuple[str, str]:
        """Bind both sockets; returns the actual endpoints (ports resolved)."""
        from broker.curve import check_exposure, setup_server  # local: only needed when binding

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
        """Close sockets with linger 0 and the journal."""
        self.frontend.close(linger=0)
        self.backend.close(linger=0)
        if self._curve is not None:
            self._curve.stop()
        self.journal.close()

    def run(self) -> None:
        """Serve until stop(): poll both sockets, then run timers."""
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        tick = max(0.05, self.config.heartbeat_interval / 4)
        next_timers = 0.0
        while not self._stop.is_set():
            events = dict(poller.poll(timeout=int(tick * 1000)))
            if self.backend in events:
                self._drain(self.backend, self._handle_node)
            if self.frontend in events:
                self._drain(self.frontend, self._handle_front)
            now = self.clock()
            if now >= next_timers:
                self._timers(now)
                next_timers = now + tick

    def _drain(self, sock: zmq.Socket, handler: Callable[[list[bytes]], None]) -> None:
        for _ in range(1000):  # bounded so one busy side cannot starve the other
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            handler(frames)

    # ---- sending ---------------------------------------------------------

    def _send(self, sock: zmq.Socket, identity: bytes, command: bytes,
              header: dict[str, Any] | None = None, blobs: list[bytes] | tuple = ()) -> bool:
        try:
            sock.send_multipart(p.routed(identity, command, header, blobs), copy=False)
            return True
        except zmq.ZMQError as exc:  # peer gone (ROUTER_MANDATORY) or queue full
            log.warning("cannot send %s to %r: %s", p.COMMAND_NAMES[command], identity, exc)
            return False

    def _to_node(self, node: Node, command: bytes, header: dict[str, Any] | None = None,
                 blobs: list[bytes] | tuple = ()) -> bool:
        node.last_sent = self.clock()
        return self._send(self.backend, node.identity, command, header, blobs)

    def _reply(self, identity: bytes, req: Any, command: bytes, header: dict[str, Any],
               blobs: list[bytes] | tuple = ()) -> None:
        # "now" lets each front keep SUBMIT deadlines in this clock, whatever its own says.
        self._send(self.frontend, identity, command, {"req": req, "now": self.clock(), **header}, blobs)

    # ---- front side ------------------------------------------------------

    def _handle_front(self, frames: list[bytes]) -> None:
        try:
            identity, msg = p.split_routed(frames)
        except p.ProtocolError as exc:
            log.warning("bad front message: %s", exc)
            if frames:
                self._send(self.frontend, frames[0], p.FAIL, {"code": p.E_PROTOCOL, "message": str(exc)})
            return
        handler = self._front_handlers.get(msg.command)
        req = msg.header.get("req")
        if handler is None:
            self._reply(identity, req, p.FAIL, {"code": p.E_PROTOCOL, "message": f"unexpected {msg.name}"})
            return
        try:
            handler(identity, req, msg)
        except RequestError as exc:
            self._reply(identity, req, p.FAIL, {"code": exc.code, "message": str(exc), **exc.extra})
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("malformed %s from front: %r", msg.name, exc)
            self._reply(identity, req, p.FAIL, {"code": p.E_BAD_REQUEST, "message": f"malformed request: {exc!r}"})
        except Exception:  # one request must never take the broker down
            log.exception("error handling %s from front", msg.name)
            self._reply(identity, req, p.FAIL, {"code": p.E_PROTOCOL, "message": "internal broker error"})

    def _on_submit(self, identity: bytes, req: Any, msg: p.Message) -> None:
        deadline = msg.header.get("deadline")
        if deadline is not None and self.clock() > float(deadline):
            # Its front has answered 503 by now: running it would surprise a client that retries.
            raise RequestError(p.E_EXPIRED, "the request reached the broker after its front gave up on it")
        spec = msg.header["task"]
        owner = str(msg.header.get("owner", ""))
        idem_key = msg.header.get("idempotency_key")
        idem_hash = fingerprint(spec, msg.blobs) if idem_key else None
        if idem_key and self._replay(identity, req, msg, owner, str(idem_key), idem_hash):
            return
        model, mode = str(spec["model_id"]), str(spec["mode"])
        self._check_servable(model, mode)
        if len(self.queue) >= self.config.max_queued:
            raise RequestError(p.E_QUEUE_FULL, f"queue is full ({self.config.max_queued} tasks waiting)")
        if owner and self.table.unfinished_for(owner) >= self.config.max_queued_per_owner:
            raise RequestError(p.E_QUEUE_FULL, f"this key already has {self.config.max_queued_per_owner} tasks waiting")
        names = [str(n) for n in msg.header.get("images", [])]
        if len(names) != len(msg.blobs):
            raise RequestError(p.E_BAD_REQUEST, "image names and blob frames differ in number")
        now = self.clock()
        task = Task(
            task_id=uuid.uuid4().hex, model=model, mode=mode, priority=int(spec.get("priority", 0)),
            seq=self.table.next_seq(), params=dict(spec.get("params", {})), owner=owner, image_names=names,
            inputs=list(msg.blobs), created=now, deadline=now + self.config.task_timeout,
            idem_key=str(idem_key) if idem_key else None, idem_hash=idem_hash,
        )
        if msg.header.get("watch"):
            task.watchers.add(identity)
        if not self.table.make_room(task, self.config.disk_budget_bytes):
            raise RequestError(p.E_DISK_FULL, f"result storage is full ({self.table.disk_used} of"
                               f" {self.config.disk_budget_bytes} bytes in use or reserved); retry later")
        self.table.accept(task, now)  # journaled before the ACK
        self._reply(identity, req, p.ACK, {"task_id": task.task_id,
                                           "queue_position": self.queue.position(task.task_id)})
        self._dispatch()

    def _replay(self, identity: bytes, req: Any, msg: p.Message, owner: str, key: str, digest: str | None) -> bool:
        """Answer a retried SUBMIT with the task its Idempotency-Key already names; False if none."""
        task = self.table.by_idempotency_key(owner, key)
        if task is None:
            return False
        if task.idem_hash != digest:
            raise RequestError(p.E_IDEMPOTENCY, "this Idempotency-Key was used with a different request")
        self._reply(identity, req, p.ACK, {"task_id": task.task_id, "replayed": True,
                                           "queue_position": self.queue.position(task.task_id)})
        if msg.header.get("watch"):
            if task.final:
                result = self.journal.result(task.task_id) if task.state == p.COMPLETED else None
                self._send(self.frontend, identity, p.DONE, {"task": task.describe()},
                           [result] if result is not None else [])
            else:
                task.watchers.add(identity)
        return True

    def _check_servable(self, model: str, mode: str) -> None:
        if model in p.MODEL_MODES and mode in p.MODEL_MODES[model] and self.nodes.serves(model, mode):
            return  # the common case, without building the served-models summary
        served = self.nodes.served_models()
        if model not in p.MODEL_MODES:
            raise RequestError(p.E_UNKNOWN_MODEL, f"unknown model_id {model!r}; served models: {sorted(served)}",
                               served=sorted(served))
        if mode not in p.MODEL_MODES[model]:
            raise RequestError(p.E_UNSUPPORTED_MODE, f"model {model!r} does not support mode {mode!r};"
                               f" it supports {list(p.MODEL_MODES[model])}",
                               supported=list(p.MODEL_MODES[model]))
        if model not in served:
            raise RequestError(p.E_NO_NODE, f"no live node serves {model!r}; served models: {sorted(served)}",
                               served=sorted(served))
        if mode not in served[model]["modes"]:
            raise RequestError(p.E_NO_NODE, f"no live node serves {model!r} in mode {mode!r}",
                               served=sorted(served))

    def _task(self, msg: p.Message) -> Task:
        task = self.tasks.get(str(msg.header.get("task_id", "")))
        if task is None:
            raise RequestError(p.E_NOT_FOUND, "task not found")
        return task

    def _on_status(self, identity: bytes, req: Any, msg: p.Message) -> None:
        task = self._task(msg)
        if msg.header.get("watch") and not task.final:
            task.watchers.add(identity)
        self._reply(identity, req, p.REPLY, {"task": task.describe(self.queue.position(task.task_id))})

    def _on_fetch(self, identity: bytes, req: Any, msg: p.Message) -> None:
        task = self._task(msg)
        blobs = []
        if task.state == p.COMPLETED:
            result = self.journal.result(task.task_id)
            blobs = [result] if result is not None else []
        self._reply(identity, req, p.REPLY, {"task": task.describe(self.queue.position(task.task_id))}, blobs)

    def _on_cancel(self, identity: bytes, req: Any, msg: p.Message) -> None:
        task = self._task(msg)
        if msg.header.get("orphaned") and not task.final:
            # Accepted after its front had answered 503: the client never learnt of it.
            self._fail(task, p.CANCELLED, p.E_EXPIRED, "accepted after its client was told the submit failed")
            self.table.forget_idempotency_key(task)  # the client's retry must create it anew
        elif not task.final:
            self._fail(task, p.CANCELLED, p.E_CANCELLED, "cancelled by request")
        self._reply(identity, req, p.REPLY, {"task": task.describe()})

    def _on_info(self, identity: bytes, req: Any, msg: p.Message) -> None:
        now = self.clock()
        self._reply(identity, req, p.REPLY, {
            "nodes": [n.describe(now) for n in self.nodes],
            "models": self.nodes.served_models(),
            "queue": {"length": len(self.queue), "by_model": self.queue.models_waiting()},
            "tasks": self.table.counts(), "time": now,
        })

    def _on_lease(self, identity: bytes, req: Any, msg: p.Message) -> None:
        h = msg.header
        limit, window = int(h["limit"]), float(h["window"])
        if limit < 1 or not 0 < window <= 86_400:
            raise RequestError(p.E_BAD_REQUEST, "limit must be >= 1 and window in (0, 86400] seconds")
        granted, retry = self.ledger.grant(str(h["key"]), max(1, int(h.get("want", 1))), limit, window,
                                           self.clock(), max(0, int(h.get("returned", 0))))
        self._reply(identity, req, p.REPLY, {"granted": granted, "retry_after": retry})

    def _on_admin(self, identity: bytes, req: Any, msg: p.Message) -> None:
        action = str(msg.header.get("action", ""))
        if action not in ("drain", "undrain"):
            raise RequestError(p.E_BAD_REQUEST, f"unknown admin action {action!r}")
        node = self.nodes.find(str(msg.header.get("node", "")))
        if node is None:
            raise RequestError(p.E_NOT_FOUND, "no such node")
        node.draining = action == "drain"
        log.info("node %s %sed", node.node_id, action)
        self._reply(identity, req, p.REPLY, {"node": node.describe(self.clock())})
        self._dispatch()

    # ---- node side -------------------------------------------------------

    def _handle_node(self, frames: list[bytes]) -> None:
        try:
            identity, msg = p.split_routed(frames)
        except p.ProtocolError as exc:
            log.warning("bad node message: %s", exc)
            return
        node = self.nodes.touch(identity, self.clock())
        if node is None and msg.command not in (p.READY, p.DISCONNECT):
            # Unknown node (e.g. the broker restarted): ask it to register again.
            self._send(self.backend, identity, p.DISCONNECT, {"reason": "not registered"})
            return
        try:
            self._node_handlers[msg.command](identity, node, msg)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("malformed %s from node %r: %r", msg.name, identity, exc)
        except Exception:  # one message must never take the broker down
            log.exception("error handling %s from node %r", msg.name, identity)

    def _on_ready(self, identity: bytes, _node: Node | None, msg: p.Message) -> None:
        busy = msg.header.get("busy_task")
        old = self.nodes.get(identity) or self._same_process(identity, msg.header)
        kept = None
        if old is not None and old.task_id:
            if busy == old.task_id or (busy is None and old.identity == identity):
                # Same process: it runs this task, or its JOB is still on the way (it left after
                # this READY on the same connection, which keeps order). Nothing to re-queue.
                kept = self.tasks.get(old.task_id)
            else:
                self._requeue_node_task(old, "node re-registered")
        if old is not None and old.identity != identity:
            self.nodes.remove(old.identity)
        node = self.nodes.register(identity, msg.header, self.clock())
        task = None if kept is not None else self.table.claim(busy) if busy else None
        if kept is not None:
            node.state, node.task_id = BUSY, kept.task_id
            kept.node = identity
            self.journal.update(kept)
        elif task is not None:
            # After a broker restart the node is still running this task: it keeps it.
            self._start(task, node, resumed=True)
        elif busy or msg.header.get("busy"):
            if busy:
                self._to_node(node, p.CANCEL, {"task_id": busy, "reason": "task unknown or reassigned"})
            node.state = BUSY  # until it reports idle
            node.task_id = None
        log.info("node %s registered: %s serving %s", node.node_id, node.device, sorted(node.models))
        self._dispatch()

    def _same_process(self, identity: bytes, header: dict[str, Any]) -> Node | None:
        """The entry of this node's previous connection (same id, host and pid), if still registered."""
        old = self.nodes.find(str(header.get("node_id", "")))
        if old is not None and old.identity != identity and old.host == str(header.get("host", "")) \
                and old.pid == int(header.get("pid", 0)):
            return old
        return None

    def _on_heartbeat(self, identity: bytes, node: Node, msg: p.Message) -> None:
        h = msg.header
        if "loaded" in h:
            node.loaded = list(h["loaded"])
        if "memory_free" in h:
            node.memory_free = int(h["memory_free"])
        if h.get("loras") is not None:
            node.loras = list(h["loras"])
        if h.get("leaving") and not node.draining:
            node.draining = True  # a stopping node: no new work while its job winds down
            log.info("node %s is stopping", node.node_id)
        if h.get("idle") and node.state == BUSY and node.task_id is None:
            node.state = IDLE  # a cancelled task has finished unwinding
            self._dispatch()

    def _on_progress(self, identity: bytes, node: Node, msg: p.Message) -> None:
        task = self.tasks.get(str(msg.header["task_id"]))
        if task is not None and task.node == identity and task.state == p.RUNNING:
            task.step, task.total = int(msg.header["step"]), int(msg.header["total"])

    def _on_result(self, identity: bytes, node: Node, msg: p.Message) -> None:
        task_id = str(msg.header["task_id"])
        task = self._release(node, task_id, msg.header.get("loaded"))
        if task is None:
            # A report kept by a node across a broker restart or a reconnect: finished work is
            # never thrown away while its task is still waiting or running elsewhere.
            task = self._adoptable(task_id)
        meta = dict(msg.header.get("meta", {}))
        result = msg.blobs[0] if msg.blobs else b""
        wrong = check_image(result, str(meta.get("format", "png")), meta.get("width"), meta.get("height"))
        if task is not None and wrong:
            log.warning("node %s returned %s for task %s: failing it", node.node_id, wrong, task_id)
            self._fail(task, p.FAILED, p.E_GENERATION, f"the node returned an invalid result: {wrong}")
        elif task is not None:
            self._detach(task)
            task.state = p.COMPLETED
            task.finished = self.clock()
            task.meta = meta
            task.step = task.total
            self.table.finish(task, result)
            node.jobs_done += 1
            self._notify(task, [result])
        self._to_node(node, p.RESULT_ACK, {"task_id": task_id})
        self._dispatch()

    def _on_error(self, identity: bytes, node: Node, msg: p.Message) -> None:
        task_id = str(msg.header["task_id"])
        task = self._release(node, task_id, msg.header.get("loaded"))
        code = str(msg.header.get("code", p.E_GENERATION))
        if code == p.E_NODE_BUSY:
            node.state, node.task_id = BUSY, None  # busy with work we do not know of: idle when it says so
        if task is not None and code == p.E_NODE_BUSY:
            task.attempts -= 1  # it never started
            self._requeue(task, "its node could not take it")
        elif task is not None and code == p.E_ABANDONED:
            self._requeue(task, "its node stopped it without failing it")
        elif task is not None:
            self._fail(task, p.FAILED, code, str(msg.header.get("message", "generation failed")))
        self._to_node(node, p.RESULT_ACK, {"task_id": task_id})
        self._dispatch()

    def _adoptable(self, task_id: str) -> Task | None:
        task = self.tasks.get(task_id)
        if task is None or task.final:
            return None
        log.info("adopting the late result of task %s (it was %s)", task_id, task.state)
        return task

    def _on_disconnect(self, identity: bytes, node: Node | None, msg: p.Message) -> None:
        node = self.nodes.remove(identity)
        if node is not None:
            log.info("node %s disconnected", node.node_id)
            if node.task_id:
                self._requeue_node_task(node, "node disconnected")

    def _release(self, node: Node, task_id: str, loaded: list[str] | None = None) -> Task | None:
        """Mark the node idle; return the task only if this node legitimately owns it."""
        if loaded is not None:
            node.loaded = list(loaded)
        if node.task_id == task_id or (node.state == BUSY and node.task_id is None):
            node.state, node.task_id = IDLE, None  # also ends a cancelled task's unwinding
        task = self.tasks.get(task_id)
        if task is not None and task.final:
            return None
        if task is None or task.node != node.identity or task.state != p.RUNNING:
            log.info("discarding late message for task %s from %s", task_id, node.node_id)
            return None
        return task

    # ---- scheduling and task transitions --------------------------------

    def _dispatch(self) -> None:
        """Pair idle nodes with tasks: best task first, and a node that has its model loaded first."""
        now = self.clock()
        idle = self.nodes.available()
        while idle and len(self.queue):
            best = None
            for node in idle:
                entry = self.queue.peek_for(node.models, node.loaded, now)
                if entry is None:
                    continue
                key = (entry.priority, entry.model not in node.loaded, entry.seq)
                if best is None or key < best[0]:
                    best = (key, node, entry)
            if best is None:
                return
            _, node, entry = best
            self.queue.remove(entry.task_id)
            idle.remove(node)
            self._start(self.tasks[entry.task_id], node)

    def _start(self, task: Task, node: Node, resumed: bool = False) -> None:
        """Run `task` on `node`; `resumed` means the node already runs it (no JOB, same attempt)."""
        task.state, task.node, task.node_id = p.RUNNING, node.identity, node.node_id
        task.started = self.clock()
        task.attempts += 0 if resumed else 1
        task.step, task.total = 0, int(task.params.get("num_inference_steps", 0))
        node.state, node.task_id = BUSY, task.task_id
        self.journal.update(task)
        if not resumed and not self._to_node(node, p.JOB, task.job_header(), task.inputs):
            self.nodes.remove(node.identity)
            task.attempts -= 1  # it never reached the node
            self._requeue_node_task(node, "node unreachable")

    def _requeue_node_task(self, node: Node, why: str) -> None:
        """Put back the task a lost or re-registering node was running."""
        task = self.tasks.get(node.task_id or "")
        node.task_id = None
        if task is not None and not task.final:
            self._requeue(task, why)

    def _requeue(self, task: Task, why: str) -> None:
        """Back to the queue at its original priority and place, or failed after max_retries."""
        task.node = task.node_id = None
        if task.attempts > self.config.max_retries:
            self._fail(task, p.FAILED, p.E_NODE_LOST,
                       f"{why}; gave up after {task.attempts} attempts")
            return
        log.warning("re-queueing task %s (%s, attempt %d)", task.task_id, why, task.attempts)
        self.table.enqueue(task, self.clock())

    def _detach(self, task: Task, reason: str = "finished elsewhere") -> None:
        """Take an ending task out of the queue, or stop it on the node that runs it."""
        self.table.withdraw(task.task_id)
        if task.state == p.RUNNING and task.node is not None:
            node = self.nodes.get(task.node)
            if node is not None and node.task_id == task.task_id:
                # The node keeps BUSY until it reports idle, so nothing overlaps.
                self._to_node(node, p.CANCEL, {"task_id": task.task_id, "reason": reason})
                node.task_id = None

    def _fail(self, task: Task, state: str, code: str, message: str) -> None:
        self._detach(task, code)
        task.state, task.error_code, task.error = state, code, message
        task.finished = self.clock()
        self.table.finish(task, None)
        self._notify(task, [])

    def _notify(self, task: Task, blobs: list[bytes]) -> None:
        task.inputs = []
        header = {"task": task.describe()}
        for identity in task.watchers:
            self._send(self.frontend, identity, p.DONE, header, blobs)
        task.watchers.clear()

    # ---- timers ----------------------------------------------------------

    def _timers(self, now: float) -> None:
        self.table.housekeeping(now, self.config.result_ttl)
        self.table.trim(self.config.disk_budget_bytes)
        for node in self.nodes.expired(now, self.config.node_timeout):
            log.warning("node %s expired after %.1fs of silence", node.node_id, now - node.last_seen)
            self.nodes.remove(node.identity)
            if node.task_id:
                self._requeue_node_task(node, "node expired")
        for node in self.nodes:
            if now - node.last_sent >= self.config.heartbeat_interval:
                self._to_node(node, p.HEARTBEAT)
        for task in list(self.table.overdue(now)):
            self._fail(task, p.FAILED, p.E_TIMEOUT, "task timed out")
        self._dispatch()
