"""End to end: broker, node and front as real subprocesses on random ports, tiny real pipelines."""

from __future__ import annotations

import base64
import io
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import requests
from PIL import Image

from tests.conftest import DEFAULT_KEY, Cluster, Processes, wait_until

pytestmark = pytest.mark.e2e
HEADERS = {"Authorization": f"Bearer {DEFAULT_KEY}"}


@pytest.fixture(scope="module")
def shared(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One deployment for the tests here that neither stop a process nor change its keys (killed at the end)."""
    root = tmp_path_factory.mktemp("e2e-shared")
    procs = Processes(root)
    try:
        yield Cluster(procs, tiny_models, root / "broker")
    finally:
        procs.close()


def image_of(response: requests.Response) -> tuple[bytes, Image.Image]:
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["image"].split(",", 1)[1])
    return data, Image.open(io.BytesIO(data))


def test_generate_returns_png_of_requested_size_and_is_deterministic(shared: Cluster) -> None:
    first, image = image_of(shared.generate())
    assert image.format == "PNG" and image.size == (96, 64)
    again, _ = image_of(shared.generate())
    other, _ = image_of(shared.generate(seed=43))
    assert first == again and first != other


def test_polling_reaches_completed(shared: Cluster) -> None:
    r = shared.generate(**{"async": True})
    assert r.status_code == 202
    task_id = r.json()["task_id"]

    def completed():
        body = requests.get(f"{shared.url}/task/{task_id}", headers=HEADERS, timeout=10).json()
        assert body["status"] in ("queued", "running", "completed"), body
        return body if body["status"] == "completed" else None

    body = wait_until(completed, 60, 0.1, "task completion")
    assert Image.open(io.BytesIO(base64.b64decode(body["image"].split(",", 1)[1]))).size == (96, 64)


def test_guide_polling_script_works_as_written(shared: Cluster, tmp_path: Path) -> None:
    """Section 6.2 of the guide, with only the address and key substituted."""
    script = f"""
API_KEY="{DEFAULT_KEY}"
response=$(curl -s -X POST "{shared.url}/generate" \\
  -H "Content-Type: application/json" \\
  -H "Authorization: Bearer $API_KEY" \\
  -d '{{"prompt": "一只可爱的小猫", "mode": "text2img", "height": 64, "width": 64, "num_inference_steps": 2}}')
task_id=$(echo $response | jq -r '.task_id')
while true; do
  result=$(curl -s -X GET "{shared.url}/task/$task_id" -H "Authorization: Bearer $API_KEY")
  status=$(echo $result | jq -r '.status')
  if [ "$status" = "completed" ]; then
    echo "任务完成!"
    echo $result | jq -r '.image_base64' | base64 -d > "output.png"
    break
  elif [ "$status" = "failed" ]; then
    echo "任务失败!"
    exit 1
  fi
  sleep 0.2
done
"""
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "任务完成" in out.stdout, out.stderr
    assert Image.open(tmp_path / "output.png").size == (64, 64)


def test_health_turns_unhealthy_when_the_only_node_dies(cluster: Cluster) -> None:
    cluster.procs.kill("node0", signal.SIGKILL)

    def unhealthy():
        r = requests.get(f"{cluster.url}/health", headers=HEADERS, timeout=5)
        return r.json() if r.status_code == 503 else None

    body = wait_until(unhealthy, 15, 0.1, "/health to report no node")
    assert body["status"] == "unhealthy" and body["nodes"] == 0
    quick = cluster.generate()
    assert quick.status_code == 503 and quick.json()["success"] is False


def test_bad_requests_never_crash_a_process(shared: Cluster) -> None:
    bad = [b"{", b"[]", b'{"prompt": 1}', b'{"prompt": "x", "width": 99999}', b"\xff\xfe",
           b'{"prompt": "x", "mode": "img2img", "input_image": "/etc/passwd"}']
    for body in bad:
        r = requests.post(f"{shared.url}/generate", data=body, timeout=10,
                          headers={**HEADERS, "Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
    for name in ("broker", "node0", "front"):
        assert shared.procs.procs[name].poll() is None, shared.procs.log(name)
    image_of(shared.generate())


def test_front_warns_while_the_default_key_is_in_use(shared: Cluster) -> None:
    log = shared.procs.log("front")
    assert "WARNING" in log and "the default key works" in log and "loopback clients only" in log
    assert "Logging error" not in log and "Traceback" not in log


def test_a_fresh_install_runs_the_key_curls_in_the_guides_order(cluster: Cluster) -> None:
    """No key configured: create a generation,readonly key (guide 1.7), then delete it by key_id (1.8.2),
    all with the default key, which stops only once an admin-capable key exists."""
    url, form = cluster.url, {"name": (None, "新用户"), "permissions": (None, "generation,readonly")}
    first = requests.post(f"{url}/auth/generate-key", headers=HEADERS, files=form, timeout=10)
    assert first.status_code == 201, first.text
    assert requests.get(f"{url}/auth/keys", headers=HEADERS, timeout=10).status_code == 200  # still works
    gone = requests.post(f"{url}/auth/delete-key-by-id", headers=HEADERS, timeout=10,
                         files={"key_id": (None, first.json()["key_id"])})
    assert gone.status_code == 200 and gone.json()["deleted_keys"][0]["name"] == "新用户"
    admin = requests.post(f"{url}/auth/generate-key", headers=HEADERS, timeout=10,
                          files={"name": (None, "ops"), "permissions": (None, "admin")})
    assert admin.status_code == 201
    wait_until(lambda: requests.get(f"{url}/health", headers=HEADERS, timeout=10).status_code == 401, 10, 0.2,
               "the default key to stop once an admin key exists")
    assert "no longer works" in cluster.procs.log("front")
    ok = requests.get(f"{url}/health", headers={"X-API-Key": admin.json()["api_key"]}, timeout=10)
    assert ok.status_code == 200
