"""Idempotency-Key: a retried /generate returns the original task instead of running a second one."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import msgspec
import pytest
import zmq

from genserve import errors as e
from genserve import wire as w
from genserve.spec import TaskSpec
from http_front.broker_client import BrokerClient, BrokerError
from http_front.keys import KeyStore
from tests.conftest import Stack, wait_until
from tests.fakes import FakeNode, params

KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdefgh"}
QUICK = {"prompt": "quick", "width": 32, "height": 32, "num_inference_steps": 1}


def as_(name: str, idem: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {KEYS[name]}"}
    if idem is not None:
        headers["Idempotency-Key"] = idem
    return headers


@pytest.fixture(scope="module")
def idem(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Stack]:
    keys = KeyStore.from_env([(KEYS["alice"], "alice", ("generation",)), (KEYS["bob"], "bob", ("generation",))],
                             None)
    stack = Stack(tmp_path_factory.mktemp("idem"), tiny_models, ("flux1-dev",), keys=keys)
    yield stack
    stack.close()


def test_an_async_retry_returns_the_same_task(idem: Stack) -> None:
    before = len(idem.broker.broker.tasks)
    first = idem.http.simulate_post("/generate", json={**QUICK, "async": True}, headers=as_("alice", "retry-1"))
    again = idem.http.simulate_post("/generate", json={**QUICK, "async": True}, headers=as_("alice", "retry-1"))
    assert first.status_code == again.status_code == 202
    assert first.json["task_id"] == again.json["task_id"]
    assert "Idempotent-Replayed" not in first.headers and again.headers["Idempotent-Replayed"] == "true"
    assert len(idem.broker.broker.tasks) == before + 1


def test_a_sync_retry_after_completion_returns_the_image_without_running_again(idem: Stack) -> None:
    first = idem.http.simulate_post("/generate", json={**QUICK, "seed": 7}, headers=as_("alice", "sync-1"))
    assert first.status_code == 200, first.text
    def jobs_done() -> int:
        return sum(n.jobs_done for n in idem.broker.broker.nodes)

    runs, before = jobs_done(), len(idem.broker.broker.tasks)
    again = idem.http.simulate_post("/generate", json={**QUICK, "seed": 7}, headers=as_("alice", "sync-1"))
    assert again.status_code == 200 and again.json["task_id"] == first.json["task_id"]
    assert again.json["image"] == first.json["image"] and again.headers["Idempotent-Replayed"] == "true"
    assert len(idem.broker.broker.tasks) == before and jobs_done() == runs


def test_the_same_key_with_another_body_is_422_and_changes_nothing(idem: Stack) -> None:
    idem.http.simulate_post("/generate", json={**QUICK, "async": True}, headers=as_("alice", "body-1"))
    before = len(idem.broker.broker.tasks)
    r = idem.http.simulate_post("/generate", json={**QUICK, "seed": 99, "async": True},
                                headers=as_("alice", "body-1"))
    assert r.status_code == 422 and r.json["success"] is False and "Idempotency-Key" in r.json["detail"]
    assert len(idem.broker.broker.tasks) == before


def test_keys_are_scoped_to_their_api_key(idem: Stack) -> None:
    a = idem.http.simulate_post("/generate", json={**QUICK, "async": True}, headers=as_("alice", "shared"))
    b = idem.http.simulate_post("/generate", json={**QUICK, "async": True}, headers=as_("bob", "shared"))
    assert a.status_code == b.status_code == 202 and a.json["task_id"] != b.json["task_id"]


@pytest.mark.parametrize("bad", ["", "x" * 256, "with space", "ünïcode", "tab\there"])
def test_a_malformed_key_is_400(idem: Stack, bad: str) -> None:
    before = len(idem.broker.broker.tasks)
    r = idem.http.simulate_post("/generate", json={**QUICK, "async": True},
                                headers={**as_("alice"), "Idempotency-Key": bad})
    assert r.status_code == 400 and r.json["field"] == "Idempotency-Key"
    assert len(idem.broker.broker.tasks) == before


SPEC = TaskSpec("flux1-dev", "text2img", 0, params(width=64, height=64))


def test_keys_survive_a_restart_and_only_an_unreplayed_orphan_is_cancelled(broker_factory) -> None:
    ctx = zmq.Context()
    bt = broker_factory()
    node = FakeNode(ctx, bt.backend, "a").ready()
    client = BrokerClient(bt.frontend, timeout=2.0, context=ctx).start()
    try:
        wait_until(lambda: len(bt.broker.nodes) == 1, 5)
        submit = w.Submit(0, SPEC, "o1", idempotency_key="k")
        first = client.request(submit).header.task_id
        client.close()
        bt.close()
        bt = broker_factory(frontend=bt.frontend, backend=bt.backend)  # same journal
        node.ready()
        client = BrokerClient(bt.frontend, timeout=2.0, context=ctx).start()
        wait_until(lambda: len(bt.broker.nodes) == 1, 5)
        assert client.request(submit).header.task_id == first
        with pytest.raises(BrokerError) as err:
            client.request(msgspec.structs.replace(submit, task=msgspec.structs.replace(SPEC, priority=5)))
        assert err.value.code == e.IDEMPOTENCY
        # A retry was given this task: the first request's late ACK must not cancel it as orphaned.
        assert client.request(w.CancelTask(0, first, orphaned=True)).header.body.task.status != "cancelled"
        # A task no retry has seen is cancelled as orphaned, and frees its key for the retry.
        other = w.Submit(0, SPEC, "o1", idempotency_key="k2")
        orphan = client.request(other).header.task_id
        cancelled = client.request(w.CancelTask(0, orphan, orphaned=True)).header.body.task
        assert cancelled.status == "cancelled" and cancelled.error_code == e.EXPIRED
        assert client.request(other).header.task_id != orphan
    finally:
        client.close()
        node.sock.close(linger=0)
        bt.close()
        ctx.term()
