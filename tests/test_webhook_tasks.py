"""Task webhooks end to end in one process: the front validates them, the broker journals and
delivers them (real broker thread, real tiny-model node, a real local receiver)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from broker.hooks import SECRET_FILE, load_secret
from tests.conftest import Stack, wait_until
from tests.receiver import Receiver

QUICK = {"prompt": "a hook", "width": 64, "height": 64, "num_inference_steps": 2, "async": True}
FAST_RETRIES = {"webhook_allow_private": True, "webhook_first_delay": 0.05, "webhook_max_delay": 0.2,
                "webhook_max_age": 30.0, "webhook_timeout": 1.0}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("hooks"), tiny_models, ("flux1-dev",),
              front_overrides={"rate_limit": 1_000_000}, **FAST_RETRIES)
    yield s
    s.close()


def submit(stack: Stack, **fields: Any) -> str:
    r = stack.http.simulate_post("/generate", json={**QUICK, **fields})
    assert r.status_code == 202, r.text
    return r.json["task_id"]


def verified(stack: Stack, request: dict[str, Any]) -> dict[str, Any]:
    """The delivery's JSON body, after checking its Standard Webhooks signature by hand."""
    secret = load_secret(None, stack.broker.config.data_dir)
    headers, body = request["headers"], request["body"]
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    return json.loads(body)


def bodies(stack: Stack, receiver: Receiver, count: int) -> list[dict[str, Any]]:
    wait_until(lambda: len(receiver.requests) >= count, 20, 0.05, f"{count} deliveries")
    return [verified(stack, r) for r in receiver.requests]


def test_start_and_completed_are_delivered_signed(hooks: Stack, receiver: Receiver) -> None:
    task_id = submit(hooks, webhook=receiver.url())
    start, done = bodies(hooks, receiver, 2)
    assert (start["type"], done["type"]) == ("task.started", "task.completed")
    assert start["data"]["task_id"] == done["data"]["task_id"] == task_id
    assert done["data"]["status"] == "completed" and done["data"]["image_path"] == f"/task/{task_id}/image"
    assert done["data"]["metadata"]["width"] == 64 and "image" not in done["data"]
    ids = [r["headers"]["webhook-id"] for r in receiver.requests]
    assert ids == [f"msg_{task_id}_start", f"msg_{task_id}_completed"]
    time.sleep(0.3)
    assert len(receiver.requests) == 2  # each event once


def test_the_filter_chooses_events_and_cancellations_are_delivered(hooks: Stack, receiver: Receiver) -> None:
    blocker = submit(hooks, num_inference_steps=100, width=512, height=512)
    task_id = submit(hooks, webhook=receiver.url(), webhook_events_filter=["cancelled", "completed"])
    assert hooks.http.simulate_delete(f"/task/{task_id}").json["status"] == "cancelled"
    hooks.http.simulate_delete(f"/task/{blocker}")
    (body,) = bodies(hooks, receiver, 1)
    assert body["type"] == "task.cancelled" and body["data"]["error_code"] == "cancelled"
    done = submit(hooks, webhook=receiver.url("/only-done"), webhook_events_filter=["completed"])
    wait_until(lambda: receiver.count("/only-done") == 1, 20, 0.05, "the completed delivery")
    time.sleep(0.3)
    assert receiver.paths() == ["/hook", "/only-done"]  # no start event was asked for
    assert verified(hooks, receiver.requests[1])["data"]["task_id"] == done


def test_a_failing_receiver_is_retried_and_never_slows_dispatch(hooks: Stack, receiver: Receiver) -> None:
    receiver.script = ["500", "hang"]  # the first attempt fails, the second hangs past the timeout
    task_id = submit(hooks, webhook=receiver.url(), webhook_events_filter=["completed"])
    wait_until(lambda: receiver.hanging, 20, 0.02, "the hanging attempt")
    others = [submit(hooks) for _ in range(3)]  # dispatch goes on while the receiver hangs
    wait_until(lambda: all(hooks.http.simulate_get(f"/task/{t}").json["status"] == "completed" for t in others),
               30, 0.05, "the other tasks")
    wait_until(lambda: receiver.count() >= 3, 20, 0.05, "the third attempt")
    status = hooks.broker.broker.outbox.status(f"msg_{task_id}_completed")
    wait_until(lambda: hooks.broker.broker.outbox.status(f"msg_{task_id}_completed")["state"] == "delivered",
               20, 0.05, "the delivery")
    assert status["attempts"] >= 2
    ids = {r["headers"]["webhook-id"] for r in receiver.requests}
    stamps = [r["headers"]["webhook-timestamp"] for r in receiver.requests]
    assert ids == {f"msg_{task_id}_completed"} and len(stamps) == 3


