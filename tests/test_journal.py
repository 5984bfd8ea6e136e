"""The SQLite journal: durability of accepted tasks and results, purge."""

from __future__ import annotations

from pathlib import Path

from broker import protocol as p
from broker.journal import Journal
from broker.tasks import Task


def task(task_id: str, seq: int, state: str = p.QUEUED) -> Task:
    return Task(task_id=task_id, model="flux1-dev", mode="img2img", priority=seq % 2, seq=seq,
                params={"prompt": "猫", "seed": seq}, owner="k", image_names=["input_image"],
                inputs=[b"img-%d" % seq], state=state, created=100.0 + seq, deadline=400.0)


def test_unfinished_tasks_come_back_with_inputs(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    for i in range(3):
        j.add(task(f"t{i}", i))
    running = task("t1", 1, p.RUNNING)
    running.attempts = 1
    j.update(running)
    done = task("t2", 2, p.COMPLETED)
    done.finished, done.meta = 105.0, {"generation_time": 1.5}
    j.finish(done, b"PNG")
    j.close()

    j = Journal(tmp_path / "j.db")  # as after a crash and restart
    loaded = {t.task_id: t for t in j.load()}
    assert [t.state for t in loaded.values()] == [p.QUEUED, p.RUNNING, p.COMPLETED]
    assert loaded["t1"].attempts == 1 and loaded["t1"].inputs == [b"img-1"]
    assert loaded["t0"].params == {"prompt": "猫", "seed": 0} and loaded["t0"].image_names == ["input_image"]
    assert loaded["t2"].inputs == [] and loaded["t2"].meta == {"generation_time": 1.5}
    assert j.result("t2") == b"PNG" and j.result("t0") is None
    j.close()


def test_purge_removes_old_final_tasks_only(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    for i in range(3):
        j.add(task(f"t{i}", i))
    old = task("t0", 0, p.COMPLETED)
    old.finished = 10.0
    j.finish(old, b"old")
    new = task("t1", 1, p.FAILED)
    new.finished = 1000.0
    j.finish(new, None)
    assert j.purge(finished_before=500.0) == ["t0"]
    assert j.result("t0") is None
    assert {t.task_id for t in j.load()} == {"t1", "t2"}
    j.close()
