"""Task bodies as clients see them, from the broker's typed task view (pure unit tests)."""

from __future__ import annotations

import json

import falcon
import msgspec

from genserve import wire as w
from http_front.keys import Principal
from http_front.render import render_task, send_task
from tests.fakes import params, png_bytes

WHO = Principal("abcd1234-wxyz", "dev", ("generation",), "environment", "0" * 32)
META = w.ResultMeta(generation_time=0.5, width=16, height=16, seed=1, steps=2, device="cpu", cfg=3.5)


def view(**fields: object) -> w.TaskView:
    base = dict(task_id="t1", status=w.COMPLETED, model_id="flux1-dev", mode="text2img", priority=0,
                owner="o", params=params(), created_at=10.0, started_at=11.0, finished_at=12.5, meta=META)
    return w.TaskView(**{**base, **fields})


def test_a_completed_task_carries_the_image_twice_and_its_metadata() -> None:
    resp = falcon.Response()
    png = png_bytes()
    send_task(resp, view(), png, WHO)
    body = json.loads(resp.data)
    assert body["image"].startswith("data:image/png;base64,") and body["image_base64"] == body["image"][22:]
    assert body["metadata"]["steps"] == 2 and body["elapsed_time"] == 2.5 and body["queue_time"] == 1.0
    assert body["auth_info"] == {"user": "dev", "permissions": ["generation"]}


def test_the_metadata_says_how_many_images_shared_the_call_only_when_more_than_one() -> None:
    shared = render_task(view(meta=w.ResultMeta(**{**msgspec.structs.asdict(META), "batch": 3})), png_bytes(), WHO)
    assert shared["metadata"]["batch"] == 3
    assert "batch" not in render_task(view(), png_bytes(), WHO)["metadata"]


def test_an_evicted_result_says_so_instead_of_looking_like_a_missing_field() -> None:
    body = render_task(view(result_expired=True), None, WHO)
    assert body["success"] is True and body["result_expired"] is True and "disk budget" in body["detail"]
    assert "image" not in body and body["metadata"]["width"] == 16


def test_failed_and_running_tasks() -> None:
    failed = render_task(view(status=w.FAILED, error_code="timeout", error="task timed out", meta=None), None, WHO)
    assert failed["success"] is False and failed["error_code"] == "timeout" and "metadata" not in failed
    running = render_task(view(status=w.RUNNING, progress=w.Progress(3, 8), meta=None), None, WHO)
    assert running["progress"] == {"step": 3, "total": 8} and "image" not in running
