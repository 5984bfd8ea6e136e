"""A local HTTP receiver for webhook tests: records every request and answers as scripted."""

from __future__ import annotations

import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


class Receiver:
    """A local HTTP server that records every request and answers as its script says.

    Behaviours: "200", "410", "500", "302" (Location: /target), "hang" (answer nothing until
    released), "drip" (a status line, then one header byte every 0.1 s until released).
    """

    def __init__(self, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: list[str] = []
        self.default = "200"
        self.on_request: Callable[[], None] = lambda: None
        self.hanging = 0
        self.client_gone = 0  # answers the client was no longer there to read
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       name="test-receiver")
        self.thread.start()

    def url(self, path: str = "/hook", host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def paths(self) -> list[str]:
        with self.lock:
            return [request["path"] for request in self.requests]

    def count(self, path: str = "/hook") -> int:
        return self.paths().count(path)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()  # joins the handler threads, released above
        self.thread.join(5)
        assert not self.thread.is_alive()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep the test output quiet; requests are recorded instead

            def do_GET(self) -> None:
                self.do_POST()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.lock:
                    receiver.requests.append({"path": self.path, "body": body, "at": time.monotonic(),
                                              "headers": {k.lower(): v for k, v in self.headers.items()}})
                    behaviour = receiver.script.pop(0) if receiver.script else receiver.default
                receiver.on_request()
                try:
                    self.answer(behaviour)
                except OSError:  # the client gave up (timeout, close): what some tests are about
                    with receiver.lock:
                        receiver.client_gone += 1

            def answer(self, behaviour: str) -> None:
                if behaviour == "hang":
                    with receiver.lock:
                        receiver.hanging += 1
                    receiver.release.wait(10)
                    with receiver.lock:
                        receiver.hanging -= 1
                    behaviour = "200"
                if behaviour == "drip":
                    self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Drip: ")
                    while not receiver.release.wait(0.1):
                        self.wfile.write(b"x")
                    return
                self.send_response(int(behaviour))
                if behaviour == "302":
                    self.send_header("Location", "/target")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        return Handler
