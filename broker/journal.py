"""The broker's task journal: SQLite in WAL mode in the data dir.

Every accepted task is written here before the front gets its ACK, with its
input images, so that a broker killed with -9 re-queues what it had accepted.
Results are stored here too (the broker keeps no result bytes in memory) and
purged after the retention time. ``synchronous=NORMAL`` in WAL mode survives a
process crash without an fsync per task; only a power loss can drop the last
transactions, which is the trade-off every WAL-mode service makes.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import msgpack

from broker.protocol import COMPLETED, QUEUED, RUNNING
from broker.tasks import Task

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, priority INTEGER NOT NULL,
    model TEXT NOT NULL, mode TEXT NOT NULL, owner TEXT NOT NULL, state TEXT NOT NULL,
    params BLOB NOT NULL, image_names BLOB NOT NULL,
    created REAL NOT NULL, started REAL, finished REAL, deadline REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, error_code TEXT, error TEXT, meta BLOB
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state);
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks(finished);
CREATE TABLE IF NOT EXISTS blobs (
    task_id TEXT NOT NULL, kind TEXT NOT NULL, idx INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (task_id, kind, idx)
);
"""


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(data: bytes | None) -> Any:
    return msgpack.unpackb(data, raw=False) if data else None


class Journal:
    """Durable task table and result store owned by the broker thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # Built on the starting thread, then used only by the broker thread.
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def add(self, task: Task) -> None:
        """Record an accepted task and its input images in one transaction."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT INTO tasks (task_id, seq, priority, model, mode, owner, state, params,"
                " image_names, created, deadline) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (task.task_id, task.seq, task.priority, task.model, task.mode, task.owner,
                 task.state, _pack(task.params), _pack(task.image_names), task.created,
                 task.deadline),
            )
            self._db.executemany(
                "INSERT INTO blobs (task_id, kind, idx, data) VALUES (?, 'input', ?, ?)",
                [(task.task_id, i, data) for i, data in enumerate(task.inputs)],
            )

    def update(self, task: Task) -> None:
        """Persist a task's state change."""
        self._db.execute(
            "UPDATE tasks SET state=?, started=?, finished=?, attempts=?, error_code=?, error=?,"
            " meta=? WHERE task_id=?",
            (task.state, task.started, task.finished, task.attempts, task.error_code,
             task.error, _pack(task.meta) if task.meta else None, task.task_id),
        )

    def finish(self, task: Task, result: bytes | None) -> None:
        """Persist a final state; store the result image and drop the inputs."""
        with self._db:
            self._db.execute("BEGIN")
            self.update(task)
            self._db.execute("DELETE FROM blobs WHERE task_id=? AND kind='input'", (task.task_id,))
            if result is not None:
                self._db.execute("INSERT OR REPLACE INTO blobs VALUES (?, 'result', 0, ?)",
                                 (task.task_id, result))

    def result(self, task_id: str) -> bytes | None:
        """The stored result image of a completed task."""
        row = self._db.execute(
            "SELECT data FROM blobs WHERE task_id=? AND kind='result' AND idx=0", (task_id,)
        ).fetchone()
        return bytes(row[0]) if row else None

    def load(self) -> list[Task]:
        """Every task in the journal; unfinished ones come back with their inputs."""
        tasks = []
        rows = self._db.execute(
            "SELECT task_id, seq, priority, model, mode, owner, state, params, image_names,"
            " created, started, finished, deadline, attempts, error_code, error, meta"
            " FROM tasks ORDER BY seq"
        ).fetchall()
        for row in rows:
            task = Task(
                task_id=row[0], seq=row[1], priority=row[2], model=row[3], mode=row[4],
                owner=row[5], state=row[6], params=_unpack(row[7]) or {},
                image_names=_unpack(row[8]) or [], created=row[9], started=row[10],
                finished=row[11], deadline=row[12], attempts=row[13], error_code=row[14],
                error=row[15], meta=_unpack(row[16]) or {},
            )
            if task.state in (QUEUED, RUNNING):
                task.inputs = [bytes(r[0]) for r in self._db.execute(
                    "SELECT data FROM blobs WHERE task_id=? AND kind='input' ORDER BY idx",
                    (task.task_id,))]
            tasks.append(task)
        return tasks

    def purge(self, finished_before: float) -> list[str]:
        """Delete final tasks finished before the given time; returns their ids."""
        ids = [r[0] for r in self._db.execute(
            "SELECT task_id FROM tasks WHERE finished IS NOT NULL AND finished < ?",
            (finished_before,))]
        if ids:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("DELETE FROM blobs WHERE task_id=?", [(i,) for i in ids])
                self._db.executemany("DELETE FROM tasks WHERE task_id=?", [(i,) for i in ids])
        return ids

    def count(self, state: str = COMPLETED) -> int:
        """Number of tasks in a state (for tests and metrics)."""
        return self._db.execute("SELECT COUNT(*) FROM tasks WHERE state=?", (state,)).fetchone()[0]
