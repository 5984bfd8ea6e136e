"""The journal: durability of accepted tasks and results, purge, disk given back, crash repair."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from broker.journal import Journal
from broker.tasks import Task
from genserve import errors as e
from genserve import wire as w
from tests.fakes import params

# Parameters as a GS1 journal stored them: a plain map, cfg None meaning "the mode's default".
GS1_PARAMS = {"prompt": "x", "width": 16, "height": 16, "num_inference_steps": 2, "seed": 1, "cfg": None,
              "strength": 0.8, "controlnet_type": None, "loras": []}


def task(task_id: str, seq: int, state: str = w.QUEUED) -> Task:
    return Task(task_id=task_id, model="flux1-dev", mode="img2img", priority=seq % 2, seq=seq,
                params=params(prompt="猫", seed=seq), owner="k", image_names=["input_image"],
                inputs=[b"img-%d" % seq], state=state, created=100.0 + seq, deadline=400.0)


def test_unfinished_tasks_come_back_with_inputs(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    for i in range(3):
        j.add(task(f"t{i}", i))
    running = task("t1", 1, w.RUNNING)
    running.attempts = 1
    j.update(running)
    done = task("t2", 2, w.COMPLETED)
    done.finished, done.meta = 105.0, w.ResultMeta(1.5, 16, 16, 1, 2, "cpu")
    j.finish(done, b"PNG")
    j.close()

    j = Journal(tmp_path / "j.db")  # as after a crash and restart
    loaded = {t.task_id: t for t in j.load()}
    assert [t.state for t in loaded.values()] == [w.QUEUED, w.RUNNING, w.COMPLETED]
    assert loaded["t1"].attempts == 1 and loaded["t1"].inputs == [b"img-1"]
    assert loaded["t0"].params == params(prompt="猫", seed=0) and loaded["t0"].image_names == ["input_image"]
    assert loaded["t2"].inputs == [] and loaded["t2"].meta == w.ResultMeta(1.5, 16, 16, 1, 2, "cpu")
    assert j.result("t2") == b"PNG" and j.result("t0") is None
    j.close()


def test_a_tasks_fair_share_weight_survives_a_restart_and_old_journals_read_as_weight_1(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    heavy = task("w", 1)
    heavy.weight = 4.0
    j.add(heavy)
    j.close()

    def weights() -> list[float]:
        journal = Journal(tmp_path / "j.db")
        try:
            return [t.weight for t in journal.load()]
        finally:
            journal.close()

    assert weights() == [4.0]
    db = sqlite3.connect(tmp_path / "j.db")
    db.execute("ALTER TABLE tasks DROP COLUMN weight")  # a journal from before fair share
    db.commit()
    db.close()
    assert weights() == [1.0]


def test_the_node_a_task_runs_on_survives_a_restart_and_old_journals_read_as_none(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    running = task("r", 1)
    j.add(running)
    running.state, running.node_id = w.RUNNING, "gpu-3"
    j.update(running)
    j.close()

    def node_ids() -> list[str | None]:
        journal = Journal(tmp_path / "j.db")
        try:
            return [t.node_id for t in journal.load()]
        finally:
            journal.close()

    assert node_ids() == ["gpu-3"]
    db = sqlite3.connect(tmp_path / "j.db")
    db.execute("ALTER TABLE tasks DROP COLUMN node_id")  # a journal from before tasks were held per node
    db.commit()
    db.close()
    assert node_ids() == [None]


def test_purge_removes_old_final_tasks_only(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    for i in range(3):
        j.add(task(f"t{i}", i))
    old = task("t0", 0, w.COMPLETED)
    old.finished = 10.0
    j.finish(old, b"old")
    new = task("t1", 1, w.FAILED)
    new.finished = 1000.0
    j.finish(new, None)
    assert j.purge(finished_before=500.0) == ["t0"]
    assert j.result("t0") is None
    assert {t.task_id for t in j.load()} == {"t1", "t2"}
    j.close()


def rows_seen_by_another_connection(path: Path) -> set[str]:
    """Task ids committed, as a second reader sees them."""
    db = sqlite3.connect(path)
    try:
        return {r[0] for r in db.execute("SELECT task_id FROM tasks")}
    finally:
        db.close()


def test_a_batch_commits_its_writes_together_and_deletes_files_only_after(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    j.add(task("t0", 0))
    with j.batch():
        j.add(task("t1", 1))
        done = task("t0", 0, w.COMPLETED)
        done.finished = 10.0
        j.finish(done, b"png")  # a multi-statement change joins the batch
        assert rows_seen_by_another_connection(tmp_path / "j.db") == {"t0"}  # t1 not committed yet
        assert (j.blob_dir / "t1.in0").exists() and (j.blob_dir / "t0.result").exists()  # files first
        assert (j.blob_dir / "t0.in0").exists()  # the row that stops naming it may still roll back
        assert j.purge(finished_before=500.0) == ["t0"]  # compaction waits for the commit
        assert (j.blob_dir / "t0.result").exists()
    assert rows_seen_by_another_connection(tmp_path / "j.db") == {"t1"}
    assert not (j.blob_dir / "t0.in0").exists() and not (j.blob_dir / "t0.result").exists()
    j.close()


def test_what_a_failing_batch_wrote_is_committed_as_memory_already_holds_it(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    with pytest.raises(RuntimeError), j.batch():
        j.add(task("t1", 1))
        with j.batch():  # nested: part of the outer one
            j.add(task("t2", 2))
        raise RuntimeError("one handler failed")
    assert rows_seen_by_another_connection(tmp_path / "j.db") == {"t1", "t2"}
    j.add(task("t3", 3))  # autocommit again after the batch
    assert rows_seen_by_another_connection(tmp_path / "j.db") == {"t1", "t2", "t3"}
    j.close()


def disk(folder: Path) -> int:
    """Apparent bytes of every file under `folder`."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def completed(j: Journal, task_id: str, seq: int, finished: float, result: bytes) -> None:
    j.add(task(task_id, seq))
    done = task(task_id, seq, w.COMPLETED)
    done.finished = finished
    j.finish(done, result)


