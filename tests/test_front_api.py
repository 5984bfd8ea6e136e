"""The Falcon app through its TestClient, against a real broker and a real tiny-model node."""

from __future__ import annotations

import base64
import io
import json

import pytest
from falcon import testing
from PIL import Image

from http_front.app import create_app
from http_front.keys import KeyStore
from tests.conftest import wait_until

SMALL = {"height": 64, "width": 48, "num_inference_steps": 2, "cfg": 3.5}


def generate(stack, **body):
    return stack.http.simulate_post("/generate", json={"prompt": "一只可爱的小猫", **SMALL, **body})


def png_of(body: dict) -> bytes:
    assert body["image"].startswith("data:image/png;base64,")
    data = base64.b64decode(body["image"].split(",", 1)[1])
    assert data == base64.b64decode(body["image_base64"])
    return data


def test_text2img_returns_guide_shape_and_png_of_requested_size(stack) -> None:
    r = generate(stack, seed=7, model_id="flux1-dev", mode="text2img", priority=0)
    assert r.status_code == 200, r.text
    body = r.json
    image = Image.open(io.BytesIO(png_of(body)))
    assert image.format == "PNG" and image.size == (48, 64)
    assert body["success"] is True and body["status"] == "completed"
    meta = body["metadata"]
    assert {k: meta[k] for k in ("prompt", "model_id", "mode", "seed", "cfg", "steps")} == {
        "prompt": "一只可爱的小猫", "model_id": "flux1-dev", "mode": "text2img", "seed": 7, "cfg": 3.5, "steps": 2}
    assert meta["generation_time"] > 0
    assert body["auth_info"] == {"user": "default", "permissions": ["all"]}
    for legacy in ("image_base64", "elapsed_time", "gpu_id", "model_id", "mode", "controlnet_type", "error"):
        assert legacy in body


def test_same_seed_same_bytes_other_seed_differs(stack) -> None:
    a, b, c = (png_of(generate(stack, seed=s).json) for s in (42, 42, 43))
    assert a == b and a != c


def test_async_submit_then_poll_task_to_completed(stack) -> None:
    r = generate(stack, **{"async": True})
    assert r.status_code == 202 and r.json["status"] == "queued"
    task_id = r.json["task_id"]
    body = wait_until(lambda: (lambda j: j if j["status"] == "completed" else None)(
        stack.http.simulate_get(f"/task/{task_id}").json), 30, what="completion")
    assert Image.open(io.BytesIO(png_of(body))).size == (48, 64)
    prefer = stack.http.simulate_post("/generate", json={"prompt": "x", **SMALL}, headers={"Prefer": "respond-async"})
    assert prefer.status_code == 202


