"""Batching on real sockets with fake nodes: queued tasks that may share one pipeline call ride in one JOB.

A node that says `batch=N` in READY may get a JOB with up to N-1 riders: queued tasks of the
lead's priority with the same batch key (text2img, same model, size, steps, cfg, speed and
LoRAs; genserve.spec.batch_key). Each rider is a task like any other: it reports on its own,
a cancel reaches it alone, and a lost or recalled JOB brings every one of them back, a waiting
one without spending an attempt. No task is ever on two nodes.
"""

from __future__ import annotations

from typing import Any

import pytest

from genserve import errors as e
from genserve import wire as w
from genserve.spec import batch_key
from tests.conftest import wait_until
from tests.fakes import png_bytes
from tests.test_broker import spec, submit
from tests.test_prefetch import recv_command, view


def job_tasks(msg: w.Message) -> list[str]:
    """The tasks of one JOB, lead first."""
    return [msg.header.task_id, *(r.task_id for r in msg.header.riders)]


def runs(msg: w.Message) -> dict[str, str]:
    """Each task's run in one JOB, riders first (the order a node reports in: the lead's report frees its place)."""
    return {**{r.task_id: r.run for r in msg.header.riders}, msg.header.task_id: msg.header.run}


def backlog(parts: Any, count: int, batch: int = 3, prefetch: int = 0, batch_pixels: int = 0,
            **kw: Any) -> tuple[Any, ...]:
    """Node "a" (batch `batch`) runs task `first` alone; `count` more compatible tasks queue behind it."""
    bt, client, node = parts
    a = node("a").ready(batch=batch, prefetch=prefetch, batch_pixels=batch_pixels)
    wait_until(lambda: len(bt.broker.nodes) == 1, 5)
    first = submit(client, spec(**kw))
    msg = a.recv_job()
    assert job_tasks(msg) == [first], "a task that came to an idle node with an empty queue rides with nothing"
    queued = [submit(client, spec(prompt=f"p{i}", seed=i, **kw)) for i in range(count)]
    return bt, client, node, a, first, msg.header.run, queued


def test_queued_tasks_with_one_batch_key_share_a_job_and_each_completes_once(patient_parts) -> None:
    bt, client, _, a, first, run, queued = backlog(patient_parts, 4, batch=3)
    a.finish(first, run=run)
    msg = a.recv_job()
    assert job_tasks(msg) == queued[:3], "the node did not get the next tasks in queue order, as one JOB"
    assert [r.params.prompt for r in msg.header.riders] == ["p1", "p2"]  # each keeps its own prompt and seed
    assert [r.params.seed for r in msg.header.riders] == [1, 2]
    for task_id in queued[:3]:
        seen = view(client, task_id)
        assert (seen.status, seen.node_id, seen.attempts) == (w.RUNNING, "a", 1)
    assert view(client, queued[3]).status == w.QUEUED
    for task_id in queued[1:3]:
        a.finish(task_id, run=runs(msg)[task_id])
    assert a.recv_job(timeout=0.3) is None, "a rider's report freed the node's place"
    a.finish(queued[0], run=runs(msg)[queued[0]])
    last = a.recv_job()  # the lead's report freed the node: the fourth runs (nothing left to ride with it)
    assert job_tasks(last) == [queued[3]]
    a.finish(queued[3], run=last.header.run)
    wait_until(lambda: all(view(client, t).status == w.COMPLETED for t in queued), 5, what="every task")
    assert [view(client, t).attempts for t in queued] == [1, 1, 1, 1]
    assert all(bt.broker.journal.result(t) == png_bytes() for t in [first, *queued])


