"""Waitress for the front: limits from FrontConfig, JSON for waitress's own errors, a header deadline.

Waitress answers some requests without calling the app (413 past its body limit, 431
past its header limit, 400 for malformed requests, 500 when the app raises): those
answers use the app's JSON error shape here. Waitress closes connections that stay
idle (`channel_timeout`), but a client that trickles its headers a byte at a time is
never idle; `header_timeout` closes a connection whose request line and headers are
not complete that many seconds after their first byte (slowloris).

This subclasses waitress's server, channel, parser and error task through class
attributes and methods unchanged since waitress 1.x (``channel_class``,
``error_task_class``, ``parser_class``, ``maintenance``, ``handle_accept``);
tests/test_front_capacity.py checks each behaviour through real sockets.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask

from http_front.config import FrontConfig
from http_front.pump import StreamPump

log = logging.getLogger(__name__)

ACCEPT_BATCH = 64
FD_MARGIN = 256  # descriptors kept for the broker link, logs, key file and waitress's own
ERRORS = {413: "request too large", 431: "request header fields too large"}  # as the app words them


class _JsonErrorTask(ErrorTask):
    """Waitress's error response, as ``{"success": false, "error", "detail"}``."""

    def execute(self) -> None:
        """Write the error as JSON and close the connection after it (as waitress does)."""
        error = self.request.error
        body = json.dumps({"success": False, "error": ERRORS.get(error.code, error.reason.lower()),
                           "detail": str(error.body)}).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


HAND_OVER = "genserve.hand_over"  # environ key: how a response gives its connection to the stream pump
HEADER_BYTES = "genserve.header_bytes"  # environ key: bytes of the request line and header fields as received
FLUSH_WAIT = 2.0  # seconds a stream's first bytes may take to leave before the hand-over gives up


class _Task(WSGITask):
    """Waitress's WSGI task, with a way for an event stream to hand its connection to the pump."""

    handed_over = False

    def get_environment(self) -> dict[str, Any]:
        """Waitress's environ, plus HAND_OVER and HEADER_BYTES."""
        environ = super().get_environment()
        environ[HAND_OVER] = self.hand_over
        environ[HEADER_BYTES] = self.request.header_bytes_received
        return environ

    def hand_over(self, make: Any) -> bool:
        """Give the connection to the stream pump once what was written is sent; False if it cannot be.

        `make(socket, chunked)` builds the pump's stream. Waitress then writes nothing more
        (not even the last chunk) and closes its own descriptor; the pump owns a duplicate.
        """
        channel = self.channel
        pump: StreamPump | None = getattr(channel.server, "pump", None)
        if pump is None or not self.wrote_header:
            return False
        deadline = time.monotonic() + FLUSH_WAIT
        while True:
            with channel.outbuf_lock:
                if not channel.connected:
                    return False
                if not channel.total_outbufs_len:
                    sock = channel.socket.dup()
                    break
            if time.monotonic() > deadline:
                return False  # a client that does not read: the stream ends here
            time.sleep(0.01)
        self.handed_over = True
        self.close_on_finish = True
        pump.adopt(make(sock, self.chunked_response))
        return True

    def finish(self) -> None:
        """Waitress's end of the response, unless the pump now owns the connection."""
        if not self.handed_over:
            super().finish()


class _Parser(HTTPRequestParser):
    """Waitress's request parser, remembering when the request's first byte arrived."""

    def __init__(self, adj: Adjustments) -> None:
        super().__init__(adj)
        self.started = time.time()  # waitress's maintenance clock


class _Channel(HTTPChannel):
    """One client connection."""

    error_task_class = _JsonErrorTask
    parser_class = _Parser
    task_class = _Task


