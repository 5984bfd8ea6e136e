"""Front capacity: many slow connections, capped synchronous waits, hung-up clients, JSON 413/431.

Caps and hang-ups are checked in-process (Falcon TestClient, and the real waitress server
in a thread) against a broker stand-in whose tasks end only when the test says so; what
depends on waitress in a real deployment is checked with real processes (marked e2e).
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from falcon import testing

from genserve import errors as e
from genserve import wire as w
from http_front.__main__ import parse_config
from http_front.app import create_app
from http_front.config import FrontConfig
from http_front.keys import KeyStore
from http_front.server import FrontServer, raise_fd_limit
from http_front.waits import SyncWaits
from tests.conftest import DEFAULT_KEY, Cluster, Processes, wait_until
from tests.fakes import params

KEY_A = "alpha-key-0123456789abcdefghij"
KEY_B = "beta-key-0123456789abcdefghijk"
BODY = {"prompt": "cat", "width": 64, "height": 64, "num_inference_steps": 2}
e2e = pytest.mark.e2e


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class SlowBroker:
    """Stands in for BrokerClient: accepts every SUBMIT; a task ends only via finish() or CANCEL_TASK."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.cancelled: list[str] = []
        self.futures: dict[str, Future] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.event_listeners: list[Any] = []  # the BrokerClient attribute event streams register on

    def _task(self, task_id: str, status: str) -> w.TaskView:
        return w.TaskView(task_id=task_id, status=status, model_id="flux1-dev", mode="text2img", priority=0,
                          owner="", params=params(), created_at=0.0, error_code=e.CANCELLED, error=status)

    def request(self, header: Any, blobs: Any = (), timeout: float | None = None) -> w.Message:
        with self._lock:
            if isinstance(header, w.Submit):
                task_id = f"task-{next(self._ids)}"
                self.submitted.append(task_id)
                return w.Message(w.ACK, w.Ack(0, 0.0, task_id, 0))
            if isinstance(header, w.CancelTask):
                self.cancelled.append(header.task_id)
                return w.Message(w.REPLY, w.Reply(0, 0.0, w.TaskBody(self._task(header.task_id, w.CANCELLED))))
            if isinstance(header, w.InfoRequest):
                node = w.NodeView("n1", "cpu", "h", 1, "idle", False, None, {}, [], [], 1, 1, 0.0, 0)
                return w.Message(w.REPLY, w.Reply(0, 0.0, w.InfoBody([node], {}, w.QueueView(0, {}), {}, 0.0)))
            return w.Message(w.REPLY, w.Reply(0, 0.0, w.TaskBody(self._task(header.task_id, w.RUNNING))))

    def watch(self, task_id: str) -> Future:
        future: Future = Future()
        with self._lock:
            self.futures[task_id] = future
        return future

    def unwatch(self, task_id: str, future: Future) -> None:
        pass

    def finish_all(self) -> None:
        """End every watched task (as cancelled: the waiting request answers 409)."""
        with self._lock:
            futures = list(self.futures.items())
        for task_id, future in futures:
            if not future.done():
                future.set_result(w.Message(w.DONE, w.Done(self._task(task_id, w.CANCELLED))))


def keys() -> KeyStore:
    return KeyStore.from_env([(KEY_A, "alpha", ("all",)), (KEY_B, "beta", ("generation",))], None)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(8) as executor:
        yield executor


@pytest.fixture
def broker(pool: ThreadPoolExecutor) -> Iterator[SlowBroker]:
    """A SlowBroker whose tasks all end at teardown, before the pool waits for its threads."""
    slow = SlowBroker()
    yield slow
    slow.finish_all()


def in_process(broker: SlowBroker, **overrides: Any) -> testing.TestClient:
    config = FrontConfig(rate_limit=1_000_000, **overrides)
    return testing.TestClient(create_app(broker, keys(), config))  # type: ignore[arg-type]


# ---- configuration -------------------------------------------------------------


