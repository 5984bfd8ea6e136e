"""A real tiny-model node against a broker that disappears; entry-point configuration."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from genserve import wire as w
from genserve.spec import TaskSpec
from gpu_node.__main__ import build
from gpu_node.catalog import resolve_model_paths
from gpu_node.config import NodeConfig
from http_front.broker_client import BrokerClient
from tests.conftest import stopped_at, wait_until
from tests.fakes import params

LONG = params(prompt="slow", width=1024, height=1024, num_inference_steps=100)


def test_a_node_that_loses_the_broker_abandons_its_job_within_a_step(
        broker_factory, tiny_models: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gpu_node.node")
    bt = broker_factory()
    config = NodeConfig(broker=bt.backend, device="cpu", node_id="fenced", heartbeat_interval=0.2, liveness=3,
                        model_paths=resolve_model_paths(tiny_models, {}, "cpu", ("flux1-dev",)),
                        max_sequence_length=32)
    node, _ = build(config)
    thread = threading.Thread(target=node.run, daemon=True)
    thread.start()
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
