"""The broker's task table without sockets: accept, recover, hold, claim, deadlines."""

from __future__ import annotations

from pathlib import Path

from broker import protocol as p
from broker.journal import Journal
from broker.queue import TaskQueue
from broker.tasks import Task, TaskTable


def new(table: TaskTable, prio: int = 0, deadline: float = 100.0) -> Task:
    seq = table.next_seq()
    return Task(task_id=f"t{seq}", model="flux1-dev", mode="text2img", priority=prio, seq=seq,
                params={}, owner="k", created=0.0, deadline=deadline)


def test_recovery_holds_running_tasks_for_their_node(tmp_path: Path) -> None:
    table = TaskTable(Journal(tmp_path / "j.db"), TaskQueue())
    running, queued = new(table), new(table, prio=5)
    table.accept(running, 0.0)
    table.accept(queued, 0.0)
    table.queue.remove(running.task_id)
    running.state = p.RUNNING
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


def test_held_tasks_are_released_after_the_grace(tmp_path: Path) -> None:
    table = TaskTable(Journal(tmp_path / "j.db"), TaskQueue())
    task = new(table)
    table.accept(task, 0.0)
    table.queue.remove(task.task_id)
    task.state = p.RUNNING
    table.journal.update(task)
    table.recover(now=0.0, grace=3.0)  # as if the broker had restarted
    table.housekeeping(now=2.0, result_ttl=3600)
    assert table.queue.position(task.task_id) is None
    table.housekeeping(now=3.5, result_ttl=3600)
    assert table.queue.position(task.task_id) == 0


def test_overdue_and_unfinished_counts(tmp_path: Path) -> None:
    table = TaskTable(Journal(tmp_path / "j.db"), TaskQueue())
    soon, late = new(table, deadline=5.0), new(table, deadline=50.0)
    for t in (soon, late):
        table.accept(t, 0.0)
    assert [t.task_id for t in table.overdue(10.0)] == [soon.task_id]
    assert list(table.overdue(10.0)) == []  # reported once
    assert table.unfinished_for("k") == 2 and table.counts() == {p.QUEUED: 2}
    table.withdraw(late.task_id)
    assert late.task_id not in table.queue
    late.state, late.finished = p.CANCELLED, 11.0
    table.finish(late, None)
    assert table.unfinished_for("k") == 1 and table.unfinished_for("nobody") == 0