def test_front_capacity_flags_env_and_defaults() -> None:
    c = parse_config([], {})
    assert (c.threads, c.max_sync_waits, c.max_sync_waits_per_key) == (48, 32, 16)
    assert (c.connection_limit, c.channel_timeout, c.header_timeout, c.backlog) == (4000, 30, 20, 2048)
    env = {"GENSERVE_THREADS": "10", "GENSERVE_MAX_SYNC_WAITS": "6", "GENSERVE_MAX_SYNC_WAITS_PER_KEY": "2",
           "GENSERVE_CONNECTION_LIMIT": "900", "GENSERVE_HEADER_TIMEOUT": "7", "GENSERVE_MAX_STREAMS": "300"}
    c = parse_config(["--max-sync-waits", "8", "--max-header-bytes", "4096", "--max-streams-per-key", "5"], env)
    assert (c.threads, c.max_sync_waits, c.max_sync_waits_per_key) == (10, 8, 2)
    assert (c.connection_limit, c.header_timeout, c.max_header_bytes) == (900, 7, 4096)
    assert (c.max_streams, c.max_streams_per_key) == (300, 5)
    assert parse_config([], {}).max_streams == 1000
    with pytest.raises(SystemExit):
        parse_config(["--threads", "8", "--max-sync-waits", "8"], {})
    with pytest.raises(SystemExit):
        parse_config(["--max-streams", "-1"], {})


def test_fd_limit_fits_the_connection_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert raise_fd_limit(100) == 100
    if hard != resource.RLIM_INFINITY:
        assert raise_fd_limit(hard * 2) < hard  # cannot fit: lowered, with a warning
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard  # raised as far as allowed
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_sync_waits_count_globally_and_per_key() -> None:
    waits = SyncWaits(limit=3, per_key=2)
    with waits.slot("a"), waits.slot("a"):
        with pytest.raises(Exception) as refused:
            with waits.slot("a"):
                pass
        assert refused.value.status_code == 429 and "this API key" in refused.value.description
        with waits.slot("b"):
            assert waits.in_use == 3
            with pytest.raises(Exception) as refused:
                with waits.slot("c"):
                    pass
            assert "3 synchronous requests" in refused.value.description
    assert waits.in_use == 0


# ---- caps and hang-ups, in-process -----------------------------------------------


def test_global_cap_answers_429_json_with_retry_after(pool: ThreadPoolExecutor, broker: SlowBroker) -> None:
    client = in_process(broker, threads=6, max_sync_waits=2, max_sync_waits_per_key=2)
    held = [pool.submit(client.simulate_post, "/generate", json=BODY, headers=auth(KEY_A)) for _ in range(2)]
    wait_until(lambda: len(broker.submitted) == 2, 10, what="two sync waits")
    r = client.simulate_post("/generate", json=BODY, headers=auth(KEY_B))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert r.json["success"] is False and r.json["error"] and "limit 2" in r.json["detail"]
    assert len(broker.submitted) == 2  # refused before SUBMIT: no task to clean up
    r = client.simulate_post("/generate", json={**BODY, "async": True}, headers=auth(KEY_B))
    assert r.status_code == 202  # async submissions are not capped
    broker.finish_all()
    assert [f.result(10).status_code for f in held] == [409, 409]
    follow = pool.submit(client.simulate_post, "/generate", json=BODY, headers=auth(KEY_B))
    wait_until(lambda: len(broker.submitted) == 4, 10, what="a sync wait after the others ended")
    broker.finish_all()
    assert follow.result(10).status_code == 409