@pytest.mark.parametrize("body, status, text", [
    ({"mode": "text2img"}, 422, "prompt"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": "   "}, 422, "prompt"),
    ({"prompt": "x", "width": "big"}, 422, "width"),
    ({"prompt": "x", "height": 8}, 422, "height"),
    ({"prompt": "x", "width": 2064}, 422, "width"),
    ({"prompt": "x", "num_inference_steps": 0}, 422, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 101}, 422, "num_inference_steps"),
    ({"prompt": "x", "cfg": -0.1}, 422, "cfg"),
    ({"prompt": "x", "cfg": 50.5}, 422, "cfg"),
    ({"prompt": "x", "cfg": float("nan")}, 422, "cfg"),
    ({"prompt": "x", "cfg": float("inf")}, 422, "cfg"),
    ({"prompt": "\ud800"}, 422, "prompt"),
    ({"prompt": "x", "model_id": "flux1-dev\udc80"}, 422, "model_id"),
    ({"prompt": "x", "seed": "abc"}, 422, "seed"),
    ({"prompt": "x", "mode": "paint"}, 422, "mode"),
    ({"prompt": "x" * 1001}, 422, "prompt"),
    ({"prompt": "x", "model_id": "sdxl-turbo"}, 400, "flux1-dev"),
    ({"prompt": "x", "model_id": "flux1-openpose-dev", "mode": "controlnet",
      "control_image": base64.b64encode(b"x").decode()}, 400, "control_image"),
])
def test_bad_input_is_a_clear_4xx_and_changes_nothing(stack, body, status, text) -> None:
    before = len(stack.broker.broker.tasks)
    # json.dumps escapes lone surrogates and writes NaN/Infinity, as a hostile client may.
    r = stack.http.simulate_post("/generate", body=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json["success"] is False and r.json["error"] and text in r.json["detail"]
    assert len(stack.broker.broker.tasks) == before


def test_model_without_a_live_node_is_503_at_once(stack) -> None:
    png = base64.b64encode(_png((8, 8))).decode()
    before = len(stack.broker.broker.tasks)
    r = stack.http.simulate_post("/generate", json={"prompt": "x", "model_id": "flux1-openpose-dev",
                                                   "mode": "controlnet", "control_image": png, **SMALL})
    # Refused at SUBMIT (a queued task would have made this request wait for its timeout instead).
    assert r.status_code == 503 and "flux1-openpose-dev" in r.json["detail"]
    assert len(stack.broker.broker.tasks) == before


def test_malformed_or_non_object_json_is_rejected(stack) -> None:
    r = stack.http.simulate_post("/generate", body="{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json["success"] is False
    r = stack.http.simulate_post("/generate", body="[1]", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert stack.http.simulate_get("/health").status_code == 200  # still serving


def test_a_form_body_to_the_json_endpoint_is_415_and_submits_nothing(stack) -> None:
    before = len(stack.broker.broker.tasks)
    r = stack.http.simulate_post("/generate", body="prompt=cat", headers={
        "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and r.json["success"] is False and "/generate/upload" in r.json["detail"]
    assert len(stack.broker.broker.tasks) == before


def test_a_method_the_route_lacks_is_405_for_every_key(stack) -> None:
    readonly = KeyStore.from_env([("readonly-key-0123456789abcdef", "ro", ("readonly",))], None)
    app = testing.TestClient(create_app(stack.client, readonly, stack.config))
    for client, headers in ((stack.http, {}), (app, {"X-API-Key": "readonly-key-0123456789abcdef"}), (app, {})):
        r = client.simulate_post("/health", headers=headers)
        assert r.status_code == 405 and r.json["success"] is False  # not 403 "needs admin"


def test_unknown_task_is_404(stack) -> None:
    r = stack.http.simulate_get("/task/does-not-exist")
    assert r.status_code == 404 and r.json["success"] is False


def test_auth_headers(stack) -> None:
    r = stack.http.simulate_get("/status", headers={"Authorization": ""})
    assert r.status_code == 401 and "缺少API密钥" in r.json["detail"]
    r = stack.http.simulate_get("/status", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json == {"detail": "无效的API密钥"}
    r = stack.http.simulate_get("/status", headers={"Authorization": "", "X-API-Key": "genserve-default-key-2024"})
    assert r.status_code == 200


def test_info_endpoints(stack) -> None:
    assert stack.http.simulate_get("/").json["service"] == "GenServe"
    health = stack.http.simulate_get("/health").json
    assert health["status"] == "healthy" and health["nodes"] == 1
    status = stack.http.simulate_get("/status").json
    assert status["queue"]["length"] == 0 and status["nodes"][0]["node_id"] == "test-node"
    models = {m["model_id"]: m for m in stack.http.simulate_get("/models").json["models"]}
    assert "flux1-openpose-dev" not in models
    assert models["flux1-dev"]["modes"] == ["img2img", "text2img"]
    assert models["flux1-redux-dev"]["modes"] == ["redux"]


def _png(size: tuple[int, int], color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_image_is_spliced_into_valid_json_whatever_the_prompt(stack) -> None:
    tricky = 'say "<image>" and <image:00> \\ 猫 \u2028'
    r = generate(stack, prompt=tricky, seed=3)
    body = json.loads(r.content.decode("utf-8"))  # the raw bytes are valid JSON
    assert body["metadata"]["prompt"] == tricky
    assert body["image"] == "data:image/png;base64," + body["image_base64"]
    assert Image.open(io.BytesIO(png_of(body))).size == (48, 64)
    polled = stack.http.simulate_get(f"/task/{body['task_id']}")
    assert json.loads(polled.content)["image_base64"] == body["image_base64"]


def test_cancel_says_success_and_refuses_finished_tasks(stack) -> None:
    done = generate(stack, **{"async": True})
    task_id = done.json["task_id"]
    wait_until(lambda: stack.http.simulate_get(f"/task/{task_id}").json["status"] == "completed", 30,
               what="completion")
    r = stack.http.simulate_delete(f"/task/{task_id}")
    assert r.status_code == 409 and r.json["success"] is False and "completed" in r.json["detail"]
    assert stack.http.simulate_get(f"/task/{task_id}").json["status"] == "completed"
    slow = generate(stack, **{"async": True, "num_inference_steps": 100, "width": 256, "height": 256})
    r = stack.http.simulate_delete(f"/task/{slow.json['task_id']}")
    assert r.status_code == 200 and r.json["success"] is True and r.json["status"] == "cancelled"
