"""The front's own work per request, in process: the Falcon app called as WSGI, no server, no broker.

    .venv/bin/python bench/front_inproc.py [--calls 20000] [--rounds 5] [--write F]
    PYTHONPATH=/tmp/oldtree .venv/bin/python bench/front_inproc.py ...   # another tree's front

`create_app` with a broker stub that answers INFO at once (a snapshot with no nodes, so
/health answers 503 from its cached body) and one key with every permission; each call
builds the environ waitress would (with the header length waitress reports) and joins the
body. Reports microseconds per request for /health and /models, the median of `--rounds`
rounds, beside a bare Falcon app answering the same bytes: what is left is the front's
middleware (metrics, header limit, authentication and rate limit) and resource.
"""

from __future__ import annotations

import argparse
import io
import logging
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import falcon

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after PYTHONPATH: another tree given there is measured instead

from bench.report import emit  # noqa: E402
from genserve import wire as w  # noqa: E402
from genserve.views import QueueView  # noqa: E402
from http_front.app import create_app  # noqa: E402
from http_front.config import FrontConfig  # noqa: E402
from http_front.keys import KeyStore, parse_env_keys  # noqa: E402
from http_front.ratelimit import SlidingWindowLimiter  # noqa: E402

KEY = "bench-inproc-key-0123456789abcdef0123"
PATHS = ("/health", "/models")


class InfoStub:
    """Answers every request with an INFO snapshot at once."""

    event_listeners: list = []

    def request(self, header: Any, blobs: Any = (), timeout: float | None = None) -> Any:
        """An INFO reply with no nodes."""
        body = w.InfoBody(nodes=[], models={}, queue=QueueView(0, {}), tasks={}, time=time.time())
        return SimpleNamespace(header=SimpleNamespace(body=body))


def environ(path: str) -> dict[str, Any]:
    """What waitress hands the app for `GET path` from wrk (its header length included)."""
    return {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
            "REMOTE_HOST": "127.0.0.1", "REMOTE_PORT": "40000", "SCRIPT_NAME": "", "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr, "wsgi.version": (1, 0),
            "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
            "wsgi.input_terminated": True, "wsgi.file_wrapper": None, "waitress.client_disconnected": lambda: False,
            "HTTP_HOST": "127.0.0.1:8000", "HTTP_AUTHORIZATION": f"Bearer {KEY}", "genserve.header_bytes": 90}


def per_call(app: Callable, path: str, calls: int) -> float:
    """Microseconds per request."""
    def start_response(status: str, headers: list, exc_info: Any = None) -> None:
        return None

    started = time.perf_counter()
    for _ in range(calls):
        b"".join(app(environ(path), start_response))
    return (time.perf_counter() - started) / calls * 1e6


def bare_app(front: Callable) -> falcon.App:
    """A bare Falcon app answering each path with the front's own body."""
    app = falcon.App()
    for path in PATHS:
        captured: list[bytes] = [b"".join(front(environ(path), lambda *a: None))]

        class Fixed:
            body = captured[0]

            def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
                resp.content_type = falcon.MEDIA_JSON
                resp.data = self.body

        app.add_route(path, Fixed())
    return app


def main() -> None:
    """Measure; print (and optionally append) the section."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--label", default="this tree")
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    keys = KeyStore.from_env(parse_env_keys({"API_KEY_1": f"{KEY}:bench:all"}), None)
    front = create_app(InfoStub(), keys, FrontConfig(rate_limit=10**9),  # type: ignore[arg-type]
                       limiter=SlidingWindowLimiter(10**9, 60))
    bare = bare_app(front)
    apps = {"front": front, "bare": bare}
    results: dict[tuple[str, str], list[float]] = {}
    for name, app in apps.items():
        for path in PATHS:
            per_call(app, path, args.calls // 10)  # warm-up
    for _ in range(args.rounds):
        for path in PATHS:
            for name, app in apps.items():
                results.setdefault((name, path), []).append(per_call(app, path, args.calls))
    import http_front

    lines = [f"### Front work per request, in process ({date.today().isoformat()})", "",
             f"Command: `.venv/bin/python bench/front_inproc.py --calls {args.calls} --rounds {args.rounds}`  ",
             f"Machine: {platform.machine()}, Python {platform.python_version()}; front from"
             f" {Path(http_front.__file__).parent.parent}; medians of {args.rounds} interleaved rounds.", "",
             "| tree | path | front us | bare app us | front minus bare us |", "|---|---|---|---|---|"]
    for path in PATHS:
        f, b = statistics.median(results[("front", path)]), statistics.median(results[("bare", path)])
        lines.append(f"| {args.label} | {path} | {f:.1f} | {b:.1f} | {f - b:.1f} |")
    emit(lines + [""], args.write)


if __name__ == "__main__":
    main()
