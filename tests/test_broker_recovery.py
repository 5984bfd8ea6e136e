"""Broker durability on real sockets with fake nodes: restarts and group commit.

After a restart, a task that was running waits for the node that ran it. The node says in
READY which tasks it still runs (busy_task) and which reports follow (reports). Only a node
that comes back without the task, or the end of the recovery grace, lets another node run it:
a result finished while the broker was away is never computed twice.

Group commit: the broker handles a batch of messages in one journal transaction and sends
the replies after it commits, so no ACK or JOB ever leaves for what is not journaled.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from genserve import errors as e
from genserve import wire as w
from http_front.broker_client import BrokerClient, BrokerUnavailable
from tests.conftest import BrokerThread, wait_until
from tests.fakes import FakeNode
from tests.test_broker import spec, submit

Restart = Callable[..., tuple[BrokerThread, FakeNode, FakeNode, str]]


@pytest.fixture
def restarted(broker_factory, ctx) -> Iterator[Restart]:
    """Run one task on fake node "a", kill the broker, start a new one on the same journal with
    `overrides`; returns it, node "a" (its socket reconnects, as a node's does), a fresh idle node
    "b" registered to it, and the task id."""
    closing: list[Any] = []

    def run(**overrides: Any) -> tuple[BrokerThread, FakeNode, FakeNode, str]:
        bt = broker_factory()
        client = BrokerClient(bt.frontend, timeout=2.0, context=ctx).start()
        a = FakeNode(ctx, bt.backend, "a").ready()
        closing.extend([client, a])
        wait_until(lambda: len(bt.broker.nodes) == 1, 5)
        task_id = submit(client, spec())
        assert a.recv_job().header.task_id == task_id
        bt.close()  # the broker dies while node a computes
        bt2 = broker_factory(frontend=bt.frontend, backend=bt.backend, **overrides)
        b = FakeNode(ctx, bt2.backend, "b").ready()
        closing.append(b)
        wait_until(lambda: bt2.broker.nodes.find("b") is not None, 5)
        return bt2, a, b, task_id

    yield run
    for sock in closing:
        sock.close()


def quiet_for(node: FakeNode, seconds: float) -> None:
    """Heartbeat as an idle node for `seconds`, failing if a JOB comes."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        node.heartbeat()
        job = node.recv_job(timeout=0.1)
        assert job is None, f"node {node.name} got {job.header.task_id} while its first node may finish it"


def next_job(nodes: list[FakeNode], timeout: float) -> str | None:
    """Heartbeat as idle nodes until one gets a JOB (its task id) or `timeout` passes (None)."""
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        for node in nodes:
            node.heartbeat()
            job = node.recv_job(timeout=0.05)
            if job is not None:
                return job.header.task_id
    return None


def end_grace(bt: BrokerThread) -> None:
    """End the recovery grace now (released at the broker's next timer tick)."""
    bt.broker.table.hold_until(0.0)


def test_the_task_waits_past_the_node_timeout_for_its_node_which_reports_it_done(restarted) -> None:
    bt, a, b, task_id = restarted(recovery_grace=30.0)
    quiet_for(b, 3 * bt.config.node_timeout)  # the broker once gave it away after one node timeout
    a.ready(reports=[task_id]).finish(task_id)  # back: it finished meanwhile
    ack = a.recv()
    assert ack is not None and ack.command == w.RESULT_ACK
    wait_until(lambda: bt.broker.tasks[task_id].state == w.COMPLETED, 5)
    assert bt.broker.tasks[task_id].attempts == 1 and bt.broker.tasks[task_id].node_id == "a"
    quiet_for(b, 0.5)


def test_a_node_back_without_the_task_releases_it_at_once(restarted, ctx) -> None:
    bt, a, b, task_id = restarted(recovery_grace=30.0)
    a.close()
    a = FakeNode(ctx, bt.backend, "a", identity=b"a-restarted").ready()  # a new process: nothing to report
    try:
        assert next_job([a, b], 5.0) == task_id  # long before the 30 s grace
        assert bt.broker.tasks[task_id].state == w.RUNNING
    finally:
        a.close()


def test_an_abandoned_report_puts_the_held_task_back_in_line(restarted) -> None:
    bt, a, b, task_id = restarted(recovery_grace=30.0)
    a.ready(busy=True, reports=[task_id])  # still stopping it
    wait_until(lambda: bt.broker.nodes.find("a") is not None, 5)
    quiet_for(b, 0.3)
    assert bt.broker.table.held_for("a") == [task_id]
    a.send(w.Error(task_id, e.ABANDONED, "stopped at step 2"))  # it never finished: someone runs it
    assert next_job([a, b], 5.0) == task_id


def test_a_cancel_the_old_broker_sent_but_never_journaled_stops_the_task_without_failing_it(restarted) -> None:
    bt, a, b, task_id = restarted(recovery_grace=30.0)
    a.ready(reports=[task_id]).send(w.Error(task_id, e.CANCELLED, "stopped at step 1"))
    assert next_job([a, b], 5.0) == task_id  # it runs again: nobody asked for a failure
    assert not bt.broker.tasks[task_id].final


def test_a_failure_reported_for_a_held_task_fails_it_as_if_it_had_run_there(restarted) -> None:
    bt, a, b, task_id = restarted(recovery_grace=30.0)
    a.ready(reports=[task_id]).send(w.Error(task_id, e.GENERATION, "out of memory"))
    wait_until(lambda: bt.broker.tasks[task_id].state == w.FAILED, 5)
    assert bt.broker.tasks[task_id].error == "out of memory"
    quiet_for(b, 0.3)


def test_another_nodes_report_cannot_take_a_held_task(restarted) -> None:
    bt, _, b, task_id = restarted(recovery_grace=30.0)
    b.send(w.Error(task_id, e.ABANDONED, "not mine"))  # b never ran it: ignored, the task stays held
    ack = b.recv()
    assert ack is not None and ack.command == w.RESULT_ACK  # the ERROR was handled
    quiet_for(b, 0.3)
    assert bt.broker.table.held_for("a") == [task_id]
    end_grace(bt)
    assert next_job([b], 5.0) == task_id  # only now may b run it


def test_an_older_node_that_does_not_list_its_reports_does_not_release_its_task(restarted) -> None:
    bt, a, b, task_id = restarted(recovery_grace=30.0)
    a.ready(reports=None)
    wait_until(lambda: bt.broker.nodes.find("a") is not None, 5)
    quiet_for(b, 0.3)  # a may still send a result
    assert bt.broker.table.held_for("a") == [task_id]
    a.finish(task_id)
    wait_until(lambda: bt.broker.tasks[task_id].state == w.COMPLETED, 5)
    quiet_for(b, 0.3)


class FailingCommit:
    """The journal's SQLite connection, except that COMMIT fails as on a full or failing disk."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def execute(self, sql: str, *args: Any) -> Any:
        """Run `sql`; COMMIT raises instead."""
        if sql == "COMMIT":
            raise sqlite3.OperationalError("disk I/O error")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def test_when_the_journal_cannot_commit_no_reply_leaves_and_the_broker_stops(broker_factory, ctx) -> None:
    bt = broker_factory()
    client = BrokerClient(bt.frontend, timeout=1.0, context=ctx).start()
    node = FakeNode(ctx, bt.backend, "a").ready()
    try:
        wait_until(lambda: len(bt.broker.nodes) == 1, 5)
        bt.broker.journal._db = FailingCommit(bt.broker.journal._db)
        with pytest.raises(BrokerUnavailable):  # no ACK
            submit(client, spec())
        assert node.recv_job(timeout=0.3) is None  # nor a JOB
        bt.thread.join(timeout=5)
        assert not bt.thread.is_alive() and bt.broker.failed  # it stops: its supervisor restarts it
        accepted = set(bt.broker.tasks)
    finally:
        node.close()
        client.close()
    bt.close()  # closing rolls the open transaction back
    again = broker_factory(frontend=bt.frontend, backend=bt.backend)
    assert len(accepted) == 1 and set(again.broker.tasks) == set()  # what nobody was told of is gone


def test_a_job_that_cannot_reach_its_node_goes_back_in_line_without_costing_an_attempt(
        broker_factory, ctx, caplog: pytest.LogCaptureFixture) -> None:
    bt = broker_factory(liveness=100)  # the node must not expire first (20 s)
    client = BrokerClient(bt.frontend, timeout=2.0, context=ctx).start()
    gone = FakeNode(ctx, bt.backend, "gone").ready()
    b = None
    try:
        wait_until(lambda: len(bt.broker.nodes) == 1, 5)
        gone.close()  # vanished without a word; the broker has not expired it
        time.sleep(0.5)  # for its ROUTER to see the connection close
        task_id = submit(client, spec())  # its JOB finds no peer (ROUTER_MANDATORY), after the commit
        wait_until(lambda: bt.broker.nodes.find("gone") is None and bt.broker.tasks[task_id].state == w.QUEUED,
                   5, 0.01, "the unreachable node to be dropped and its task queued again")
        assert not bt.broker.tasks[task_id].waited  # no "started" (metrics, webhook) for a JOB that never left
        b = FakeNode(ctx, bt.backend, "b").ready()
        job = b.recv_job()
        assert job is not None and job.header.task_id == task_id and job.header.attempt == 1
        assert f"cannot send task {task_id} to node gone" in caplog.text
    finally:
        if b is not None:
            b.close()
        client.close()