def test_only_tasks_that_can_share_the_call_ride_and_a_node_that_does_not_batch_gets_none(patient_parts) -> None:
    bt, client, node, a, first, run, _ = backlog(patient_parts, 0, batch=8)
    other_size = submit(client, spec(width=32))
    urgent = submit(client, spec(priority=-1))
    later = submit(client, spec(priority=1))
    img = submit_img2img(client)
    other_steps = submit(client, spec(num_inference_steps=8))
    fast = submit(client, spec(speed="fast"))
    same = [submit(client, spec(prompt="same", seed=s)) for s in (7, 8)]
    a.finish(first, run=run)
    msg = a.recv_job()
    assert job_tasks(msg) == [urgent], "a more urgent task rides with nothing of another priority"
    a.finish(urgent, run=msg.header.run)
    msg = a.recv_job()
    assert job_tasks(msg) == [other_size]  # alone: nothing queued shares its size
    a.finish(other_size, run=msg.header.run)
    msg = a.recv_job()
    assert job_tasks(msg) == [img]  # img2img never rides or leads a batch
    a.finish(img, run=msg.header.run)
    msg = a.recv_job()
    assert job_tasks(msg) == [other_steps]
    a.finish(other_steps, run=msg.header.run)
    msg = a.recv_job()
    assert job_tasks(msg) == [fast]
    a.finish(fast, run=msg.header.run)
    msg = a.recv_job()
    assert job_tasks(msg) == same, "the two tasks with one key did not share a call"
    assert later not in job_tasks(msg), "a task of a later priority rode ahead of its turn"
    assert batch_key("flux1-dev", "text2img", spec().params, False) != batch_key(
        "flux1-dev", "text2img", spec(cfg=4.0).params, False)
    assert batch_key("flux1-dev", "img2img", spec().params, True) is None
    # A node that does not batch (an older one says nothing) gets one task per JOB.
    b = node("b").ready()
    wait_until(lambda: len(bt.broker.nodes) == 2, 5)
    plain = [submit(client, spec(prompt="plain", seed=s)) for s in (1, 2)]
    got = b.recv_job()
    assert got.header.riders == [] and got.header.task_id in [later, *plain]


def test_images_larger_than_the_node_batches_run_alone(patient_parts) -> None:
    bt, client, _, a, first, run, queued = backlog(patient_parts, 2, batch=4, batch_pixels=32 * 32, width=48, height=48)
    a.finish(first, run=run)
    assert job_tasks(a.recv_job()) == queued[:1], "48x48 rode although the node batches up to 32x32 only"
    small = [submit(client, spec(width=32, height=32, seed=s)) for s in (1, 2)]
    a.finish(queued[0], run=bt.broker.tasks[queued[0]].run)
    assert job_tasks(a.recv_job()) == queued[1:2]
    a.finish(queued[1], run=bt.broker.tasks[queued[1]].run)
    assert job_tasks(a.recv_job()) == small  # at the size limit: they share a call


def submit_img2img(client: Any) -> str:
    return client.request(w.Submit(0, spec(mode="img2img"), "k", ["input_image"]), [png_bytes()]).header.task_id


def test_a_lost_node_puts_the_lead_and_its_riders_back_and_its_late_reports_change_nothing(patient_parts) -> None:
    bt, client, node, a, first, run, queued = backlog(patient_parts, 2, batch=3)
    a.finish(first, run=run)
    msg = a.recv_job()
    assert job_tasks(msg) == queued
    a.send(w.Disconnect("gone"))  # the node's process left mid-call
    wait_until(lambda: all(view(client, t).status == w.QUEUED for t in queued), 5, what="both back in line")
    b = node("b").ready(batch=3)
    again = b.recv_job()
    assert job_tasks(again) == queued, "the tasks did not come back together on the other node"
    assert [view(client, t).attempts for t in queued] == [2, 2]  # they ran: each attempt counts
    for task_id, task_run in runs(again).items():
        b.finish(task_id, png_bytes((1, 2, 3)), run=task_run)
    wait_until(lambda: all(view(client, t).status == w.COMPLETED for t in queued), 5)
    late = node("a2").ready()  # a stale report of the first assignment, from a node that came back
    for task_id, task_run in runs(msg).items():
        late.finish(task_id, png_bytes((9, 9, 9)), run=task_run)
    assert recv_command(late, w.RESULT_ACK) is not None
    assert all(bt.broker.journal.result(t) == png_bytes((1, 2, 3)) for t in queued)
    assert all(view(client, t).node_id == "b" for t in queued)