def test_per_key_cap_leaves_room_for_other_keys(pool: ThreadPoolExecutor, broker: SlowBroker) -> None:
    client = in_process(broker, threads=8, max_sync_waits=4, max_sync_waits_per_key=1)
    held = [pool.submit(client.simulate_post, "/generate", json=BODY, headers=auth(KEY_A))]
    wait_until(lambda: len(broker.submitted) == 1, 10, what="one sync wait")
    r = client.simulate_post("/generate", json=BODY, headers=auth(KEY_A))
    assert r.status_code == 429 and "Retry-After" in r.headers and "this API key" in r.json["detail"]
    held.append(pool.submit(client.simulate_post, "/generate", json=BODY, headers=auth(KEY_B)))
    wait_until(lambda: len(broker.submitted) == 2, 10, what="the other key's sync wait")
    broker.finish_all()
    assert [f.result(10).status_code for f in held] == [409, 409]


@pytest.mark.parametrize("idempotent", [False, True])
def test_hung_up_sync_client_frees_its_slot_and_cancels_its_task(pool: ThreadPoolExecutor, broker: SlowBroker,
                                                                 idempotent: bool) -> None:
    client = in_process(broker, threads=4, max_sync_waits=1, max_sync_waits_per_key=1)
    gone = threading.Event()
    headers = {**auth(KEY_A), **({"Idempotency-Key": "retry-me-1"} if idempotent else {})}
    waiting = pool.submit(client.simulate_post, "/generate", json=BODY, headers=headers,
                          extras={"waitress.client_disconnected": gone.is_set})
    wait_until(lambda: broker.submitted, 10, what="the sync wait")
    gone.set()
    assert waiting.result(10).status_code == 499
    # Cancelled so the GPU is not wasted, unless a retry with the same Idempotency-Key may claim it.
    assert broker.cancelled == ([] if idempotent else broker.submitted)
    follow = pool.submit(client.simulate_post, "/generate", json=BODY, headers=auth(KEY_A))  # slot is free
    wait_until(lambda: len(broker.submitted) == 2, 10, what="a second sync wait")
    broker.finish_all()
    assert follow.result(10).status_code == 409


# ---- the real waitress server, in a thread ----------------------------------------


@pytest.fixture
def served() -> Iterator[tuple[str, SlowBroker]]:
    broker = SlowBroker()
    config = FrontConfig(host="127.0.0.1", port=0, threads=6, max_sync_waits=2, header_timeout=1,
                         max_header_bytes=8192, max_body_bytes=1024 * 1024, rate_limit=1_000_000)
    server = FrontServer(create_app(broker, keys(), config), config)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    host, port = server.addresses[0]
    yield f"http://{host}:{port}", broker
    broker.finish_all()
    server.close()
    thread.join(timeout=10)
    assert not thread.is_alive()


