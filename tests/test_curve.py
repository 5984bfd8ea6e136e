"""CurveZMQ between machines: only authorised nodes and fronts get in (real processes)."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from genservectl.__main__ import cli
from tests.conftest import BIN, DEFAULT_KEY, Processes, free_port, wait_healthy, wait_until

pytestmark = pytest.mark.e2e


def keypair(directory: Path, name: str) -> tuple[Path, Path]:
    result = CliRunner().invoke(cli, ["curve-keypair", str(directory), name])
    assert result.exit_code == 0, result.output
    return directory / f"{name}.key", directory / f"{name}.key_secret"


def test_unauthorised_node_is_refused_and_authorised_one_on_another_address_works(
        processes: Processes, tiny_models: Path, tmp_path: Path) -> None:
    keys, authorized, outsider = tmp_path / "keys", tmp_path / "authorized", tmp_path / "outsider"
    authorized.mkdir()
    broker_pub, broker_sec = keypair(keys, "broker")
    for name in ("node-ok", "front", "ctl"):
        public, _ = keypair(keys, name)
        (authorized / public.name).write_bytes(public.read_bytes())
    keypair(outsider, "intruder")
    assert oct((keys / "node-ok.key_secret").stat().st_mode & 0o777) == "0o600"

    front_ep = f"tcp://127.0.0.1:{free_port()}"
    backend_ep = f"tcp://127.0.0.2:{free_port()}"  # nodes reach the broker on another address
    processes.start("broker", ["genserve-broker", "--frontend", front_ep, "--backend", backend_ep,
                               "--data-dir", str(tmp_path / "b"), "--curve-secret", str(broker_sec),
                               "--curve-authorized", str(authorized), "--heartbeat", "0.25"])
    node_args = ["genserve-node", "--broker", backend_ep, "--device", "cpu", "--models-dir", str(tiny_models),
                 "--models", "flux1-dev", "--heartbeat", "0.25", "--max-sequence-length", "32",
                 "--curve-server", str(broker_pub)]
    processes.start("intruder", [*node_args, "--node-id", "intruder",
                                 "--curve-secret", str(outsider / "intruder.key_secret")])
    processes.start("good", [*node_args, "--node-id", "good", "--curve-secret", str(keys / "node-ok.key_secret")])
    port = free_port()
    processes.start("front", ["genserve-front", "--broker", front_ep, "--host", "127.0.0.1", "--port", str(port),
                              "--curve-secret", str(keys / "front.key_secret"), "--curve-server", str(broker_pub)])
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    wait_until(lambda: "DENIED" in processes.log("broker"), 30, 0.1, "the broker to log the refusal")

    status = requests.get(f"{url}/status", headers={"X-API-Key": DEFAULT_KEY}, timeout=5).json()
    assert [n["node_id"] for n in status["nodes"]] == ["good"]
    r = requests.post(f"{url}/generate", headers={"X-API-Key": DEFAULT_KEY}, timeout=60,
                      json={"prompt": "x", "width": 32, "height": 32, "num_inference_steps": 1})
    assert r.status_code == 200 and base64.b64decode(r.json()["image_base64"]).startswith(b"\x89PNG")
    assert processes.procs["intruder"].poll() is None  # refused, not crashed: it keeps knocking

    ctl = [str(BIN / "genservectl"), "nodes", "--json", "--broker", front_ep]
    allowed = subprocess.run([*ctl, "--curve-secret", str(keys / "ctl.key_secret"), "--curve-server",
                              str(broker_pub)], capture_output=True, text=True, timeout=30)
    assert allowed.returncode == 0 and '"good"' in allowed.stdout, allowed.stderr
    refused = subprocess.run(ctl, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "did not answer" in refused.stderr
