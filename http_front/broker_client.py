"""The front's link to the broker: one I/O thread owns the DEALER socket.

Request threads (waitress) never touch the socket: they queue frames, wake the
I/O thread through a socketpair, and wait on a Future with a timeout. Replies
are matched by request id; DONE pushes for watched tasks resolve task waiters,
so a synchronous /generate returns as soon as the node's result reaches the
broker, with no polling delay.
"""

from __future__ import annotations

import itertools
import logging
import queue
import socket
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Callable

import msgspec
import zmq

from genserve import wire as w
from genserve.curve import setup_client
from genserve.logs import ids

log = logging.getLogger(__name__)

RECENT_DONE = 32
MAX_ORPHANS = 1024  # SUBMITs answered 503 whose ACK may still arrive


class BrokerUnavailable(Exception):
    """The broker did not answer in time."""


class BrokerError(Exception):
    """The broker refused a request (FAIL), with its protocol error code."""

    def __init__(self, code: str, message: str, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.extra = extra or {}


class BrokerClient:
    """Thread-safe request/reply and task-completion client for one broker."""

    def __init__(self, endpoint: str, timeout: float = 2.0, context: zmq.Context | None = None,
                 curve_secret_file: Path | None = None, curve_server_public_file: Path | None = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.context = context or zmq.Context.instance()
        self._curve = (curve_secret_file, curve_server_public_file)
        self._outbox: queue.SimpleQueue[tuple[int, list[bytes]]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._pending: dict[int, Future] = {}
        self._waiters: dict[str, list[Future]] = {}
        # DONE pushes that arrived before their waiter registered (tiny tasks are that fast).
        self._recent: OrderedDict[str, w.Message] = OrderedDict()
        # SUBMITs whose caller already answered "failed": if their ACK still comes, cancel the task.
        self._orphans: OrderedDict[int, None] = OrderedDict()
        self._clock_offset: float | None = None  # broker clock minus ours, from its replies
        self._unsent: deque[tuple[int, list[bytes]]] = deque()  # I/O thread only
        # Called with each EVENT push (task changes for event streams), on the I/O thread: keep them quick.
        self.event_listeners: list[Callable[[w.Event], None]] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="broker-io", daemon=True)

    def start(self) -> "BrokerClient":
        """Start the I/O thread."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the I/O thread; its socket closes with linger 0."""
        self._stop.set()
        self._wake()
        self._thread.join(timeout=5)
        self._wake_r.close()
        self._wake_w.close()

    # ---- API used by request threads --------------------------------------

    def request(self, header: Any, blobs: list[bytes] | tuple = (), timeout: float | None = None) -> w.Message:
        """Send one request (its `req` is set here) and wait for its ACK/REPLY.

        Raises BrokerError (FAIL) or BrokerUnavailable (no answer within `timeout`).
        """
        req = next(self._ids)
        future: Future = Future()
        timeout = timeout if timeout is not None else self.timeout
        is_submit = isinstance(header, w.Submit)
        if is_submit and self._clock_offset is not None:
            # In the broker's clock: a SUBMIT delivered after we gave up must not be queued.
            header = msgspec.structs.replace(header, req=req, deadline=time.time() + self._clock_offset + timeout)
        else:
            header = msgspec.structs.replace(header, req=req)
        with self._lock:
            self._pending[req] = future
        self._outbox.put((req, w.encode(header, blobs)))
        self._wake()
        try:
            msg: w.Message = future.result(timeout)
        except FutureTimeout:
            if is_submit:
                with self._lock:
                    self._orphans[req] = None
                    while len(self._orphans) > MAX_ORPHANS:
                        self._orphans.popitem(last=False)
            raise BrokerUnavailable("the broker did not answer in time") from None
        finally:
            with self._lock:
                self._pending.pop(req, None)
        if msg.command == w.FAIL:
            h: w.Fail = msg.header
            extra = {k: v for k, v in (("served", h.served), ("supported", h.supported)) if v is not None}
            raise BrokerError(h.code, h.message, extra)
        return msg

    def post(self, header: Any) -> None:
        """Send a request whose answer nobody waits for (an unsubscribe, an orphan cancel)."""
        self._outbox.put((0, w.encode(msgspec.structs.replace(header, req=0))))
        self._wake()

    def watch(self, task_id: str) -> Future:
        """A Future resolved with the DONE message when the task ends (register before it can end)."""
        future: Future = Future()
        with self._lock:
            early = self._recent.pop(task_id, None)
            if early is not None:
                future.set_result(early)
            else:
                self._waiters.setdefault(task_id, []).append(future)
        return future

    def unwatch(self, task_id: str, future: Future) -> None:
        """Forget a waiter (on timeout)."""
        with self._lock:
            waiters = self._waiters.get(task_id, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(task_id, None)

    # ---- I/O thread -------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or we are closing

    def _loop(self) -> None:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # No queueing for a broker we are not connected to: such a request fails at once
        # (503) instead of being delivered, and run, after its client was told it failed.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RCVHWM, w.FRONT_HWM)  # bursts of stream events
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        setup_client(sock, *self._curve)
        sock.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(timeout=10 if self._unsent else 500))
                if self._wake_r.fileno() in events:
                    try:
                        self._wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                self._flush(sock)
                if sock in events:
                    self._receive(sock)
        finally:
            sock.close(linger=0)

    def _receive(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = w.decode(frames)
            except w.ProtocolError as exc:
                log.warning("bad broker reply: %s", exc)
                continue
            if msg.command == w.EVENT:
                for listener in self.event_listeners:
                    listener(msg.header)
                continue
            if msg.command == w.DONE:
                task_id = msg.header.task.task_id
                with self._lock:
                    waiters = self._waiters.pop(task_id, [])
                    if not waiters:
                        self._recent[task_id] = msg
                        while len(self._recent) > RECENT_DONE:
                            self._recent.popitem(last=False)
                for future in waiters:
                    if not future.done():
                        future.set_result(msg)
                continue
            self._clock_offset = msg.header.now - time.time()
            req = msg.header.req
            with self._lock:
                future = self._pending.get(req)
                orphan = self._orphans.pop(req, 0) is None
            if future is not None and not future.done():
                future.set_result(msg)
            elif orphan and msg.command == w.ACK and not msg.header.replayed:
                # (A replayed ACK names a task that another request created and may have been told of.)
                task_id = msg.header.task_id
                log.warning("task %s was accepted after its client was told it failed: cancelling it", task_id,
                            extra=ids(task_id))
                self.post(w.CancelTask(0, task_id, orphaned=True))

    def _flush(self, sock: zmq.Socket) -> None:
        """Send what waits; a request not sendable yet (no connection) is retried while its caller waits."""
        waiting, self._unsent = self._unsent, deque()
        while True:
            try:
                waiting.append(self._outbox.get_nowait())
            except queue.Empty:
                break
        for req, frames in waiting:
            with self._lock:
                wanted = req == 0 or req in self._pending  # 0: fire-and-forget (orphan cancels)
            if not wanted:
                continue  # its caller gave up: never send it late
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                if len(self._unsent) < MAX_ORPHANS:
                    self._unsent.append((req, frames))