def test_a_cancelled_rider_is_stopped_on_its_node_and_the_others_complete(patient_parts) -> None:
    bt, client, _, a, first, run, queued = backlog(patient_parts, 3, batch=3)
    a.finish(first, run=run)
    msg = a.recv_job()
    lead, rider, other = job_tasks(msg)
    assert client.request(w.CancelTask(0, rider)).header.body.task.status == w.CANCELLED
    cancel = recv_command(a, w.CANCEL)
    assert cancel is not None and cancel.header.task_id == rider
    more = submit(client, spec(prompt="more"))
    assert a.recv_job(timeout=0.3) is None, "the node got work while its call still ran"
    a.error(rider, e.CANCELLED, run=runs(msg)[rider])  # the call ran on for the others
    assert a.recv_job(timeout=0.3) is None, "the cancelled rider's report freed its node"
    a.finish(other, run=runs(msg)[other])
    a.finish(lead, run=runs(msg)[lead])
    assert job_tasks(a.recv_job()) == [more]  # the call's end freed the node
    wait_until(lambda: view(client, lead).status == w.COMPLETED and view(client, other).status == w.COMPLETED, 5)
    assert view(client, rider).status == w.CANCELLED and bt.broker.journal.result(rider) is None


def waiting_batch(parts: Any, count: int) -> tuple[Any, ...]:
    """Node "a" (batch 3, prefetch 1) runs the second task; the next `count` wait on it as one JOB."""
    bt, client, node, a, first, run, queued = backlog(parts, count + 1, batch=3, prefetch=1)
    alone = a.recv_job()
    assert job_tasks(alone) == queued[:1], "a task sent to wait on a busy node as it came rides with nothing"
    a.finish(first, run=run)  # the waiting one runs now; the backlog behind it goes to wait together
    msg = a.recv_job()
    assert job_tasks(msg) == queued[1:1 + min(count, 3)], "the waiting JOB did not carry its riders"
    assert all(view(client, t).status == w.QUEUED for t in queued[1:])  # waiting, not started yet
    return bt, client, node, a, queued[0], alone.header.run, msg, queued[1:]


def test_a_recalled_waiting_job_brings_its_riders_back_without_spending_attempts(patient_parts) -> None:
    bt, client, node, a, running, run, msg, waiting = waiting_batch(patient_parts, 2)
    b = node("b").ready()  # an idle node that could run the lead now: the waiting JOB is recalled
    recall = recv_command(a, w.RECALL)
    assert recall is not None and recall.header.task_id == waiting[0]
    for task_id, task_run in runs(msg).items():  # the node gives back the whole JOB, unstarted
        a.error(task_id, e.RECALLED, run=task_run)
    on_b = job_tasks(b.recv_job())
    assert len(on_b) == 1 and on_b[0] in waiting  # b does not batch
    on_a = job_tasks(a.recv_job())  # the other waits on a again
    assert sorted(on_a + on_b) == sorted(waiting), "a recalled task was lost or sent twice"
    assert [view(client, t).attempts for t in waiting] == [1, 1]  # the recalled JOB's attempts were refunded


