"""genservectl through click's CliRunner."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import zmq
from click.testing import CliRunner

from genserve import wire as w
from genserve.spec import TaskSpec
from genservectl.__main__ import cli
from http_front.broker_client import BrokerClient
from tests.conftest import free_port, wait_until
from tests.fakes import FakeNode, params


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(folder).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_build_tiny_is_deterministic_per_seed_and_loadable(tmp_path: Path) -> None:
    runner = CliRunner()
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        result = runner.invoke(cli, ["models", "build-tiny", str(tmp_path / name), "--seed", seed,
                                     "--model", "flux1-dev", "--no-loras"])
        assert result.exit_code == 0, result.output
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(tmp_path / "a" / "flux1-dev"))
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel"


def test_status_and_nodes_against_a_broker(broker_factory) -> None:
    bt = broker_factory()
    ctx = zmq.Context()
    node = FakeNode(ctx, bt.backend, "gpu-7", loaded=["flux1-dev"]).ready(prefetch=1)
    client = BrokerClient(bt.frontend, timeout=2.0, context=ctx).start()
    try:
        wait_until(lambda: len(bt.broker.nodes) == 1, 5)
        running, waiting = (client.request(w.Submit(0, TaskSpec("flux1-dev", "text2img", 0, params()), "k"))
                            .header.task_id for _ in range(2))
        assert node.recv_job() is not None and node.recv_job() is not None
        runner = CliRunner()
        table = runner.invoke(cli, ["status", "--broker", bt.frontend])
        assert table.exit_code == 0, table.output
        assert "gpu-7" in table.output and "flux1-dev" in table.output
        assert "NEXT" in table.output and running in table.output and waiting in table.output
        as_json = runner.invoke(cli, ["nodes", "--json", "--broker", bt.frontend])
        nodes = json.loads(as_json.output)
        assert nodes[0]["node_id"] == "gpu-7" and nodes[0]["loaded"] == ["flux1-dev"]
        assert (nodes[0]["task_id"], nodes[0]["next_task_id"]) == (running, waiting)
    finally:
        client.close()
        node.close()
        ctx.term()


def test_status_exits_non_zero_when_the_broker_does_not_answer() -> None:
    result = CliRunner().invoke(cli, ["status", "--broker", f"tcp://127.0.0.1:{free_port()}"])
    assert result.exit_code != 0 and "did not answer" in result.output


def test_drain_and_undrain(broker_factory) -> None:
    bt = broker_factory()
    ctx = zmq.Context()
    node = FakeNode(ctx, bt.backend, "gpu-3").ready()
    try:
        wait_until(lambda: len(bt.broker.nodes) == 1, 5)
        runner = CliRunner()
        drained = runner.invoke(cli, ["drain", "gpu-3", "--broker", bt.frontend])
        assert drained.exit_code == 0 and "gpu-3: draining" in drained.output
        assert bt.broker.nodes.find("gpu-3").draining
        node.heartbeat()
        undrained = runner.invoke(cli, ["undrain", "gpu-3", "--broker", bt.frontend])
        assert undrained.exit_code == 0 and not bt.broker.nodes.find("gpu-3").draining
        missing = runner.invoke(cli, ["drain", "nope", "--broker", bt.frontend])
        assert missing.exit_code != 0 and "no such node" in missing.output
    finally:
        node.close()
        ctx.term()


def test_webhook_secret_prints_the_brokers_generated_secret(broker_factory, tmp_path: Path) -> None:
    from broker.webhooks import parse_secret

    bt = broker_factory(data_dir=tmp_path / "data")
    result = CliRunner().invoke(cli, ["webhook-secret", "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    assert parse_secret(result.output.strip()) == bt.broker.outbox.config.secret
    missing = CliRunner().invoke(cli, ["webhook-secret", "--data-dir", str(tmp_path / "nowhere")])
    assert missing.exit_code != 0 and "cannot read" in missing.output
