"""The broker's task table without sockets: accept, recover, hold, claim, deadlines."""

from __future__ import annotations

from pathlib import Path

from broker.journal import Journal
from broker.queue import TaskQueue
from broker.tasks import Task, TaskTable, result_reserve
from genserve import wire as w
from tests.fakes import params


def new(table: TaskTable, prio: int = 0, deadline: float = 100.0) -> Task:
    seq = table.next_seq()
    return Task(task_id=f"t{seq}", model="flux1-dev", mode="text2img", priority=prio, seq=seq,
                params=params(), owner="k", created=0.0, deadline=deadline)


def test_recovery_holds_running_tasks_for_their_node(tmp_path: Path) -> None:
    table = TaskTable(Journal(tmp_path / "j.db"), TaskQueue())
    running, queued = new(table), new(table, prio=5)
    table.accept(running, 0.0)
    table.accept(queued, 0.0)
    table.queue.remove(running.task_id)
    running.state = w.RUNNING
    table.journal.update(running)
    table.journal.close()

    after = TaskTable(Journal(tmp_path / "j.db"), TaskQueue())
    after.recover(now=10.0, grace=3.0)
    assert after.unfinished_for("k") == 2
    assert after.next_seq() == 3  # sequence continues
    assert after.queue.peek_for(["flux1-dev"]).task_id == queued.task_id  # the running one is held
    assert after.claim(running.task_id) is not None  # its node came back and keeps it
    assert after.claim(running.task_id) is None
    after.journal.close()


def running_on(table: TaskTable, node_id: str) -> Task:
    """A new task, accepted and started on `node_id`, as the journal records it."""
    task = new(table)
    table.accept(task, 0.0)
    table.queue.take(task.task_id)
    task.state, task.node_id = w.RUNNING, node_id
    table.update(task)
    return task


def test_held_tasks_are_released_after_the_grace(tmp_path: Path) -> None:
    table = TaskTable(Journal(tmp_path / "j.db"), TaskQueue())
    task = new(table)
    table.accept(task, 0.0)
    table.queue.remove(task.task_id)
    task.state = w.RUNNING
    table.journal.update(task)
    table.recover(now=0.0, grace=3.0)  # as if the broker had restarted
    table.housekeeping(now=2.0, result_ttl=3600)
    assert table.queue.position(task.task_id) is None
    table.housekeeping(now=3.5, result_ttl=3600)
    assert table.queue.position(task.task_id) == 0


def test_a_held_task_belongs_to_the_node_that_ran_it_until_released(tmp_path: Path) -> None:
    table = TaskTable(Journal(tmp_path / "j.db"), TaskQueue())
    first, second = running_on(table, "a"), running_on(table, "b")
    table.journal.close()

    after = TaskTable(Journal(tmp_path / "j.db"), TaskQueue())
    after.recover(now=0.0, grace=3.0)
    assert after.held_for("a") == [first.task_id] and after.held_for("b") == [second.task_id]
    assert after.tasks[first.task_id].node_id is None  # a held task runs nowhere
    assert after.take_held(first.task_id, "b") is None  # only its own node may report it
    assert after.take_held(first.task_id, "a") is after.tasks[first.task_id]
    assert after.held_for("a") == [] and after.queue.position(first.task_id) is None
    after.release(second.task_id, now=1.0)  # b came back without it
    assert after.held_for("b") == [] and after.queue.position(second.task_id) == 0
    after.release(second.task_id, now=1.0)  # only once
    assert len(after.queue) == 1
    after.journal.close()


def test_the_recovery_grace_runs_from_when_the_broker_serves(tmp_path: Path) -> None:
    table = TaskTable(Journal(tmp_path / "j.db"), TaskQueue())
    task = running_on(table, "a")
    table.recover(now=0.0, grace=3.0)
    table.hold_until(50.0 + 3.0)  # a slow start: loading took 50 s
    table.housekeeping(now=10.0, result_ttl=3600)
    assert table.held_for("a") == [task.task_id]
    table.housekeeping(now=53.5, result_ttl=3600)
    assert table.held_for("a") == [] and table.queue.position(task.task_id) == 0


def test_a_requeued_task_keeps_its_fair_share_place(tmp_path: Path) -> None:
    table = TaskTable(Journal(tmp_path / "j.db"), TaskQueue())
    mine = [new(table) for _ in range(3)]
    other = new(table)
    other.owner = "other"
    for task in mine + [other]:
        table.accept(task, 0.0)
    assert table.queue.position(other.task_id) == 1  # behind mine[0] only: the keys take turns
    table.queue.take(mine[0].task_id)  # it starts; then its node dies
    table.enqueue(mine[0], 1.0)
    assert table.queue.position(mine[0].task_id) == 0
    table.journal.close()