def test_a_cancelled_waiting_lead_keeps_its_place_until_its_node_reports_and_its_riders_return(patient_parts) -> None:
    bt, client, _, a, running, run, msg, waiting = waiting_batch(patient_parts, 3)
    lead, *riders = job_tasks(msg)
    assert client.request(w.CancelTask(0, lead)).header.body.task.status == w.CANCELLED
    assert recv_command(a, w.CANCEL).header.task_id == lead
    more = submit(client, spec(prompt="more"))
    assert a.recv_job(timeout=0.3) is None, "another job was sent to wait before the node said what it did"
    for rider in riders:  # it had not started: its riders are given back,
        a.error(rider, e.RECALLED, run=runs(msg)[rider])
    a.error(lead, e.CANCELLED, run=runs(msg)[lead])  # and the lead dropped
    again = a.recv_job()  # the waiting place is free again
    assert riders == waiting[1:] and job_tasks(again) == [*riders, more]  # back at their places in line
    assert [view(client, t).attempts for t in riders] == [1, 1]  # this JOB's only: the recalled one was refunded
    a.finish(running, run=run)
    wait_until(lambda: view(client, running).status == w.COMPLETED, 5)
    a.started(again.header.task_id, run=again.header.run)  # the node took it: every task of it started
    wait_until(lambda: all(view(client, t).status == w.RUNNING for t in job_tasks(again)), 5)


def test_a_waiting_lead_cancelled_after_it_started_keeps_the_node_busy_while_its_riders_run(patient_parts) -> None:
    bt, client, _, a, running, run, msg, waiting = waiting_batch(patient_parts, 2)
    lead, rider = job_tasks(msg)
    a.finish(running, run=run)  # the node took the waiting JOB as the call ended
    wait_until(lambda: view(client, rider).status == w.RUNNING, 5, what="the rider to start with its lead")
    assert client.request(w.CancelTask(0, lead)).header.body.task.status == w.CANCELLED
    assert recv_command(a, w.CANCEL).header.task_id == lead
    more = submit(client, spec(prompt="more"))
    assert a.recv_job(timeout=0.3) is None, "the node got work while its call ran on for the rider"
    a.finish(rider, run=runs(msg)[rider])
    a.error(lead, e.CANCELLED, run=runs(msg)[lead])
    assert job_tasks(a.recv_job()) == [more]
    wait_until(lambda: view(client, rider).status == w.COMPLETED, 5)


def test_a_node_that_re_registers_keeps_the_riders_it_reports_on(patient_parts) -> None:
    bt, client, node, a, first, run, queued = backlog(patient_parts, 2, batch=3)
    a.finish(first, run=run)
    msg = a.recv_job()
    lead, rider = job_tasks(msg)
    # The same node on a new connection (the broker fell silent for it): still running the call.
    a2 = node("a", identity=b"fake-a-2").ready(busy_task=lead, reports=[rider], batch=3)
    assert a2.recv_job(timeout=0.3) is None
    assert [view(client, t).status for t in (lead, rider)] == [w.RUNNING, w.RUNNING]
    a2.finish(rider, run=runs(msg)[rider])
    a2.finish(lead, run=runs(msg)[lead])
    wait_until(lambda: all(view(client, t).status == w.COMPLETED for t in (lead, rider)), 5)
    assert [view(client, t).attempts for t in (lead, rider)] == [1, 1]


def test_after_a_broker_restart_the_node_keeps_every_task_of_its_running_call(broker_factory, ctx) -> None:
    from http_front.broker_client import BrokerClient
    from tests.fakes import FakeNode

    bt = broker_factory()
    client = BrokerClient(bt.frontend, context=ctx).start()
    a = FakeNode(ctx, bt.backend, "a").ready(batch=3)
    try:
        wait_until(lambda: len(bt.broker.nodes) == 1, 5)
        first = submit(client, spec())
        first_run = a.recv_job().header.run
        queued = [submit(client, spec(seed=s)) for s in (1, 2)]
        a.finish(first, run=first_run)
        assert job_tasks(a.recv_job()) == queued
    finally:
        client.close()
    bt.close()
    bt2 = broker_factory(recovery_grace=0.2)  # its hold on the call's tasks runs out at once
    client = BrokerClient(bt2.frontend, context=ctx).start()
    b = FakeNode(ctx, bt2.backend, "b").ready(batch=3)  # an idle node that must get neither task
    a.close()
    a = FakeNode(ctx, bt2.backend, "a").ready(busy_task=queued[0], busy_riders=queued[1:], batch=3)
    try:
        wait_until(lambda: all(bt2.broker.tasks[t].node_id == "a" for t in queued), 5)
        for _ in range(8):  # well past the grace
            a.heartbeat(idle=False)
            b.heartbeat()
            assert b.recv_job(timeout=0.1) is None, "a task still running in the call was given to another node"
        assert [view(client, t).status for t in queued] == [w.RUNNING, w.RUNNING]
        for task_id in reversed(queued):
            a.finish(task_id)  # a resumed task takes the node's report whatever its run
        wait_until(lambda: all(view(client, t).status == w.COMPLETED for t in queued), 5)
        assert [view(client, t).attempts for t in queued] == [1, 1]
    finally:
        for n in (a, b):
            n.close()
        client.close()


