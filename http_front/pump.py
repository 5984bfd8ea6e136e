"""Event streams after their first bytes: one thread writes every open stream.

Waitress serves a response to its end on one worker thread, and every open connection
costs its loop a little on each pass (about 0.45 ms per pass with 1,000 open connections,
several passes per request). A stream held by waitress for a task's whole life would cost
a thread each and slow every other request. So once a stream's headers and snapshot are
out, the worker hands the connection over (http_front.server: waitress writes nothing more
and closes its own descriptor) and the stream lives on here: one selector over the
streams' sockets, chunks written as events arrive, a keep-alive comment on quiet streams,
hang-ups noticed at once, and a stream whose client reads too slowly ended (its client
reconnects with Last-Event-ID). A second thread renews the event subscriptions.
"""

from __future__ import annotations

import logging
import queue
import selectors
import socket
import threading
import time
from typing import Any, Callable

from genserve.logs import ids
from http_front.events import Closer, EventHub, EventWriter, Stream

log = logging.getLogger(__name__)

MAX_BUFFER = 256 * 1024  # unsent bytes one stream may hold before it is ended as too slow
TICK = 1.0  # seconds between keep-alive checks
END_CHUNK = b"0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    """`data` as one HTTP/1.1 chunk."""
    return b"%X\r\n%s\r\n" % (len(data), data)


class Pumped:
    """One handed-over stream: its socket and framing, the events it reads and what is unsent."""

    def __init__(self, sock: socket.socket, chunked: bool, stream: Stream, writer: EventWriter, hub: EventHub,
                 on_close: Closer) -> None:
        self.sock = sock
        self.chunked = chunked
        self.stream = stream
        self.writer = writer
        self.hub = hub
        self.on_close = on_close
        self.out = bytearray()
        self.last_write = time.monotonic()
        self.closed = False
        self.registered = False


class StreamPump:
    """The thread that writes every handed-over stream (start, adopt, close)."""

    def __init__(self, keepalive: float = 15.0, renew_every: float = 1.0) -> None:
        self.keepalive = keepalive
        self.renew_every = renew_every
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._new: list[Pumped] = []
        self._dirty: set[Pumped] = set()
        self._streams: set[Pumped] = set()  # pump thread only
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def open_streams(self) -> int:
        """Streams this pump writes now."""
        with self._lock:
            return len(self._streams) + len(self._new)

    def start(self) -> "StreamPump":
        """Start the writer and the renewal threads."""
        self._threads = [threading.Thread(target=self._loop, name="stream-pump", daemon=True),
                         threading.Thread(target=self._renew, name="stream-renew", daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def adopt(self, pumped: Pumped) -> None:
        """Take over a stream (thread-safe); its queued items are written at once."""
        pumped.sock.setblocking(False)
        with self._lock:
            self._new.append(pumped)  # before any notify: the loop registers new streams first
            pumped.stream.notify = lambda: self._notify(pumped)
        self._wake()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the threads (joined with a timeout) and end every stream."""
        self._stop.set()
        self._wake()
        for thread in self._threads:
            thread.join(timeout)
        with self._lock:
            left = list(self._streams) + self._new
            self._streams.clear()
            self._new.clear()
        for pumped in left:
            self._end(pumped, "the server is stopping")
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # ---- any thread ---------------------------------------------------------------------

    def _notify(self, pumped: Pumped) -> None:
        with self._lock:
            self._dirty.add(pumped)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or the pump is closed

    # ---- the pump thread ------------------------------------------------------------------

    def _loop(self) -> None:
        next_tick = time.monotonic() + TICK
        while not self._stop.is_set():
            for key, mask in self._sel.select(timeout=max(0.0, next_tick - time.monotonic())):
                pumped: Pumped | None = key.data
                if pumped is None:
                    self._drain_wake()
                    continue
                if mask & selectors.EVENT_READ:
                    self._guarded(pumped, self._read)
                if mask & selectors.EVENT_WRITE:
                    self._guarded(pumped, self._flush)
            with self._lock:
                new, self._new = self._new, []
                dirty, self._dirty = self._dirty, set()
                self._streams.update(new)
            for pumped in new:
                self._guarded(pumped, self._register)
            for pumped in (*new, *dirty):
                self._guarded(pumped, self._drain)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK
                with self._lock:
                    streams = list(self._streams)
                for pumped in streams:
                    if now - pumped.last_write >= self.keepalive:
                        self._guarded(pumped, lambda p: self._write(p, b": keep-alive\n\n"))

    def _guarded(self, pumped: Pumped, step: Callable[[Pumped], None]) -> None:
        """Run one step for one stream; a failure ends that stream, never the pump."""
        if pumped.closed:
            return
        try:
            step(pumped)
        except Exception:  # one stream's bug must not stop every other stream
            log.exception("event stream of task %s failed; ending it", pumped.stream.task_id,
                          extra=ids(pumped.stream.task_id))
            self._end(pumped, None)

    def _register(self, pumped: Pumped) -> None:
        self._sel.register(pumped.sock, selectors.EVENT_READ, pumped)
        pumped.registered = True

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _drain(self, pumped: Pumped) -> None:
        """Write every item the stream has queued; the final event ends it."""
        while not pumped.writer.done:
            try:
                item = pumped.stream.items.get_nowait()
            except queue.Empty:
                return
            data = pumped.writer.feed(item)
            if data:
                self._write(pumped, data, last=pumped.writer.done)

    def _write(self, pumped: Pumped, data: bytes, last: bool = False) -> None:
        if pumped.closed:
            return
        pumped.out += chunk(data) if pumped.chunked else data
        if last and pumped.chunked:
            pumped.out += END_CHUNK
        pumped.last_write = time.monotonic()
        if len(pumped.out) > MAX_BUFFER:
            self._end(pumped, "its client reads too slowly")
            return
        self._flush(pumped)

    def _flush(self, pumped: Pumped) -> None:
        try:
            sent = pumped.sock.send(pumped.out)
            del pumped.out[:sent]
        except BlockingIOError:
            pass
        except OSError:
            self._end(pumped, None)  # the client left
            return
        if pumped.writer.done and not pumped.out:
            self._end(pumped, None)
            return
        if pumped.registered:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if pumped.out else 0)
            self._sel.modify(pumped.sock, events, pumped)

    def _read(self, pumped: Pumped) -> None:
        """An event-stream client sends nothing after its request: end of file means it left, and
        anything else ends the stream too (reading junk at line rate would cost every stream)."""
        try:
            data = pumped.sock.recv(1)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._end(pumped, "its client sent data after the request" if data else None)

    def _end(self, pumped: Pumped, why: str | None) -> None:
        if pumped.closed:
            return
        pumped.closed = True
        pumped.stream.notify = None
        if why:
            log.info("ending the event stream of task %s: %s", pumped.stream.task_id, why,
                     extra=ids(pumped.stream.task_id))
        with self._lock:
            self._streams.discard(pumped)
        if pumped.registered:
            pumped.registered = False
            try:
                self._sel.unregister(pumped.sock)
            except (KeyError, ValueError, OSError):
                log.debug("stream of task %s was already out of the selector", pumped.stream.task_id)
        try:
            pumped.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone
        pumped.sock.close()
        pumped.on_close()

    # ---- the renewal thread ---------------------------------------------------------------

    def _renew(self) -> None:
        """Let each hub with pumped streams renew its subscriptions when due (it may block on the broker)."""
        while not self._stop.wait(self.renew_every):
            with self._lock:
                hubs: dict[int, Any] = {id(p.hub): p.hub for p in self._streams}
            for hub in hubs.values():
                try:
                    hub.maybe_renew()
                except Exception:  # the next pass tries again; the streams keep their pushed events
                    log.exception("renewing event subscriptions failed")