def test_overdue_and_unfinished_counts(tmp_path: Path) -> None:
    table = TaskTable(Journal(tmp_path / "j.db"), TaskQueue())
    soon, late = new(table, deadline=5.0), new(table, deadline=50.0)
    for t in (soon, late):
        table.accept(t, 0.0)
    assert [t.task_id for t in table.overdue(10.0)] == [soon.task_id]
    assert list(table.overdue(10.0)) == []  # reported once
    assert table.unfinished_for("k") == 2 and table.counts() == {w.QUEUED: 2}
    table.withdraw(late.task_id)
    assert late.task_id not in table.queue
    late.state, late.finished = w.CANCELLED, 11.0
    table.finish(late, None)
    assert table.unfinished_for("k") == 1 and table.unfinished_for("nobody") == 0


SMALL = {"width": 16, "height": 16}
RESERVE = result_reserve(params(**SMALL))  # disk held for each unfinished 16x16 task's result


def done(table: TaskTable, result: bytes, finished: float, inputs: list[bytes] | None = None) -> Task:
    task = small(table, inputs)
    table.accept(task, 0.0)
    table.withdraw(task.task_id)
    task.state, task.finished = w.COMPLETED, finished
    table.finish(task, result)
    return task


def small(table: TaskTable, inputs: list[bytes] | None = None) -> Task:
    task = new(table)
    task.params, task.inputs = params(**SMALL), list(inputs or [])
    task.image_names = ["input_image"] * len(task.inputs)
    return task


def test_over_the_disk_budget_the_oldest_finished_results_go_first(tmp_path: Path) -> None:
    table = TaskTable(Journal(tmp_path / "j.db"), TaskQueue())
    budget = 3 * 1000 + RESERVE + 500
    first, second, third = (done(table, b"r" * 1000, finished) for finished in (1.0, 2.0, 3.0))
    waiting = small(table, [b"i" * 500])
    assert table.make_room(waiting, budget)  # fits exactly: nothing evicted
    table.accept(waiting, 0.0)
    assert table.disk_used == budget and not first.result_expired
    assert table.make_room(small(table), budget)  # needs RESERVE bytes: the two oldest results
    assert first.result_expired and second.result_expired and not third.result_expired
    assert table.journal.result(first.task_id) is None and table.journal.result(third.task_id) == b"r" * 1000
    assert first.view().result_expired is True and third.view().result_expired is False
    assert table.get(first.task_id).state == w.COMPLETED  # still known as completed


def test_a_task_that_cannot_fit_is_refused_and_evicts_nothing(tmp_path: Path) -> None:
    table = TaskTable(Journal(tmp_path / "j.db"), TaskQueue())
    budget = 2 * RESERVE + 50
    oldest = done(table, b"r" * 100, 1.0)
    for _ in range(2):
        t = small(table)
        assert table.make_room(t, budget)
        table.accept(t, 0.0)
    assert oldest.result_expired  # the second one needed its room
    assert not table.make_room(small(table), budget)  # only unfinished tasks hold the disk
    done(table, b"r" * 10, 2.0)
    assert not table.make_room(small(table, [b"i" * 10]), budget)  # evicting 10 bytes would not do
    assert table.journal.result_bytes == 10  # so nothing was evicted
    assert table.make_room(small(table), 0)  # 0: no budget


def test_finishing_releases_the_reservation_and_recovery_restores_the_accounting(tmp_path: Path) -> None:
    table = TaskTable(Journal(tmp_path / "j.db"), TaskQueue())
    queued, running = small(table, [b"i" * 300]), small(table)
    for t in (queued, running):
        table.accept(t, 0.0)
    finished = done(table, b"r" * 700, 1.0, [b"i" * 200])
    assert table.disk_used == 300 + 700 + 2 * RESERVE
    table.journal.close()

    after = TaskTable(Journal(tmp_path / "j.db"), TaskQueue())
    after.recover(now=10.0, grace=3.0)
    assert after.disk_used == 300 + 700 + 2 * RESERVE
    assert after.get(queued.task_id).inputs == [b"i" * 300]
    after.trim(700 + 2 * RESERVE)  # the budget shrank across the restart
    assert after.get(finished.task_id).result_expired and after.disk_used == 300 + 2 * RESERVE
    task = after.get(queued.task_id)
    after.withdraw(task.task_id)
    task.state, task.finished = w.CANCELLED, 11.0
    after.finish(task, None)
    assert after.disk_used == RESERVE and after.journal.blob_bytes == 0
    after.journal.close()


def test_job_cost_counts_text_tokens_and_a_fixed_share() -> None:
    from broker.tasks import job_cost

    standard = job_cost(params(width=1024, height=1024, num_inference_steps=28))
    tiny = job_cost(params(width=16, height=16, num_inference_steps=1))
    small = job_cost(params(width=256, height=256, num_inference_steps=28))
    assert 1.0 <= standard <= 1.05 and tiny >= 0.02
    assert small > 0.1 * standard  # its 512 text tokens per step are paid for, not only its 256 image tokens