def test_a_node_back_after_it_expired_keeps_what_is_still_in_line_and_is_told_to_stop_the_rest(parts) -> None:
    bt, client, node, a, first, run, queued = backlog(parts, 2, batch=3)
    a.finish(first, run=run)
    assert job_tasks(a.recv_job()) == queued
    wait_until(lambda: not bt.broker.nodes, 10, what="the silent node to expire")  # both go back in line
    assert [view(client, t).status for t in queued] == [w.QUEUED, w.QUEUED]
    assert client.request(w.CancelTask(0, queued[1])).header.body.task.status == w.CANCELLED
    a.ready(busy_task=queued[0], busy_riders=[queued[1]], batch=3)  # it ran on meanwhile
    cancel = recv_command(a, w.CANCEL)
    assert cancel is not None and cancel.header.task_id == queued[1]
    wait_until(lambda: view(client, queued[0]).status == w.RUNNING, 5)
    assert view(client, queued[0]).node_id == "a" and view(client, queued[0]).attempts == 1
    a.error(queued[1], e.CANCELLED)
    a.finish(queued[0])
    wait_until(lambda: view(client, queued[0]).status == w.COMPLETED, 5)


def test_a_cancelled_rider_given_back_while_its_node_unwinds_does_not_free_the_node(patient_parts) -> None:
    bt, client, node, a, running, run, msg, waiting = waiting_batch(patient_parts, 3)
    lead, r1, r2 = job_tasks(msg)
    client.request(w.CancelTask(0, running))  # the node unwinds it: busy until it says so
    assert recv_command(a, w.CANCEL).header.task_id == running
    client.request(w.CancelTask(0, r1))
    assert recv_command(a, w.CANCEL).header.task_id == r1
    node("b").ready()  # an idle node that could run the waiting lead: it is recalled
    assert recv_command(a, w.RECALL).header.task_id == lead
    a.error(r1, e.CANCELLED, run=runs(msg)[r1])
    a.error(r2, e.RECALLED, run=runs(msg)[r2])
    a.error(lead, e.RECALLED, run=runs(msg)[lead])
    assert a.recv_job(timeout=0.3) is None, "the node got work while it still unwound its cancelled task"
    a.error(running, e.CANCELLED, run=run)  # now it is free
    assert set(job_tasks(a.recv_job())) <= {lead, r2}
    assert view(client, r1).status == w.CANCELLED


def test_a_node_that_took_its_waiting_job_while_away_has_it_running_not_waiting(patient_parts) -> None:
    bt, client, node, a, running, run, msg, waiting = waiting_batch(patient_parts, 2)
    lead, rider = job_tasks(msg)
    # The same process on a new connection: it finished the first call and took the waiting one.
    a2 = node("a", identity=b"fake-a-2").ready(busy_task=lead, busy_riders=[rider], reports=[running], batch=3,
                                                prefetch=1)
    wait_until(lambda: all(view(client, t).status == w.RUNNING for t in (lead, rider)), 5,
               what="the call's tasks to count as started")
    node("b").ready()
    assert recv_command(a2, w.RECALL, timeout=0.3) is None, "a started job was recalled"
    a2.finish(running)
    a2.finish(rider, run=runs(msg)[rider])
    a2.finish(lead, run=runs(msg)[lead])
    wait_until(lambda: all(view(client, t).status == w.COMPLETED for t in (running, lead, rider)), 5)


