"""Shared fixtures: tiny models, brokers on random ports, subprocess groups."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import zmq

from broker.config import BrokerConfig
from broker.server import Broker
from http_front.broker_client import BrokerClient
from tests.fakes import FakeNode

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEFAULT_KEY = "genserve-default-key-2024"


_GIVEN: set[int] = set()


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1, and not handed out before by this process.

    The kernel may hand a just-released port out again: two calls in a row once gave the broker
    and the front one port, and the front could not listen.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All six tiny model folders plus sample LoRAs, built once per session."""
    from gpu_node.tiny import build_all

    target = tmp_path_factory.mktemp("tiny-models")
    build_all(target, seed=0)
    return target


class BrokerThread:
    """A real Broker on tcp://127.0.0.1 random ports, run in a thread."""

    def __init__(self, data_dir: Path, **overrides: Any) -> None:
        settings = dict(frontend="tcp://127.0.0.1:*", backend="tcp://127.0.0.1:*", data_dir=data_dir,
                        heartbeat_interval=0.2, liveness=3, recovery_grace=0.6)
        settings.update(overrides)
        self.config = BrokerConfig(**settings)
        self.context = zmq.Context()
        self.broker = Broker(self.config, self.context)
        self.frontend, self.backend = self.broker.bind()
        self.thread = threading.Thread(target=self.broker.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop the loop, close sockets and the context."""
        self.broker.stop()
        self.thread.join(timeout=5)
        self.broker.close()
        self.context.term()


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    """A ZeroMQ context of its own, terminated at teardown."""
    context = zmq.Context()
    yield context
    context.term()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Any]:
    """Start brokers (closed at teardown); same data dir unless told otherwise."""
    started: list[BrokerThread] = []

    def start(**overrides: Any) -> BrokerThread:
        overrides.setdefault("data_dir", tmp_path / "broker")
        bt = BrokerThread(**overrides)
        started.append(bt)
        return bt

    yield start
    for bt in started:
        if bt.thread.is_alive() or not bt.broker.frontend.closed:
            bt.close()


class Processes:
    """Subprocesses of one test, each killed at teardown; logs kept for failure reports."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start `args` (first item is a console script name in this venv)."""
        log = (self.log_dir / f"{name}.log").open("ab")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT,
                                env=full_env, cwd=self.log_dir, start_new_session=True)
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to one process and reap it."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
        proc.wait(timeout=30)

    def log(self, name: str) -> str:
        """What the process printed."""
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        """Kill everything still running."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """A process group killed at teardown."""
    group = Processes(tmp_path)
    yield group
    group.close()


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def stopped_at(caplog: pytest.LogCaptureFixture, task_id: str) -> tuple[int, int] | None:
    """(step a job stopped at, step at which it was told to stop), from the node's own log line."""
    for record in caplog.records:
        found = re.fullmatch(rf"task {task_id} stopped at step (\d+) \(cancel arrived at step (\d+)\)",
                             record.getMessage())
        if found:
            return int(found[1]), int(found[2])
    return None


def wait_healthy(url: str, key: str = DEFAULT_KEY, timeout: float = 60.0, nodes: int = 1) -> None:
    """Poll /health until it reports at least `nodes` nodes."""
    def ok() -> bool:
        try:
            r = requests.get(f"{url}/health", headers={"X-API-Key": key}, timeout=2)
        except requests.RequestException:
            return False
        return r.status_code == 200 and r.json()["nodes"] >= nodes

    wait_until(ok, timeout, 0.1, f"{url}/health with {nodes} node(s)")


class Stack:
    """Broker thread + real tiny-model node thread + BrokerClient + Falcon TestClient."""

    def __init__(self, data_dir: Path, models: Path, serve: tuple[str, ...], keys=None,
                 front_overrides: dict[str, Any] | None = None, node_overrides: dict[str, Any] | None = None,
                 **broker_overrides: Any) -> None:
        from falcon import testing

        from gpu_node.__main__ import build
        from gpu_node.catalog import resolve_model_paths
        from gpu_node.config import NodeConfig
        from http_front.app import create_app
        from http_front.broker_client import BrokerClient
        from http_front.config import FrontConfig
        from http_front.keys import KeyStore

        self.broker = BrokerThread(data_dir, **broker_overrides)
        paths = resolve_model_paths(models, {}, "cpu", serve)
        self.node_config = NodeConfig(broker=self.broker.backend, device="cpu", model_paths=paths,
                                      lora_dir=models / "loras", node_id="test-node", heartbeat_interval=0.2,
                                      max_sequence_length=32, **(node_overrides or {}))
        self.node, self.generator = build(self.node_config)
        self.node_thread = threading.Thread(target=self.node.run, daemon=True)
        self.node_thread.start()
        self.client = BrokerClient(self.broker.frontend, timeout=5.0).start()
        self.keys = keys or KeyStore.from_env([], DEFAULT_KEY)
        self.config = FrontConfig(task_timeout=60, **(front_overrides or {}))
        self.app = create_app(self.client, self.keys, self.config)
        self.http = testing.TestClient(self.app, headers={"Authorization": f"Bearer {DEFAULT_KEY}"})
        wait_until(lambda: len(self.broker.broker.nodes) == 1, 30, what="node registration")

    def close(self) -> None:
        """Stop node, client and broker; close every socket."""
        self.node.stop()
        self.node_thread.join(timeout=30)
        self.client.close()
        self.broker.close()


