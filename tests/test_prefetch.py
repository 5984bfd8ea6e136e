"""Prefetch on real sockets with fake nodes: a job waits on a busy node behind its running one.

A node that says `prefetch=1` in READY may hold one job beyond the one it runs, so the next
starts while the previous image is encoded and sent. The broker gives an idle node work
first, recalls a waiting job that an idle node or more urgent work should have, and keeps
every rule of a running task for the waiting one: a cancel reaches it, a lost node's jobs
come back (a waiting one without spending an attempt), and no task is ever on two nodes.
"""

from __future__ import annotations

import time
from typing import Any

from genserve import errors as e
from genserve import wire as w
from http_front.broker_client import BrokerClient
from tests.conftest import BrokerThread, _parts, wait_until
from tests.fakes import FakeNode
from tests.test_broker import spec, submit


def view(client: BrokerClient, task_id: str) -> w.TaskView:
    return client.request(w.Status(0, task_id)).header.body.task


def recv_command(node: FakeNode, command: bytes, timeout: float = 2.0) -> w.Message | None:
    """The next message of this command (others skipped), or None."""
    until = time.monotonic() + timeout
    while (left := until - time.monotonic()) > 0:
        msg = node.recv(left)
        if msg is not None and msg.command == command:
            return msg
    return None


def busy_node(parts: Any, **kw: Any) -> tuple[BrokerThread, BrokerClient, Any, FakeNode, str]:
    """Node "a" (prefetch 1), the only one, runs task one; also returns the node factory."""
    bt, client, node = parts
    a = node("a").ready(prefetch=1)
    wait_until(lambda: len(bt.broker.nodes) == 1, 5)
    one = submit(client, spec(**kw))
    assert a.recv_job().header.task_id == one
    return bt, client, node, a, one


def busy_with_one_waiting(parts: Any, **kw: Any) -> tuple[BrokerThread, BrokerClient, FakeNode, str, str]:
    """Node "a" (prefetch 1) runs task one; task two waits on it."""
    bt, client, _, a, one = busy_node(parts, **kw)
    two = submit(client, spec(**kw))
    assert a.recv_job().header.task_id == two, "the second job did not wait on the busy node"
    return bt, client, a, one, two


def test_a_waiting_job_shows_as_queued_first_in_line_until_its_node_starts_it(parts) -> None:
    bt, client, a, one, two = busy_with_one_waiting(parts)
    waiting = view(client, two)
    assert (waiting.status, waiting.queue_position, waiting.started_at) == (w.QUEUED, 0, None)
    assert waiting.attempts == 1 and view(client, one).status == w.RUNNING
    a.started(two)  # the pipeline of one returned: two starts while one's image is encoded
    wait_until(lambda: view(client, two).status == w.RUNNING, 5, what="two to start")
    a.finish(one)
    wait_until(lambda: view(client, one).status == w.COMPLETED, 5)
    three = submit(client, spec())
    assert a.recv_job().header.task_id == three  # one reported: room for another behind two
    a.finish(two)
    assert view(client, two).started_at is not None
    wait_until(lambda: view(client, two).status == w.COMPLETED, 5)


def test_a_node_without_prefetch_gets_one_job_at_a_time(parts) -> None:
    bt, client, node = parts
    a = node("a").ready()  # an older node: says nothing of prefetch
    wait_until(lambda: len(bt.broker.nodes) == 1, 5)
    one, two = submit(client, spec()), submit(client, spec())
    assert a.recv_job().header.task_id == one
    assert a.recv_job(timeout=0.5) is None and view(client, two).queue_position == 0
    a.finish(one)
    assert a.recv_job().header.task_id == two


def test_an_idle_node_gets_work_before_a_busy_node_takes_a_second_job(parts) -> None:
    bt, client, node, a, _ = busy_node(parts)
    b = node("b").ready(prefetch=1)
    wait_until(lambda: len(bt.broker.nodes) == 2, 5)
    two = submit(client, spec())
    assert b.recv_job().header.task_id == two
    assert a.recv_job(timeout=0.3) is None


