"""A submit its client was told failed (503) never runs: deadlines, no queueing, late-ACK cancels.

Components on real sockets over tcp://127.0.0.1: a real Broker, the front's real BrokerClient,
and, where the test needs a broker that answers too late, a bare ROUTER playing one.
"""

from __future__ import annotations

from typing import Iterator

import pytest
import zmq

from genserve import errors as e
from genserve import wire as w
from genserve.spec import TaskSpec
from http_front.broker_client import BrokerClient, BrokerUnavailable
from tests.conftest import free_port, wait_until
from tests.fakes import FakeNode, params

SPEC = TaskSpec("flux1-dev", "text2img", 0, params(width=64, height=64))


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.term()


def test_the_broker_refuses_a_submit_past_its_deadline(broker_factory, ctx) -> None:
    bt = broker_factory()
    node = FakeNode(ctx, bt.backend, "a").ready()
    client = BrokerClient(bt.frontend, timeout=2.0, context=ctx).start()
    try:
        wait_until(lambda: len(bt.broker.nodes) == 1, 5)
        client.request(w.InfoRequest(0))  # learn the broker's clock
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(bt.frontend)
        raw.send_multipart(w.encode(w.Submit(1, SPEC, "k", deadline=bt.broker.clock() - 1)))
        assert raw.poll(5000)
        reply = w.decode(raw.recv_multipart())
        raw.close(linger=0)
        assert reply.command == w.FAIL and reply.header.code == e.EXPIRED
        assert len(bt.broker.tasks) == 0 and node.recv_job(0.3) is None
        # A submit within its deadline (the client adds one from the broker's clock) is accepted.
        ack = client.request(w.Submit(0, SPEC, "k"))
        assert ack.command == w.ACK and len(bt.broker.tasks) == 1
    finally:
        client.close()
        node.sock.close(linger=0)


def test_a_submit_made_while_the_broker_is_down_is_not_delivered_when_it_returns(broker_factory, ctx) -> None:
    port, backend = free_port(), free_port()
    client = BrokerClient(f"tcp://127.0.0.1:{port}", timeout=0.5, context=ctx).start()
    try:
        with pytest.raises(BrokerUnavailable):
            client.request(w.Submit(0, SPEC, "k"))
        bt = broker_factory(frontend=f"tcp://127.0.0.1:{port}", backend=f"tcp://127.0.0.1:{backend}")
        node = FakeNode(ctx, bt.backend, "a").ready()
        wait_until(lambda: len(bt.broker.nodes) == 1, 5)
        wait_until(lambda: client.request(w.InfoRequest(0), timeout=0.5), 10, 0.1, "the client to connect")
        assert len(bt.broker.tasks) == 0 and node.recv_job(0.3) is None
        node.sock.close(linger=0)
    finally:
        client.close()


@pytest.fixture
def late_broker(ctx) -> Iterator[tuple[zmq.Socket, BrokerClient]]:
    """A bare ROUTER playing a broker that answers too late, and a front's client (0.3 s timeout) to it."""
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = BrokerClient(f"tcp://127.0.0.1:{port}", timeout=0.3, context=ctx).start()
    yield router, client
    client.close()
    router.close(linger=0)


def submit_that_times_out(router: zmq.Socket, client: BrokerClient, submit: w.Submit) -> tuple[bytes, w.Message]:
    """The client gives up on `submit` (503 for its caller); returns what the router then received."""
    with pytest.raises(BrokerUnavailable):
        client.request(submit)
    assert router.poll(2000)
    return w.split_routed(router.recv_multipart())


def test_an_ack_that_arrives_after_the_client_gave_up_cancels_the_task(late_broker) -> None:
    router, client = late_broker
    identity, submit = submit_that_times_out(router, client, w.Submit(0, SPEC, "k"))
    assert submit.command == w.SUBMIT
    # Only now, too late, does this slow "broker" accept it.
    router.send_multipart(w.routed(identity, w.Ack(submit.header.req, 0.0, "t-late")))
    assert router.poll(2000)
    _, cancel = w.split_routed(router.recv_multipart())
    assert cancel.command == w.CANCEL_TASK and cancel.header.task_id == "t-late" and cancel.header.orphaned


def test_an_orphaned_task_is_cancelled_as_expired_not_as_the_clients_cancel(broker_factory, ctx) -> None:
    bt = broker_factory()
    node = FakeNode(ctx, bt.backend, "a").ready()
    client = BrokerClient(bt.frontend, timeout=2.0, context=ctx).start()
    try:
        wait_until(lambda: len(bt.broker.nodes) == 1, 5)
        node.send(w.Heartbeat(idle=False))
        task_id = client.request(w.Submit(0, SPEC, "k")).header.task_id
        task = client.request(w.CancelTask(0, task_id, orphaned=True)).header.body.task
        assert task.status == "cancelled" and task.error_code == e.EXPIRED
    finally:
        client.close()
        node.sock.close(linger=0)


def test_a_late_replayed_ack_is_not_cancelled(late_broker) -> None:
    router, client = late_broker
    identity, submit = submit_that_times_out(router, client, w.Submit(0, SPEC, "k", idempotency_key="retry-me"))
    # The broker answered with a task another request (a retry) may already hold: never cancel it.
    router.send_multipart(w.routed(identity, w.Ack(submit.header.req, 0.0, "t-shared", replayed=True)))
    assert not router.poll(500)