class Front:
    """create_app on a real waitress server in a thread, sharing a Stack's broker and keys.

    Several fronts of one stack share the URL-signing secret, as a deployment's fronts do.
    """

    def __init__(self, stack: Stack, **overrides: Any) -> None:
        from http_front.app import create_app
        from http_front.broker_client import BrokerClient
        from http_front.config import FrontConfig
        from http_front.server import FrontServer

        self.client = BrokerClient(stack.broker.frontend, timeout=5.0).start()
        settings: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "threads": 4, "max_streams": 8,
                                    "rate_limit": 1_000_000, "url_secret": b"s" * 32, **overrides}
        config = FrontConfig(**settings)
        self.app = create_app(self.client, stack.keys, config)
        self.server = FrontServer(self.app, config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        host, port = self.server.addresses[0]
        self.url = f"http://{host}:{port}"

    def hub(self) -> Any:
        """The EventHub of this front's event streams."""
        return self.app._router.find("/task/x/events")[0].hub

    def close(self) -> None:
        """Stop the server (its pump too) and the broker client."""
        self.server.close()
        self.thread.join(timeout=10)
        self.client.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Stack]:
    """One stack per test module, serving every model but flux1-openpose-dev."""
    serve = ("flux1-dev", "flux1-fill-dev", "flux1-depth-dev", "flux1-canny-dev", "flux1-redux-dev")
    s = Stack(tmp_path_factory.mktemp("stack"), tiny_models, serve)
    yield s
    s.close()


class Cluster:
    """Endpoints and helpers for one running deployment."""

    def __init__(self, procs: Processes, models: Path, data: Path, nodes: int = 1,
                 front_env: dict[str, str] | None = None, key: str = DEFAULT_KEY,
                 node_env: dict[str, str] | None = None, broker_args: list[str] | None = None) -> None:
        self.procs = procs
        # Tests poll fast; rate limiting has its own tests (test_auth.py).
        self.front_env = {"GENSERVE_RATE_LIMIT": "1000000", **(front_env or {})}
        self.node_env = node_env or {}
        self.broker_args = broker_args or []
        self.key = key
        self.models = models
        self.front_port, fport, bport = free_port(), free_port(), free_port()
        self.frontend, self.backend = f"tcp://127.0.0.1:{fport}", f"tcp://127.0.0.1:{bport}"
        self.url = f"http://127.0.0.1:{self.front_port}"
        self.data = data
        self.start_broker()
        for i in range(nodes):
            self.start_node(f"node{i}")
        self.start_front()
        wait_healthy(self.url, key=key, nodes=nodes)

    def start_broker(self) -> None:
        """(Re)start the broker on the same ports and data dir."""
        self.procs.start("broker", ["genserve-broker", "--frontend", self.frontend, "--backend", self.backend,
                                    "--data-dir", str(self.data), "--heartbeat", "0.25", "--liveness", "3",
                                    *self.broker_args])

    def start_node(self, name: str, *extra: str) -> None:
        """Start one CPU node on the tiny models."""
        self.procs.start(name, ["genserve-node", "--broker", self.backend, "--device", "cpu",
                                "--models-dir", str(self.models), "--lora-dir", str(self.models / "loras"),
                                "--node-id", name, "--heartbeat", "0.25", "--preload", "flux1-dev",
                                "--max-sequence-length", "32", *extra], env=self.node_env)

    def start_front(self) -> None:
        """Start the HTTP front."""
        self.procs.start("front", ["genserve-front", "--broker", self.frontend, "--host", "127.0.0.1",
                                   "--port", str(self.front_port)], env=self.front_env)

    def generate(self, **body) -> requests.Response:
        """POST /generate with small defaults."""
        payload = {"prompt": "一只可爱的小猫坐在花园里", "height": 64, "width": 96, "num_inference_steps": 2,
                   "cfg": 3.5, "seed": 42, "mode": "text2img", **body}
        return requests.post(f"{self.url}/generate", json=payload, timeout=120,
                             headers={"Authorization": f"Bearer {self.key}"})


@pytest.fixture
def cluster(processes: Processes, tiny_models: Path, tmp_path: Path) -> Cluster:
    """Broker, one node and a front as subprocesses on random ports (killed at teardown)."""
    return Cluster(processes, tiny_models, tmp_path / "broker")


def _parts(bt: BrokerThread, ctx: zmq.Context) -> Iterator[Any]:
    client = BrokerClient(bt.frontend, timeout=2.0, context=ctx).start()
    nodes: list[FakeNode] = []

    def node(name: str, **kw: Any) -> FakeNode:
        n = FakeNode(ctx, bt.backend, name, **kw)
        nodes.append(n)
        return n

    yield bt, client, node
    for n in nodes:
        n.close()
    client.close()


@pytest.fixture
def parts(broker_factory, ctx):
    """A broker, a client, and a factory of fake nodes closed at teardown."""
    yield from _parts(broker_factory(), ctx)


@pytest.fixture
def patient_parts(broker_factory, ctx):
    """As `parts`, with a broker that expires no node during a test (its fake nodes need not heartbeat)."""
    yield from _parts(broker_factory(liveness=100), ctx)