def test_more_urgent_work_recalls_a_waiting_job_which_keeps_its_attempt_and_place(parts) -> None:
    bt, client, a, one, two = busy_with_one_waiting(parts, priority=5)
    urgent = submit(client, spec(priority=0))
    recall = recv_command(a, w.RECALL)
    assert recall is not None and recall.header.task_id == two
    a.error(two, e.RECALLED)  # it had not started: the node gives it back
    assert a.recv_job().header.task_id == urgent  # the urgent task waits behind one instead
    back = view(client, two)
    assert (back.status, back.attempts, back.queue_position) == (w.QUEUED, 0, 0)
    a.started(urgent)
    a.finish(one)
    assert a.recv_job().header.task_id == two  # room again: two waits behind urgent
    assert view(client, two).attempts == 1


def test_a_recall_that_comes_too_late_leaves_the_started_job_running(parts) -> None:
    bt, client, a, one, two = busy_with_one_waiting(parts, priority=5)
    a.finish(one)
    a.started(two)
    submit(client, spec(priority=0))
    # Whether or not a RECALL crossed the start, two runs on the node it started on.
    wait_until(lambda: view(client, two).status == w.RUNNING, 5)
    a.finish(two)
    wait_until(lambda: view(client, two).status == w.COMPLETED, 5)
    assert view(client, two).attempts == 1


def test_a_node_that_becomes_idle_takes_a_waiting_job_from_a_busy_one(parts) -> None:
    bt, client, a, one, two = busy_with_one_waiting(parts)
    b = parts[2]("b").ready(prefetch=1)
    recall = recv_command(a, w.RECALL)
    assert recall is not None and recall.header.task_id == two
    assert b.recv_job(timeout=0.3) is None, "two went to b while a still held it"
    a.error(two, e.RECALLED)
    assert b.recv_job().header.task_id == two
    assert view(client, two).attempts == 1


def test_cancelling_a_waiting_job_reaches_its_node_and_frees_the_place(parts) -> None:
    bt, client, a, one, two = busy_with_one_waiting(parts)
    cancelled = client.request(w.CancelTask(0, two)).header.body.task
    assert cancelled.status == w.CANCELLED
    cancel = recv_command(a, w.CANCEL)
    assert cancel is not None and cancel.header.task_id == two
    a.error(two, e.CANCELLED)
    assert recv_command(a, w.RESULT_ACK).header.task_id == two
    three = submit(client, spec())
    assert a.recv_job().header.task_id == three  # the waiting place is free again
    assert view(client, one).status == w.RUNNING


def test_a_job_that_waits_past_its_deadline_fails_and_its_node_is_told(broker_factory, ctx) -> None:
    bt = broker_factory(task_timeout=1.0)
    client = BrokerClient(bt.frontend, timeout=2.0, context=ctx).start()
    a = FakeNode(ctx, bt.backend, "a").ready(prefetch=1)
    try:
        wait_until(lambda: len(bt.broker.nodes) == 1, 5)
        one, two = submit(client, spec()), submit(client, spec())
        assert [a.recv_job().header.task_id, a.recv_job().header.task_id] == [one, two]
        cancels = set()
        until = time.monotonic() + 5
        while cancels != {one, two} and time.monotonic() < until:
            a.heartbeat(idle=False, task_id=one)
            msg = recv_command(a, w.CANCEL, timeout=0.1)
            if msg is not None:
                cancels.add(msg.header.task_id)
        assert cancels == {one, two}
        assert view(client, two).error_code == e.TIMEOUT
    finally:
        a.close()
        client.close()


