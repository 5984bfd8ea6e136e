"""A real tiny-model node against a broker that disappears; entry-point configuration."""

from __future__ import annotations

import threading
from pathlib import Path

from broker import protocol as p
from gpu_node.__main__ import build
from gpu_node.catalog import resolve_model_paths
from gpu_node.config import NodeConfig
from http_front.broker_client import BrokerClient
from tests.conftest import wait_until

LONG = {"prompt": "slow", "width": 1024, "height": 1024, "num_inference_steps": 100, "seed": 1, "cfg": 3.5}


def test_a_node_that_loses_the_broker_abandons_its_job_within_a_step(broker_factory, tiny_models: Path) -> None:
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
        task_id = client.request(p.SUBMIT, {"task": {"model_id": "flux1-dev", "mode": "text2img",
                                                     "params": LONG}}).header["task_id"]
        wait_until(lambda: node.current == task_id and node.step >= 1, 30, 0.01, "the job to run")
        client.close()
        bt.close()  # the broker is gone; the node cannot know whether it will come back
        at, stopped = wait_until(lambda: node.stopped.get(task_id), 30, 0.02, "the node to stop the job")
        assert task_id in node._abandoned and stopped - at <= 1 and stopped < 100
        wait_until(lambda: node.current is None, 10, 0.02, "the node to become idle")
    finally:
        node.stop()
        thread.join(timeout=30)