def test_disk_space_is_given_back_after_purge(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    for i in range(40):
        completed(j, f"t{i}", i, 10.0 + i, bytes([i]) * 50_000)
    peak = disk(tmp_path)
    assert peak > 40 * 50_000 and j.result_bytes == 40 * 50_000 and j.input_bytes == 0
    assert len(list(j.blob_dir.iterdir())) == 40  # inputs went when their tasks finished
    assert len(j.purge(finished_before=1000.0)) == 40
    assert j.blob_bytes == 0 and list(j.blob_dir.iterdir()) == []
    assert disk(tmp_path) < 200_000  # rows only, the WAL truncated
    assert (tmp_path / "j.db-wal").stat().st_size == 0
    j.close()


def test_evicting_results_takes_the_oldest_first_and_keeps_the_task(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    for i, finished in enumerate((30.0, 10.0, 20.0)):
        completed(j, f"t{i}", i, finished, b"r" * 1000)
    assert j.evict_results(1001) == ["t1", "t2"]  # finished at 10, then 20
    assert j.result("t1") is None and j.result("t2") is None and j.result("t0") == b"r" * 1000
    assert j.result_bytes == 1000 and j.evict_results(1) == ["t0"] and j.evict_results(1) == []
    j.close()
    loaded = {t.task_id: t for t in Journal(tmp_path / "j.db").load()}
    assert all(t.state == w.COMPLETED and t.result_expired for t in loaded.values())
    assert loaded["t0"].view().result_expired is True


def test_reopening_deletes_files_left_by_a_crash_and_repairs_missing_ones(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    for i in range(4):
        j.add(task(f"t{i}", i))
    completed(j, "t4", 4, 50.0, b"kept")
    completed(j, "t5", 5, 51.0, b"lost")
    j.close()
    blobs = tmp_path / "blobs"
    (blobs / "t0.in0").unlink()  # lost in a power cut: its queued task cannot run
    (blobs / "t5.result").unlink()
    (blobs / "t1.result").write_bytes(b"crash between the file and the row")
    (blobs / "gone.in0").write_bytes(b"crash between the file and the INSERT")
    (blobs / "t4.in0").write_bytes(b"crash between the finish and the unlink")
    (blobs / "t2.in0.tmp").write_bytes(b"crash while writing")

    j = Journal(tmp_path / "j.db")
    assert sorted(f.name for f in blobs.iterdir()) == ["t1.in0", "t2.in0", "t3.in0", "t4.result"]
    assert j.blob_bytes == disk(blobs) == 3 * len(b"img-1") + len(b"kept")
    loaded = {t.task_id: t for t in j.load()}
    assert loaded["t0"].state == w.FAILED and loaded["t0"].error_code == e.GENERATION
    assert loaded["t1"].state == w.QUEUED and loaded["t1"].inputs == [b"img-1"]
    assert loaded["t5"].result_expired and j.result("t5") is None and j.result("t4") == b"kept"
    j.close()


def test_a_journal_with_images_in_sqlite_is_migrated_to_files(tmp_path: Path) -> None:
    old = sqlite3.connect(str(tmp_path / "j.db"), isolation_level=None)
    old.executescript(
        "PRAGMA journal_mode=WAL;"
        "CREATE TABLE tasks (task_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, priority INTEGER NOT NULL,"
        " model TEXT NOT NULL, mode TEXT NOT NULL, owner TEXT NOT NULL, state TEXT NOT NULL,"
        " params BLOB NOT NULL, image_names BLOB NOT NULL, created REAL NOT NULL, started REAL,"
        " finished REAL, deadline REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, error_code TEXT,"
        " error TEXT, meta BLOB);"
        "CREATE TABLE blobs (task_id TEXT NOT NULL, kind TEXT NOT NULL, idx INTEGER NOT NULL,"
        " data BLOB NOT NULL, PRIMARY KEY (task_id, kind, idx));")
    names = msgpack.packb(["input_image", "mask_image"])
    for task_id, state, finished in (("q", w.QUEUED, None), ("c", w.COMPLETED, 5.0)):
        old.execute("INSERT INTO tasks (task_id, seq, priority, model, mode, owner, state, params,"
                    " image_names, created, finished, deadline) VALUES (?,1,0,'flux1-dev','fill','k',?,?,?,1,?,99)",
                    (task_id, state, msgpack.packb(GS1_PARAMS), names, finished))
    old.executemany("INSERT INTO blobs VALUES (?,?,?,?)",
                    [("q", "input", 0, b"image"), ("q", "input", 1, b"mask"), ("c", "result", 0, b"PNG")])
    old.close()

    j = Journal(tmp_path / "j.db")
    loaded = {t.task_id: t for t in j.load()}
    assert loaded["q"].inputs == [b"image", b"mask"] and j.result("c") == b"PNG"
    assert j.input_bytes == 9 and j.result_bytes == 3
    assert j._db.execute("SELECT name FROM sqlite_master WHERE name='blobs'").fetchone() is None
    assert j._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental from now on
    j.close()


def test_a_journal_killed_with_sigkill_reopens_with_every_accepted_task(tmp_path: Path) -> None:
    script = f"""
import os, signal
from pathlib import Path
from genserve import errors as e
from genserve import wire as w
from tests.test_journal import task
from broker.journal import Journal
j = Journal(Path({str(tmp_path / "j.db")!r}))
for i in range(20):
    j.add(task(f"t{{i}}", i))
for i in range(10):
    t = task(f"t{{i}}", i, w.COMPLETED)
    t.finished = 50.0 + i
    j.finish(t, b"PNG-%d" % i)
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == -signal.SIGKILL
    j = Journal(tmp_path / "j.db")
    loaded = {t.task_id: t for t in j.load()}
    states = [t.state for t in loaded.values()]
    assert len(loaded) == 20 and states.count(w.COMPLETED) == 10 and states.count(w.QUEUED) == 10
    assert all(loaded[f"t{i}"].inputs == [b"img-%d" % i] for i in range(10, 20))
    assert all(j.result(f"t{i}") == b"PNG-%d" % i for i in range(10))
    assert j.blob_bytes == sum(f.stat().st_size for f in j.blob_dir.iterdir())
    j.close()


def test_files_are_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = Journal(tmp_path / "j.db")
    j._write("t1.result", b"first")
    j._write("t1.result", b"second")  # a file a row may name is replaced, never rewritten in place
    assert (j.blob_dir / "t1.result").read_bytes() == b"second" and sorted(os.listdir(j.blob_dir)) == ["t1.result"]

    def disk_full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError):
        j._write("t2.in0", b"input")
    assert sorted(os.listdir(j.blob_dir)) == ["t1.result"]  # no partial file left behind
    monkeypatch.undo()
    j.close()