def test_a_lost_node_gives_back_its_waiting_job_without_spending_an_attempt(parts) -> None:
    bt, client, a, one, two = busy_with_one_waiting(parts)
    b = parts[2]("b").ready()  # no prefetch: it gets the jobs only once a is gone
    assert recv_command(a, w.RECALL) is not None
    a.close()  # dies without answering
    jobs: list[str] = []
    until = time.monotonic() + 10
    while len(jobs) < 2 and time.monotonic() < until:
        b.heartbeat()
        job = b.recv_job(timeout=0.1)
        if job is not None:
            assert bt.broker.nodes.find("a") is None, "a task went to b while a still held it"
            jobs.append(job.header.task_id)
            b.finish(job.header.task_id)
    assert sorted(jobs) == sorted([one, two])
    wait_until(lambda: view(client, two).status == w.COMPLETED, 5)
    assert view(client, one).attempts == 2 and view(client, two).attempts == 1


def test_a_node_that_refuses_a_waiting_job_gets_no_other_until_it_reports(parts) -> None:
    bt, client, a, one, two = busy_with_one_waiting(parts)
    a.error(two, e.NODE_BUSY)  # still unwinding something the broker did not know of
    three = submit(client, spec())
    assert a.recv_job(timeout=0.4) is None
    assert view(client, two).attempts == 0 and view(client, three).status == w.QUEUED
    a.finish(one)
    got = [a.recv_job().header.task_id, a.recv_job().header.task_id]
    assert got == [two, three]


def test_a_node_that_re_registers_gives_back_its_waiting_job_once(parts) -> None:
    bt, client, a, one, two = busy_with_one_waiting(parts)
    # It reconnects on a new socket: it still runs one, and reports two given back.
    a2 = parts[2]("a", identity=b"a-reconnected").ready(busy_task=one, reports=[two], prefetch=1)
    wait_until(lambda: bt.broker.nodes.get(b"a-reconnected") is not None, 5)
    assert bt.broker.nodes.get(b"a-reconnected").next_id == two  # held until its report comes
    a2.error(two, e.RECALLED)
    assert a2.recv_job().header.task_id == two  # back in line, and a2 has room behind one again
    assert view(client, two).attempts == 1 and view(client, one).attempts == 1


def test_after_a_broker_restart_a_waiting_job_is_held_for_its_node_and_given_back(broker_factory, ctx) -> None:
    bt = broker_factory()
    client = BrokerClient(bt.frontend, timeout=2.0, context=ctx).start()
    a = FakeNode(ctx, bt.backend, "a").ready(prefetch=1)
    b = None
    try:
        wait_until(lambda: len(bt.broker.nodes) == 1, 5)
        one, two = submit(client, spec()), submit(client, spec())
        assert [a.recv_job().header.task_id, a.recv_job().header.task_id] == [one, two]
        bt.close()
        bt2 = broker_factory(frontend=bt.frontend, backend=bt.backend, recovery_grace=30.0)
        b = FakeNode(ctx, bt2.backend, "b").ready()
        assert b.recv_job(timeout=0.5) is None, "a held task went to another node"
        a.ready(busy_task=one, reports=[two], prefetch=1)
        a.error(two, e.RECALLED)
        assert b.recv_job().header.task_id == two
        assert bt2.broker.tasks[two].attempts == 1
        a.finish(one)
        wait_until(lambda: bt2.broker.tasks[one].state == w.COMPLETED, 5)
    finally:
        a.close()
        if b is not None:
            b.close()
        client.close()


def test_priority_order_holds_across_nodes_while_jobs_wait_on_them(patient_parts) -> None:
    bt, client, node = patient_parts
    order_holds(bt, client, node("a").ready(prefetch=1), node("b").ready(prefetch=1))


