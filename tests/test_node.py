"""A real tiny-model node against a broker that disappears; entry-point configuration."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import zmq

from genserve import wire as w
from genserve.spec import TaskSpec
from gpu_node.__main__ import build
from gpu_node.catalog import resolve_model_paths
from gpu_node.config import NodeConfig
from gpu_node.node import Capabilities, Node
from http_front.broker_client import BrokerClient
from tests.conftest import stopped_at, wait_until
from tests.fakes import META, FakeNode, params

LONG = params(prompt="slow", width=1024, height=1024, num_inference_steps=100)


def running_node(backend: str, tiny_models: Path, node_id: str, liveness: int,
                 **config: Any) -> tuple[Node, threading.Thread]:
    """A real tiny-model node on `backend`, serving in a thread (stop it and join the thread)."""
    config = NodeConfig(broker=backend, device="cpu", node_id=node_id, heartbeat_interval=0.2, liveness=liveness,
                        model_paths=resolve_model_paths(tiny_models, {}, "cpu", ("flux1-dev",)),
                        max_sequence_length=32, **config)
    node, _ = build(config)
    thread = threading.Thread(target=node.run, daemon=True)
    thread.start()
    return node, thread


def test_a_node_that_loses_the_broker_abandons_its_job_within_a_step(
        broker_factory, tiny_models: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gpu_node")
    bt = broker_factory()
    node, thread = running_node(bt.backend, tiny_models, "fenced", liveness=3)
    client = BrokerClient(bt.frontend, context=bt.context).start()
    try:
        wait_until(lambda: len(bt.broker.nodes) == 1, 30)
        task_id = client.request(w.Submit(0, TaskSpec("flux1-dev", "text2img", 0, LONG), "k")).header.task_id
        wait_until(lambda: bt.broker.tasks[task_id].step >= 1, 30, 0.01, "the job to run")
        client.close()
        bt.close()  # the broker is gone; the node cannot know whether it will come back
        stopped, told = wait_until(lambda: stopped_at(caplog, task_id), 30, 0.02, "the node to stop the job")
        assert f"abandoning task {task_id}" in caplog.text
        assert stopped - told <= 1 and stopped < 100  # within one step of giving up, long before the end
        wait_until(lambda: node.current is None, 10, 0.02, "the node to become idle")
    finally:
        node.stop()
        thread.join(timeout=30)


def test_a_job_finished_while_the_broker_was_down_is_reported_to_the_next_one_not_run_again(
        broker_factory, ctx, tiny_models: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gpu_node")
    bt = broker_factory()
    # The node must not give up on the broker before it finishes the job: liveness far beyond it.
    node, thread = running_node(bt.backend, tiny_models, "steady", liveness=1000)
    client = BrokerClient(bt.frontend, context=bt.context).start()
    idle = None
    try:
        wait_until(lambda: len(bt.broker.nodes) == 1, 30)
        medium = params(prompt="medium", width=768, height=768, num_inference_steps=40)
        task_id = client.request(w.Submit(0, TaskSpec("flux1-dev", "text2img", 0, medium), "k")).header.task_id
        wait_until(lambda: bt.broker.tasks[task_id].step >= 1, 30, 0.01, "the job to run")
        client.close()
        bt.close()  # the broker dies while the node computes
        assert bt.broker.tasks[task_id].state == w.RUNNING, "the job ended before the broker did"
        done = f"task {task_id} done"
        wait_until(lambda: done in caplog.text, 60, 0.05, "the node to finish the job alone")
        bt2 = broker_factory(frontend=bt.frontend, backend=bt.backend, recovery_grace=30.0)
        idle = FakeNode(ctx, bt2.backend, "idle").ready()  # free at once: it must not get the task

        def completed() -> bool:
            idle.heartbeat()
            assert idle.recv_job(timeout=0.05) is None, "the finished task was given to another node"
            return bt2.broker.tasks[task_id].state == w.COMPLETED

        wait_until(completed, 30, 0.0, "the node's kept result to be adopted")
        assert caplog.text.count(done) == 1 and bt2.broker.tasks[task_id].attempts == 1
        # The image itself came across (written by the broker thread just after the state changed).
        wait_until(lambda: bt2.broker.journal.result(task_id), 5, 0.02, "the adopted image in the journal")
    finally:
        if idle is not None:
            idle.close()
        node.stop()
        thread.join(timeout=30)


def test_ready_claims_a_running_job_and_lists_kept_reports_and_an_abandoned_job(ctx) -> None:
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    caps = Capabilities(models={"flux1-dev": ["text2img"]}, memory_total=1, memory_free=1, loaded=[])
    node = Node(NodeConfig(broker=f"tcp://127.0.0.1:{port}", device="cpu", node_id="unit"),
                runner=lambda *_: lambda: (b"", None), capabilities=lambda _full: caps, context=ctx)

    def ready() -> w.Ready:
        node._register()
        while router.poll(5000):
            msg = w.split_routed(router.recv_multipart())[1]
            if msg.command == w.READY:
                return msg.header
        raise AssertionError("no READY")

    try:
        node._connect()  # registers once: nothing running, nothing kept
        first = w.split_routed(router.recv_multipart())[1].header if router.poll(5000) else None
        assert first is not None and (first.busy_task, first.busy, first.reports) == (None, False, [])
        node._unacked["done-1"] = w.encode(w.Result("done-1", META), [b"png"])
        assert node.slot.offer("running-2", None) and node.slot.take(0) is not None
        h = ready()
        assert (h.busy_task, h.busy, h.reports) == ("running-2", True, ["done-1"])  # keeps it
        node._abandoned.add("running-2")
        h = ready()
        assert (h.busy_task, h.busy, h.reports) == (None, True, ["done-1", "running-2"])  # its report follows
    finally:
        if node.dealer is not None:
            node.dealer.close(linger=0)
        node._reports.close(linger=0)
        router.close(linger=0)


def test_an_acknowledgement_of_an_earlier_assignment_keeps_the_later_report(ctx) -> None:
    caps = Capabilities(models={"flux1-dev": ["text2img"]}, memory_total=1, memory_free=1, loaded=[])
    node = Node(NodeConfig(broker="tcp://127.0.0.1:1", device="cpu", node_id="unit"),
                runner=lambda *_: lambda: (b"", None), capabilities=lambda _full: caps, context=ctx)
    try:
        node._unacked["t"] = w.encode(w.Result("t", META, run="run-2"), [b"png"])
        node._acknowledged(w.ResultAck("t", "run-1"))  # the ack of a stale report about run-1
        assert "t" in node._unacked
        node._acknowledged(w.ResultAck("t", "run-2"))
        assert "t" not in node._unacked
        node._unacked["t"] = w.encode(w.Result("t", META, run="run-3"), [b"png"])
        node._acknowledged(w.ResultAck("t"))  # an older broker names no run
        assert "t" not in node._unacked
    finally:
        node._reports.close(linger=0)