def test_a_node_back_with_a_call_whose_lead_was_cancelled_stays_busy_until_that_call_reports(
        patient_parts) -> None:
    bt, client, node, a, running, run, msg, waiting = waiting_batch(patient_parts, 2)
    lead, rider = job_tasks(msg)
    a.finish(running, run=run)  # the waiting JOB runs now
    wait_until(lambda: view(client, rider).status == w.RUNNING, 5)
    nxt = [submit(client, spec(seed=7))]
    behind = a.recv_job()  # it waits behind the call
    assert job_tasks(behind) == nxt
    client.request(w.CancelTask(0, lead))  # the call runs on for its rider
    assert recv_command(a, w.CANCEL).header.task_id == lead
    # It registers again on the same connection (as after a restarted broker's DISCONNECTs): it still runs
    # the call, and gives back the waiting JOB.
    a2 = a.ready(busy_task=lead, busy_riders=[rider], reports=nxt, batch=3, prefetch=1)
    for task_id, task_run in runs(behind).items():
        a2.error(task_id, e.RECALLED, run=task_run)
    got = a2.recv_job()  # it may wait behind the call, never run as if the node were free
    assert got is not None and all(view(client, t).status == w.QUEUED for t in job_tasks(got))
    a2.finish(rider, run=runs(msg)[rider])
    a2.error(lead, e.CANCELLED, run=runs(msg)[lead])
    wait_until(lambda: all(view(client, t).status == w.RUNNING for t in job_tasks(got)), 5,
               what="the waiting JOB to start once the call ended")
    assert view(client, rider).status == w.COMPLETED


def test_a_node_back_with_a_call_one_of_whose_tasks_runs_elsewhere_is_told_to_stop_all_of_it(parts) -> None:
    bt, client, node, a, first, run, queued = backlog(parts, 2, batch=3)
    a.finish(first, run=run)
    assert job_tasks(a.recv_job()) == queued
    wait_until(lambda: not bt.broker.nodes, 10, what="the silent node to expire")  # both go back in line
    b = node("b").ready()  # b does not batch
    assert job_tasks(b.recv_job()) == queued[:1]
    a.ready(busy_task=queued[0], busy_riders=[queued[1]], batch=3)  # a ran on meanwhile
    stops = {recv_command(a, w.CANCEL).header.task_id for _ in queued}
    assert stops == set(queued), "a call that runs on for one task keeps computing the other twice"
    assert view(client, queued[1]).node_id != "a"  # still in line (or on b), not resumed on a
    b.heartbeat()


def test_a_node_back_idle_with_only_rider_reports_to_come_gets_work_at_once(patient_parts) -> None:
    bt, client, _, a, first, run, queued = backlog(patient_parts, 2, batch=3)
    a.finish(first, run=run)
    msg = a.recv_job()
    lead, rider = job_tasks(msg)
    a.finish(lead, run=runs(msg)[lead])  # the call ended; its rider's report is still on its way
    a.ready(reports=[rider], batch=3)  # registers again, idle
    more = submit(client, spec(prompt="more", width=32))
    assert job_tasks(a.recv_job()) == [more], "an idle node waited for an idle heartbeat"
    a.finish(rider, run=runs(msg)[rider])
    wait_until(lambda: view(client, rider).status == w.COMPLETED, 5)


def test_two_idle_nodes_do_not_both_count_on_one_urgent_task_and_start_a_less_urgent_one(patient_parts) -> None:
    bt, client, node, a, running, run, msg, waiting = waiting_batch(patient_parts, 2)
    lead, rider = job_tasks(msg)  # priority 0, waiting on a
    lesser = submit(client, spec(priority=1))
    b = node("b").ready()  # idle: the waiting JOB is recalled for it
    assert recv_command(a, w.RECALL).header.task_id == lead
    c = node("c").ready()  # idle too: it waits for the recall as well
    wait_until(lambda: len(bt.broker.nodes) == 3, 5)
    a.error(rider, e.RECALLED, run=runs(msg)[rider])  # the rider comes back first
    assert job_tasks(b.recv_job()) == [rider]
    assert c.recv_job(timeout=0.3) is None, "a less urgent task started while a more urgent one was on its way back"
    a.error(lead, e.RECALLED, run=runs(msg)[lead])
    assert job_tasks(c.recv_job()) == [lead]
    assert view(client, lesser).status == w.QUEUED