def raw(url: str, head: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes; (status, headers, body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def test_oversized_headers_get_json_431_from_the_app_and_from_waitress(served: tuple[str, SlowBroker]) -> None:
    url, _ = served
    for pad in (10_000, 20_000):  # app limit 8 KB < 10 KB < waitress's 16 KB < 20 KB
        r = requests.get(f"{url}/health", headers={**auth(KEY_A), "X-Pad": "x" * pad}, timeout=10)
        assert r.status_code == 431 and r.headers["Content-Type"].startswith("application/json")
        assert r.json()["success"] is False and r.json()["error"] == "request header fields too large"


def test_the_header_limit_counts_name_and_value_bytes_exactly_behind_waitress(served: tuple[str, SlowBroker]) -> None:
    url, _ = served
    fields = {"Host": "x", "Authorization": f"Bearer {KEY_A}", "Connection": "close"}
    # What the limit counts: "Name: value\r\n" per field (the request line and the blank line are not counted).
    counted = sum(len(name) + len(value) + 4 for name, value in fields.items()) + len("X-Pad") + 4
    for pad, status in ((8192 - counted, None), (8192 - counted + 1, 431)):
        head = "".join(f"{name}: {value}\r\n" for name, value in {**fields, "X-Pad": "p" * pad}.items())
        got, _, _ = raw(url, f"GET /health HTTP/1.1\r\n{head}\r\n".encode())
        assert (got == 431) == (status == 431), (pad, got)


def test_oversized_body_gets_json_413_from_waitress(served: tuple[str, SlowBroker]) -> None:
    url, _ = served
    status, headers, body = raw(url, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: 50000000\r\n\r\n")
    assert status == 413 and headers["content-type"].startswith("application/json")
    assert json.loads(body) == {"success": False, "error": "request too large",
                                "detail": json.loads(body)["detail"]}


def test_headers_trickled_past_the_deadline_are_cut_off(served: tuple[str, SlowBroker]) -> None:
    url, _ = served
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        deadline = time.monotonic() + 20
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                s.sendall(b"X-Slow: 1\r\n")  # never idle, never complete
                s.settimeout(0.2)
                closed = s.recv(1024) == b""
            except socket.timeout:
                continue
            except OSError:
                closed = True
        assert closed
    assert requests.get(f"{url}/health", headers=auth(KEY_A), timeout=10).status_code == 200


def test_waitress_reports_a_hung_up_sync_client(served: tuple[str, SlowBroker]) -> None:
    url, broker = served
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(BODY).encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY_A}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: broker.submitted, 10, what="the sync wait")
    wait_until(lambda: broker.cancelled == broker.submitted, 10, what="the hung-up client's task cancelled")


# ---- real processes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Cluster]:
    """Broker, one node and a front allowing one synchronous wait (other settings: defaults).

    The header deadline is raised so that a slow machine cannot close the slow connections
    mid-test; the deadline itself is tested above.
    """
    group = Processes(tmp_path_factory.mktemp("capacity"))
    try:
        yield Cluster(group, tiny_models, group.log_dir / "broker",
                      front_env={"GENSERVE_MAX_SYNC_WAITS": "1", "GENSERVE_HEADER_TIMEOUT": "300"})
    finally:
        group.close()


@e2e
def test_health_answers_with_500_slow_connections_open(capped: Cluster) -> None:
    host, port = "127.0.0.1", capped.front_port
    slow: list[socket.socket] = []
    try:
        for _ in range(500):  # slowloris: connect, send part of a request, never finish it
            s = socket.create_connection((host, port), timeout=10)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        for s in slow:
            s.sendall(b"X-Slow: 1\r\n")
        for _ in range(5):
            r = requests.get(f"{capped.url}/health", headers=auth(DEFAULT_KEY), timeout=10)
            assert r.status_code == 200 and r.json()["status"] == "healthy"
    finally:
        for s in slow:
            s.close()


@e2e
def test_hung_up_sync_client_task_is_cancelled_and_its_slot_freed(capped: Cluster) -> None:
    body = json.dumps({"prompt": "slow", "width": 1024, "height": 1024, "num_inference_steps": 100}).encode()
    status = requests.get(f"{capped.url}/status", headers=auth(DEFAULT_KEY), timeout=10).json()
    assert all(n["task_id"] is None for n in status["nodes"])

    def running() -> str | None:
        nodes = requests.get(f"{capped.url}/status", headers=auth(DEFAULT_KEY), timeout=10).json()["nodes"]
        return next((n["task_id"] for n in nodes if n["task_id"]), None)

    with socket.create_connection(("127.0.0.1", capped.front_port), timeout=10) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {DEFAULT_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        task_id = wait_until(running, 30, 0.1, "the slow task to run")
        r = capped.generate()  # the one synchronous wait is taken
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0 and r.json()["success"] is False
    # The client hung up: the front stops waiting and cancels the task.
    wait_until(lambda: requests.get(f"{capped.url}/task/{task_id}", headers=auth(DEFAULT_KEY), timeout=10)
               .json()["status"] == "cancelled", 30, 0.2, "the task to be cancelled")
    r = capped.generate()
    assert r.status_code == 200, r.text  # the slot was given back
    assert requests.get(f"{capped.url}/health", headers=auth(DEFAULT_KEY), timeout=10).status_code == 200