class _Server(TcpWSGIServer):
    """One listening socket; its maintenance also enforces the header deadline."""

    channel_class = _Channel
    header_timeout: float = 20.0
    pump: StreamPump | None = None

    def handle_accept(self) -> None:
        """Accept up to ACCEPT_BATCH waiting connections: each loop pass costs O(open connections)."""
        for _ in range(ACCEPT_BATCH):
            before = len(self._map)
            super().handle_accept()
            if len(self._map) == before or len(self._map) >= self.adj.connection_limit:
                return

    def maintenance(self, now: float) -> None:
        """Close idle connections (waitress) and those still sending headers after the deadline."""
        super().maintenance(now)
        cutoff = now - self.header_timeout
        for channel in list(self.active_channels.values()):
            request = channel.request
            if (request is not None and not request.headers_finished
                    and getattr(request, "started", now) < cutoff):
                channel.will_close = True


def raise_fd_limit(connection_limit: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one if connections need it; the limit that fits."""
    try:
        import resource
    except ImportError:  # not POSIX
        return connection_limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connection_limit + FD_MARGIN
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("raised the open-file limit from %d to %d", soft, target)
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
    if soft != resource.RLIM_INFINITY and soft < want:
        fitted = max(1, soft - FD_MARGIN)
        log.warning("open-file limit %d allows only %d connections (asked for %d); raise `ulimit -n`",
                    soft, fitted, connection_limit)
        return fitted
    return connection_limit


def adjustments(config: FrontConfig, connection_limit: int | None = None) -> dict[str, Any]:
    """Waitress settings derived from the config."""
    return {
        "host": config.host, "port": config.port, "threads": config.threads, "ident": "GenServe",
        "connection_limit": connection_limit or config.connection_limit,
        "channel_timeout": config.channel_timeout,
        # Maintenance (idle and header deadlines) runs this often; it is cheap.
        "cleanup_interval": max(1, min(5, config.header_timeout, config.channel_timeout)),
        "backlog": config.backlog,
        "asyncore_use_poll": True,  # select() fails past 1024 descriptors
        # Keep reading while a request runs, so a hang-up is seen (waitress.client_disconnected).
        "channel_request_lookahead": 1,
        # Above the app's own limits, so the app answers first (JSON, with its own wording).
        "max_request_header_size": 2 * config.max_header_bytes,
        "max_request_body_size": config.max_body_bytes + 1024 * 1024,
    }


class FrontServer:
    """Waitress listening on every address `host` resolves to, sharing one thread pool."""

    def __init__(self, app: Any, config: FrontConfig, connection_limit: int | None = None) -> None:
        self.adj = Adjustments(**adjustments(config, connection_limit))
        self.dispatcher = ThreadedTaskDispatcher()
        self.dispatcher.set_thread_count(self.adj.threads)
        self.map: dict[int, Any] = {}
        self.servers = [_Server(app, self.map, dispatcher=self.dispatcher, adj=self.adj, sockinfo=info)
                        for info in self.adj.listen]
        self.pump = StreamPump(config.stream_keepalive)
        for server in self.servers:
            server.header_timeout = config.header_timeout
            server.pump = self.pump
        self._stop = threading.Event()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of each listening socket (the port is real when 0 was asked)."""
        return [(s.effective_host, s.effective_port) for s in self.servers]

    def run(self) -> None:
        """Serve until close() or an interrupt; closes every socket before returning."""
        for host, port in self.addresses:
            log.info("listening on http://%s:%s", host, port)
        self.pump.start()
        try:
            while not self._stop.is_set():
                wasyncore.loop(timeout=self.adj.asyncore_loop_timeout, map=self.map, use_poll=True, count=1)
        except (SystemExit, KeyboardInterrupt):
            pass
        finally:
            self.dispatcher.shutdown()
            wasyncore.close_all(self.map)
            self.pump.close()

    def close(self) -> None:
        """Ask run() to return (thread-safe)."""
        self._stop.set()
        self.servers[0].pull_trigger()


def serve(app: Any, config: FrontConfig) -> None:
    """Raise the descriptor limit as needed, then serve `app` until interrupted."""
    # Streams handed to the pump leave waitress's connection count but keep their descriptor.
    limit = raise_fd_limit(config.connection_limit + config.max_streams)
    FrontServer(app, config, max(1, limit - config.max_streams)).run()