def test_riders_of_a_cancelled_waiting_lead_still_hold_back_less_urgent_work_elsewhere(patient_parts) -> None:
    bt, client, node = patient_parts
    a, b = node("a").ready(batch=3, prefetch=1), node("b").ready()  # b takes no waiting job for now
    wait_until(lambda: len(bt.broker.nodes) == 2, 5)
    first, second = submit(client, spec(prompt="one")), submit(client, spec(prompt="two"))
    on_a, on_b = a.recv_job(), b.recv_job()
    assert sorted([on_a.header.task_id, on_b.header.task_id]) == sorted([first, second])
    alone, lead, *riders = [submit(client, spec(prompt=f"p{i}", seed=i)) for i in range(4)]
    assert job_tasks(a.recv_job()) == [alone]
    a.finish(on_a.header.task_id, run=on_a.header.run)  # alone runs now; the three behind it wait as one JOB
    msg = a.recv_job()
    assert job_tasks(msg) == [lead, *riders]
    assert client.request(w.CancelTask(0, lead)).header.body.task.status == w.CANCELLED
    assert recv_command(a, w.CANCEL).header.task_id == lead  # its riders still wait on a, unstarted
    b.ready(busy_task=on_b.header.task_id, prefetch=1)  # b now has room for a waiting job
    wait_until(lambda: bt.broker.nodes.find("b").prefetch == 1, 5)
    later = submit(client, spec(prompt="later", priority=5))
    assert b.recv_job(timeout=0.5) is None, "a less urgent task waits on b while the riders wait unstarted on a"
    for rider in riders:  # a gives the riders back: they may wait on b now, before the later task
        a.error(rider, e.RECALLED, run=runs(msg)[rider])
    assert b.recv_job().header.task_id in riders
    assert view(client, later).status == w.QUEUED


@pytest.mark.parametrize("busy", [False, True], ids=["idle nodes", "waiting places"])
@pytest.mark.parametrize("batches, count, sizes", [((4, 4), 5, [2, 3]), ((8, 2), 10, [2, 8])],
                         ids=["equal room", "unequal room"])
def test_tasks_that_come_back_together_are_shared_between_the_nodes_that_can_take_them(
        patient_parts, busy: bool, batches: tuple[int, int], count: int, sizes: list[int]) -> None:
    bt, client, node = patient_parts
    c = node("c").ready(batch=count)
    wait_until(lambda: len(bt.broker.nodes) == 1, 5)
    first = submit(client, spec())
    assert job_tasks(c.recv_job()) == [first]
    together = [submit(client, spec(prompt=f"p{i}", seed=i)) for i in range(count)]
    c.finish(first)
    assert job_tasks(c.recv_job()) == together  # one call of them all on c
    a, b = (node(name).ready(batch=batch, prefetch=1) for name, batch in zip("ab", batches))
    wait_until(lambda: len(bt.broker.nodes) == 3, 5)
    if busy:  # each runs something: they can only wait on them
        long = [submit(client, spec(prompt="long", width=32)) for _ in range(2)]
        assert sorted(job_tasks(a.recv_job()) + job_tasks(b.recv_job())) == sorted(long)
    c.send(w.Disconnect("stopping"))  # they come back at once
    calls = [job_tasks(n.recv_job()) for n in (a, b)]
    # Shared by room (3 and 2 on equal nodes, not 4 and 1), and none left behind while there is room.
    assert sorted(map(len, calls)) == sizes, "the tasks were not shared by the nodes' room"
    assert sorted(calls[0] + calls[1]) == sorted(together)