def order_holds(bt: BrokerThread, client: BrokerClient, a: FakeNode, b: FakeNode) -> None:
    wait_until(lambda: len(bt.broker.nodes) == 2, 5)
    first, second = submit(client, spec(priority=0)), submit(client, spec(priority=0))
    running = {a.recv_job().header.task_id, b.recv_job().header.task_id}
    assert running == {first, second}
    urgent = submit(client, spec(priority=0))
    holder, other = (a, b) if a.recv_job(timeout=0.5) is not None else (b, a)
    assert bt.broker.tasks[urgent].node == f"fake-{holder.name}".encode()
    later = submit(client, spec(priority=3))
    # Whichever node frees first would start its own waiting job: the less urgent one does not wait on the other.
    assert other.recv_job(timeout=0.5) is None
    other_running = next(t for t in running if bt.broker.tasks[t].node != bt.broker.tasks[urgent].node)
    other.finish(other_running)
    recall = recv_command(holder, w.RECALL)
    assert recall is not None and recall.header.task_id == urgent  # the idle node waits for the urgent job
    assert other.recv_job(timeout=0.3) is None, "the idle node took the less urgent task first"
    holder.error(urgent, e.RECALLED)
    assert other.recv_job().header.task_id == urgent
    assert view(client, later).status == w.QUEUED


def test_the_running_jobs_report_starts_the_waiting_one_even_before_its_progress(parts) -> None:
    bt, client, a, one, two = busy_with_one_waiting(parts)
    a.finish(one)  # the worker took two before one's image was encoded and sent
    wait_until(lambda: view(client, two).status == w.RUNNING, 5, what="two to count as started")
    assert view(client, two).started_at is not None
    a.started(two)  # its late step-0 PROGRESS changes nothing
    a.finish(two)
    wait_until(lambda: view(client, two).status == w.COMPLETED, 5)


def test_a_node_that_dies_while_its_running_job_unwinds_a_cancel_gives_back_its_waiting_job(parts) -> None:
    bt, client, a, one, two = busy_with_one_waiting(parts)
    client.request(w.CancelTask(0, one))
    assert recv_command(a, w.CANCEL).header.task_id == one
    a.close()  # dies before it reports the cancelled job
    b = parts[2]("b").ready()
    got = None
    until = time.monotonic() + 10
    while got is None and time.monotonic() < until:
        b.heartbeat()
        got = b.recv_job(timeout=0.1)
    assert got is not None and got.header.task_id == two, "the waiting job was stranded on the dead node"
    assert bt.broker.nodes.find("a") is None and view(client, two).attempts == 1


def test_a_refused_running_job_leaves_the_waiting_one_in_place_unstarted(parts) -> None:
    bt, client, a, one, two = busy_with_one_waiting(parts)
    a.error(one, e.NODE_BUSY)  # busy with something the broker did not know of
    wait_until(lambda: view(client, one).status == w.QUEUED, 5)
    assert view(client, one).attempts == 0
    waiting = view(client, two)
    assert (waiting.status, waiting.started_at) == (w.QUEUED, None)  # no false start
    assert a.recv_job(timeout=0.3) is None  # nothing more until it says what it does
    a.started(two)
    wait_until(lambda: view(client, two).status == w.RUNNING, 5)
    a.finish(two)
    wait_until(lambda: view(client, two).status == w.COMPLETED, 5)


def test_a_job_placed_behind_a_more_urgent_waiting_one_elsewhere_is_recalled(patient_parts) -> None:
    bt, client, node = patient_parts
    a, b = node("a").ready(prefetch=1), node("b").ready(prefetch=1)
    wait_until(lambda: len(bt.broker.nodes) == 2, 5)
    submit(client, spec()), submit(client, spec())
    assert a.recv_job() is not None and b.recv_job() is not None  # both busy
    low = submit(client, spec(priority=5))
    holder, other = (a, b) if a.recv_job(timeout=0.5) is not None else (b, a)
    urgent = submit(client, spec(priority=0))
    assert other.recv_job().header.task_id == urgent  # urgent waits on the other node, placed after low
    recall = recv_command(holder, w.RECALL)
    assert recall is not None and recall.header.task_id == low, "low could start before urgent"
    holder.error(low, e.RECALLED)
    assert holder.recv_job(timeout=0.3) is None  # low may not wait again while urgent waits
    assert (view(client, low).status, view(client, low).attempts) == (w.QUEUED, 0)