@pytest.mark.parametrize("fields, where", [
    ({"webhook": "ftp://example.com/hook"}, "webhook"),
    ({"webhook": "http://user:pw@example.com/"}, "webhook"),
    ({"webhook": "http:///no-host"}, "webhook"),
    ({"webhook": "http://exa mple.com/"}, "webhook"),
    ({"webhook": "https://例子.测试/hook"}, "webhook"),
    ({"webhook": "https://example.com/" + "a" * 3000}, "webhook"),
    ({"webhook": 42}, "webhook"),
    ({"webhook_events_filter": ["completed"]}, "webhook_events_filter"),
    ({"webhook": "https://example.com/h", "webhook_events_filter": ["done"]}, "webhook_events_filter.0"),
    ({"webhook": "https://example.com/h", "webhook_events_filter": []}, "webhook_events_filter"),
])
def test_bad_webhooks_are_422_and_queue_nothing(hooks: Stack, fields: dict[str, Any], where: str) -> None:
    before = len(hooks.broker.broker.tasks)
    r = hooks.http.simulate_post("/generate", json={**QUICK, **fields})
    assert r.status_code == 422 and r.json["field"] == where, r.text
    assert len(hooks.broker.broker.tasks) == before


def test_loopback_receivers_are_refused_by_default(tmp_path: Path, tiny_models: Path, receiver: Receiver) -> None:
    stack = Stack(tmp_path, tiny_models, ("flux1-dev",))  # webhook_allow_private is off
    try:
        task_id = submit(stack, webhook=receiver.url(), webhook_events_filter=["completed"])
        outbox = stack.broker.broker.outbox
        wait_until(lambda: (outbox.status(f"msg_{task_id}_completed") or {}).get("state") == "refused",
                   20, 0.05, "the refusal")
        assert "127.0.0.1" in outbox.status(f"msg_{task_id}_completed")["last_error"]
        assert receiver.requests == []
        assert stack.http.simulate_get(f"/task/{task_id}").json["status"] == "completed"
    finally:
        stack.close()


def test_deliveries_survive_a_broker_restart_and_lost_rows_are_rebuilt(tmp_path: Path, tiny_models: Path) -> None:
    from tests.conftest import BrokerThread

    data = tmp_path / "broker"
    down = Receiver()
    url = down.url()
    down.close()  # nobody listens: deliveries stay pending
    stack = Stack(data, tiny_models, ("flux1-dev",), **FAST_RETRIES)
    try:
        first = submit(stack, webhook=url, webhook_events_filter=["completed"])
        second = submit(stack, webhook=url, webhook_events_filter=["completed"])
        outbox = stack.broker.broker.outbox
        wait_until(lambda: all((outbox.status(f"msg_{t}_completed") or {}).get("attempts", 0) >= 1
                               for t in (first, second)), 20, 0.05, "failed attempts")
    finally:
        stack.close()
    # A crash between a task's end and its delivery row: the row is gone, the journal says it ended.
    import sqlite3

    with sqlite3.connect(data / "webhooks.sqlite3") as db:
        db.execute("DELETE FROM deliveries WHERE msg_id = ?", (f"msg_{second}_completed",))
    up = Receiver(port=int(url.rsplit(":", 1)[1].split("/")[0]))
    restarted = BrokerThread(data, **FAST_RETRIES)
    try:
        wait_until(lambda: up.count() >= 2, 20, 0.05, "both deliveries after the restart")
        time.sleep(0.3)
        got = sorted(r["headers"]["webhook-id"] for r in up.requests)
        assert got == sorted([f"msg_{first}_completed", f"msg_{second}_completed"])  # once each
    finally:
        restarted.close()
        up.close()
    assert (data / SECRET_FILE).stat().st_mode & 0o077 == 0  # the generated secret is private


def test_a_malformed_secret_stops_the_broker_with_a_clear_message(tmp_path: Path) -> None:
    from broker.__main__ import main

    with pytest.raises(SystemExit, match="webhook secret"):
        main(["--data-dir", str(tmp_path), "--frontend", "tcp://127.0.0.1:0", "--backend", "tcp://127.0.0.1:0",
              "--webhook-secret", "not-a-secret"])


def test_a_backed_up_outbox_refuses_new_webhooks_at_submit(hooks: Stack, receiver: Receiver) -> None:
    outbox = hooks.broker.broker.outbox
    with outbox._lock:
        saved, outbox._pending = outbox._pending, outbox.config.max_pending  # as if 10,000 were waiting
    try:
        r = hooks.http.simulate_post("/generate", json={**QUICK, "webhook": receiver.url()})
        assert r.status_code == 429 and "webhook" in r.json["detail"] and r.headers["retry-after"]
        assert hooks.http.simulate_post("/generate", json=QUICK).status_code == 202  # no webhook: accepted
    finally:
        with outbox._lock:
            outbox._pending = saved
