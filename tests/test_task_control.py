"""Cancel, timeout, progress, privacy and backpressure, against a real broker and tiny-model node."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import pytest

from http_front.keys import KeyStore
from tests.conftest import Stack, stopped_at, wait_until

KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdefgh", "root": "root-key-0123456789abcdefg"}
# Long enough to still be running while a test acts on it: 100 steps at 512x512 took barely 1 s on a
# quiet machine, and a clean-clone run once saw the task finish before its 1 s timeout could stop it.
LONG = {"prompt": "slow", "width": 1024, "height": 1024, "num_inference_steps": 100, "async": True}
QUICK = {"prompt": "quick", "width": 32, "height": 32, "num_inference_steps": 1, "async": True}


def as_(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def make_stack(tmp: Path, models: Path, **broker: object) -> Stack:
    keys = KeyStore.from_env([(KEYS["alice"], "alice", ("generation",)), (KEYS["bob"], "bob", ("generation",)),
                              (KEYS["root"], "root", ("admin",))], None)
    return Stack(tmp, models, ("flux1-dev",), keys=keys, **broker)


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Stack]:
    stack = make_stack(tmp_path_factory.mktemp("ctl"), tiny_models, max_queued=4, max_queued_per_owner=3)
    yield stack
    stack.close()


def submit(stack: Stack, who: str, body: dict) -> str:
    r = stack.http.simulate_post("/generate", json=body, headers=as_(who))
    assert r.status_code == 202, r.text
    return r.json["task_id"]


def status(stack: Stack, task_id: str, who: str = "alice") -> dict:
    return stack.http.simulate_get(f"/task/{task_id}", headers=as_(who)).json


def running_with_progress(stack: Stack, task_id: str) -> dict:
    def check():
        body = status(stack, task_id)
        return body if body["status"] == "running" and body.get("progress", {}).get("step", 0) >= 1 else None
    return wait_until(check, 30, 0.02, "the job to make progress")


def test_cancel_stops_a_running_job_within_one_step_and_the_node_moves_on(ctl, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gpu_node")
    task_id = submit(ctl, "alice", LONG)
    body = running_with_progress(ctl, task_id)
    assert body["progress"]["total"] == 100
    r = ctl.http.simulate_delete(f"/task/{task_id}", headers=as_("alice"))
    assert r.status_code == 200 and r.json["status"] == "cancelled"
    stopped, at_cancel = wait_until(lambda: stopped_at(caplog, task_id), 30, 0.02, "the node to stop")
    assert stopped - at_cancel <= 1 and stopped < 100
    assert status(ctl, task_id)["status"] == "cancelled"
    quick = submit(ctl, "alice", QUICK)
    wait_until(lambda: status(ctl, quick)["status"] == "completed", 30, 0.05, "the next job")


def test_cancelling_a_queued_task_removes_it_from_the_queue(ctl, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gpu_node")
    blocker = submit(ctl, "alice", LONG)
    running_with_progress(ctl, blocker)
    waiting = submit(ctl, "bob", QUICK)
    body = status(ctl, waiting, "bob")
    assert body["status"] == "queued" and body["queue_position"] == 0
    assert ctl.http.simulate_delete(f"/task/{waiting}", headers=as_("bob")).json["status"] == "cancelled"
    assert ctl.broker.broker.queue.position(waiting) is None
    ctl.http.simulate_delete(f"/task/{blocker}", headers=as_("alice"))
    wait_until(lambda: stopped_at(caplog, blocker), 30, 0.02, "the blocker to stop")


def test_tasks_are_private_to_their_key_but_not_to_admins(ctl) -> None:
    task_id = submit(ctl, "alice", QUICK)
    wait_until(lambda: status(ctl, task_id)["status"] == "completed", 30, 0.05, "completion")
    assert ctl.http.simulate_get(f"/task/{task_id}", headers=as_("bob")).status_code == 404
    assert ctl.http.simulate_delete(f"/task/{task_id}", headers=as_("bob")).status_code == 404
    assert ctl.http.simulate_get(f"/task/{task_id}", headers=as_("root")).json["image"].startswith("data:image/png")


def test_queue_caps_answer_429_instead_of_growing(ctl) -> None:
    blocker = submit(ctl, "root", LONG)
    wait_until(lambda: status(ctl, blocker, "root")["status"] == "running", 30, 0.02, "blocker to run")
    queued = [submit(ctl, "alice", QUICK) for _ in range(2)]  # alice now has 2 unfinished tasks
    third = ctl.http.simulate_post("/generate", json=QUICK, headers=as_("alice"))
    assert third.status_code == 202  # per-key cap is 3 unfinished tasks
    fourth = ctl.http.simulate_post("/generate", json=QUICK, headers=as_("alice"))
    assert fourth.status_code == 429 and "this key" in fourth.json["detail"]
    bob = ctl.http.simulate_post("/generate", json=QUICK, headers=as_("bob"))
    assert bob.status_code == 202  # the queue now holds 4 tasks: the global cap
    full = ctl.http.simulate_post("/generate", json=QUICK, headers=as_("bob"))
    assert full.status_code == 429 and "queue is full" in full.json["detail"]
    ctl.http.simulate_delete(f"/task/{blocker}", headers=as_("root"))
    for task_id in queued + [third.json["task_id"], bob.json["task_id"]]:
        wait_until(lambda: status(ctl, task_id, "root")["status"] == "completed", 60, 0.05, "drain")


def test_timeout_fails_the_task_and_stops_the_node_within_one_step(tmp_path: Path, tiny_models: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gpu_node")
    stack = make_stack(tmp_path, tiny_models, task_timeout=1.0)
    try:
        started = stack.http.simulate_post("/generate", json={**LONG, "async": False}, headers=as_("alice"))
        assert started.status_code == 504 and started.json["error_code"] == "timeout"
        task_id = started.json.get("task_id") or next(iter(stack.broker.broker.tasks))
        stopped, at_cancel = wait_until(lambda: stopped_at(caplog, task_id), 30, 0.02, "the node to stop")
        assert stopped - at_cancel <= 1 and stopped < 100
        quick = stack.http.simulate_post("/generate", json={**QUICK, "async": False}, headers=as_("alice"))
        assert quick.status_code == 200
    finally:
        stack.close()