def test_a_waiting_job_that_cannot_be_delivered_keeps_its_attempt_count(parts) -> None:
    bt, client, _, a, one = busy_node(parts)
    a.close()
    time.sleep(0.2)  # the broker's socket sees the peer go; the JOB below cannot be routed
    two = submit(client, spec())
    wait_until(lambda: bt.broker.nodes.find("a") is None, 5, what="the node to be dropped")
    assert (view(client, two).status, view(client, two).attempts) == (w.QUEUED, 0)
    assert view(client, one).attempts == 1


def test_a_report_kept_from_an_earlier_assignment_is_not_taken_for_the_current_one(parts) -> None:
    bt, client, a, one, two = busy_with_one_waiting(parts)
    a.error(two, e.RECALLED, run=bt.broker.tasks[two].run)  # as at a re-registration: two goes back in line
    again = a.recv_job()
    assert again.header.task_id == two and again.header.run != ""
    old_run = "0" * 16
    a.error(two, e.RECALLED, run=old_run)  # the same report re-sent later: about the earlier assignment
    a.error(two, e.ABANDONED, run=old_run)
    assert a.recv_job(timeout=0.3) is None, "a stale report put the task back in line"
    assert bt.broker.tasks[two].node is not None and bt.broker.tasks[two].attempts == 1
    a.finish(one, run=bt.broker.tasks[one].run)
    a.finish(two, run=again.header.run)
    wait_until(lambda: view(client, two).status == w.COMPLETED, 5)


def test_a_result_from_an_earlier_assignment_completes_the_task_and_stops_the_current_one(parts) -> None:
    bt, client, a, one, two = busy_with_one_waiting(parts)
    current = bt.broker.tasks[two].run
    a.finish(two, run="f" * 16)  # an image made under an earlier assignment: finished work is kept
    wait_until(lambda: view(client, two).status == w.COMPLETED, 5)
    cancel = recv_command(a, w.CANCEL)
    assert cancel is not None and cancel.header.task_id == two  # the waiting copy is dropped
    assert bt.broker.tasks[two].run == current
    assert view(client, one).status == w.RUNNING  # the running job keeps its slot


def test_a_late_invalid_image_from_an_earlier_assignment_does_not_fail_the_task(parts) -> None:
    bt, client, a, one, two = busy_with_one_waiting(parts)
    a.finish(two, png=b"not an image", run="e" * 16)
    a.finish(one, run=bt.broker.tasks[one].run)  # (one message later: the bad one was handled)
    wait_until(lambda: view(client, one).status == w.COMPLETED, 5)
    assert view(client, two).status == w.RUNNING  # promoted behind one, and not failed
    a.finish(two, run=bt.broker.tasks[two].run)
    wait_until(lambda: view(client, two).status == w.COMPLETED, 5)


def test_a_task_its_node_claims_after_being_expired_takes_that_nodes_reports(patient_parts) -> None:
    bt, client, node = patient_parts  # no expiry during the test: a's reports alone decide
    a = node("a").ready()
    wait_until(lambda: len(bt.broker.nodes) == 1, 5)
    task_id = submit(client, spec())
    first_run = a.recv_job().header.run
    a.send(w.Disconnect("as if expired"))  # the broker drops a, which goes on running the task
    wait_until(lambda: bt.broker.nodes.find("a") is None, 5, what="a to be dropped")
    b = node("b").ready()
    second = b.recv_job()
    assert second.header.task_id == task_id and second.header.run != first_run
    b.error(task_id, e.NODE_BUSY, run=second.header.run)  # back in line, run of b's JOB
    b.heartbeat(idle=False)
    wait_until(lambda: bt.broker.tasks[task_id].state == w.QUEUED, 5)
    a.ready(busy_task=task_id)  # a wakes up, still running it: it keeps it
    wait_until(lambda: bt.broker.tasks[task_id].node == b"fake-a", 5, what="a to resume it")
    a.error(task_id, e.ABANDONED, run=first_run)  # stamped with a's own JOB's run
    again = a.recv_job()  # taken: back in line, and a (idle now) gets it again
    assert again is not None and again.header.task_id == task_id and again.header.run not in (first_run, "")


