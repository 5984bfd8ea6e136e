"""Who can reach the broker, and what a node may return: loopback by default, results checked."""

from __future__ import annotations

from typing import Iterator

import pytest
import zmq

from broker.config import BrokerConfig
from broker.server import Broker
from genserve import errors as e
from genserve import wire as w
from genserve.curve import InsecureBind, check_exposure, is_loopback_endpoint
from genserve.spec import TaskSpec
from http_front.broker_client import BrokerClient
from tests.conftest import BrokerThread, wait_until
from tests.fakes import META, FakeNode, params, png_bytes

SPEC = TaskSpec("flux1-dev", "text2img", 0, params())


@pytest.mark.parametrize("endpoint, local", [
    ("tcp://127.0.0.1:5556", True), ("tcp://127.0.0.2:*", True), ("tcp://[::1]:5556", True),
    ("tcp://localhost:5556", True), ("ipc:///tmp/x", True), ("tcp://0.0.0.0:5556", False),
    ("tcp://*:5556", False), ("tcp://10.0.0.5:5556", False), ("tcp://eth0:5556", False),
    ("tcp://broker.example:5556", False)])
def test_loopback_endpoints(endpoint: str, local: bool) -> None:
    assert is_loopback_endpoint(endpoint) is local


def test_a_public_bind_needs_curve_or_insecure() -> None:
    with pytest.raises(InsecureBind, match="0.0.0.0"):
        check_exposure(["tcp://127.0.0.1:1", "tcp://0.0.0.0:2"], curve=False, insecure=False)
    check_exposure(["tcp://0.0.0.0:2"], curve=True, insecure=False)
    check_exposure(["tcp://0.0.0.0:2"], curve=False, insecure=True)


def test_defaults_bind_loopback_only() -> None:
    d = BrokerConfig()
    assert is_loopback_endpoint(d.frontend) and is_loopback_endpoint(d.backend) and not d.insecure


def test_the_broker_refuses_to_bind_a_public_backend_without_curve(tmp_path) -> None:
    ctx = zmq.Context()
    broker = Broker(BrokerConfig(frontend="tcp://127.0.0.1:*", backend="tcp://0.0.0.0:*", data_dir=tmp_path), ctx)
    try:
        with pytest.raises(InsecureBind):
            broker.bind()
        assert not broker.backend.getsockopt_string(zmq.LAST_ENDPOINT)  # nothing was bound
    finally:
        broker.close()
        ctx.term()


@pytest.fixture
def cluster(tmp_path) -> Iterator[tuple[BrokerThread, BrokerClient, FakeNode]]:
    bt = BrokerThread(tmp_path / "b", heartbeat_interval=0.2, liveness=3)
    node = FakeNode(bt.context, bt.backend, "rogue").ready()
    client = BrokerClient(bt.frontend, timeout=2.0, context=bt.context).start()
    yield bt, client, node
    client.close()
    node.sock.close(linger=0)
    bt.close()


@pytest.mark.parametrize("payload", [b"<script>alert(1)</script>", png_bytes(size=(32, 32)), b""])
def test_a_result_that_is_not_the_declared_image_fails_the_task(cluster, payload: bytes) -> None:
    bt, client, node = cluster
    wait_until(lambda: len(bt.broker.nodes) == 1, 5)
    task_id = client.request(w.Submit(0, SPEC, "k")).header.task_id
    assert node.recv_job().header.task_id == task_id
    node.send(w.Result(task_id, META), [payload])
    ack = node.recv()
    assert ack.command == w.RESULT_ACK and ack.header.task_id == task_id
    reply = client.request(w.Fetch(0, task_id))
    assert reply.header.body.task.status == "failed" and reply.header.body.task.error_code == e.GENERATION
    assert "invalid result" in reply.header.body.task.error and reply.blobs == []


def test_a_real_png_of_the_declared_size_completes(cluster) -> None:
    bt, client, node = cluster
    wait_until(lambda: len(bt.broker.nodes) == 1, 5)
    task_id = client.request(w.Submit(0, SPEC, "k")).header.task_id
    assert node.recv_job().header.task_id == task_id
    image = png_bytes(size=(16, 16))
    node.send(w.Result(task_id, META), [image])
    wait_until(lambda: client.request(w.Fetch(0, task_id)).header.body.task.status == "completed", 5)
    assert client.request(w.Fetch(0, task_id)).blobs == [image]