def test_a_waiting_jobs_result_before_its_predecessors_counts_it_as_started(parts) -> None:
    bt, client, a, one, two = busy_with_one_waiting(parts)
    a.finish(two, run=bt.broker.tasks[two].run)  # one's image is still being encoded: two overtook it
    wait_until(lambda: view(client, two).status == w.COMPLETED, 5)
    assert view(client, two).started_at is not None
    three = submit(client, spec())
    assert a.recv_job().header.task_id == three  # one still runs for the broker: three waits behind it
    assert view(client, one).status == w.RUNNING


def test_a_node_asking_for_a_larger_credit_gets_one_waiting_job_and_a_bad_one_is_refused(parts) -> None:
    bt, client, node = parts
    greedy = node("greedy").ready(prefetch=8)  # the most a READY may ask; the broker sends one at most
    for bad in (-1, 9, 10**9):
        node(f"bad{bad}").ready(prefetch=bad)  # not a valid READY: never registered
    wait_until(lambda: len(bt.broker.nodes) >= 1, 5)
    ids = [submit(client, spec()) for _ in range(4)]
    assert [greedy.recv_job().header.task_id for _ in range(2)] == ids[:2]
    assert greedy.recv_job(timeout=0.3) is None
    assert [n.node_id for n in bt.broker.nodes] == ["greedy"]


def test_jobs_given_back_together_do_not_wait_on_two_nodes_out_of_priority_order(broker_factory, ctx) -> None:
    # Ticks 10 s apart: every placement below comes from the message that allows it, not from a timer.
    parts = _parts(broker_factory(heartbeat_interval=10.0, liveness=100), ctx)
    bt, client, node = next(parts)
    try:
        nodes = [node(name).ready(prefetch=1) for name in "abc"]
        wait_until(lambda: len(bt.broker.nodes) == 3, 5)
        running = [submit(client, spec(priority=5)) for _ in nodes]
        on = {n.name: n.recv_job().header.task_id for n in nodes}
        assert sorted(on.values()) == sorted(running)
        urgent = submit(client, spec(priority=0))
        holder = next(n for n in nodes if bt.broker.tasks[urgent].node == f"fake-{n.name}".encode())
        assert holder.recv_job().header.task_id == urgent
        # It leaves: its running task (priority 5) and its waiting one (0) come back in one go.
        holder.send(w.Disconnect("stopping"))
        others = [n for n in nodes if n is not holder]
        got = {n.name: n.recv_job(timeout=1.0) for n in others}
        assert [m.header.task_id for m in got.values() if m is not None] == [urgent], \
            "a less urgent task waits on one node while a more urgent one waits unstarted on another"
        waits_on = next(n for n in others if got[n.name] is not None)
        other = next(n for n in others if n is not waits_on)
        waits_on.started(urgent, run=got[waits_on.name].header.run)  # it runs: what it held back may wait now
        assert other.recv_job().header.task_id == on[holder.name]
    finally:
        next(parts, None)


def test_cancelling_a_waiting_job_lets_the_next_one_wait_at_once(broker_factory, ctx) -> None:
    parts = _parts(broker_factory(heartbeat_interval=10.0, liveness=100), ctx)  # no timer helps within the test
    bt, client, node = next(parts)
    try:
        a = node("a").ready(prefetch=1)
        wait_until(lambda: len(bt.broker.nodes) == 1, 5)
        one, two, three = (submit(client, spec(prompt=p)) for p in ("one", "two", "three"))
        assert [a.recv_job().header.task_id for _ in range(2)] == [one, two]
        client.request(w.CancelTask(0, two))
        assert recv_command(a, w.CANCEL).header.task_id == two
        assert a.recv_job(timeout=1.0).header.task_id == three
    finally:
        next(parts, None)
