"""The broker's task journal: one SQLite row per task, image bytes as files beside it.

Layout (one journal per directory): ``journal.sqlite3`` with its ``-wal`` holds the task
rows; ``blobs/<task_id>.in<N>`` holds the input images of an unfinished task and
``blobs/<task_id>.result`` the result image of a completed one.

Why files rather than BLOBs in SQLite with ``auto_vacuum=INCREMENTAL`` and WAL checkpoints
(issue "Hardening" 15; ``bench/journal_disk.py``, figures in docs/benchmarks.md): images are
99.8% of the bytes. Both layouts give the space back, but as BLOBs every image is written
twice (WAL, then checkpoint into the database): 322 MB written for 500 tasks against 144 MB
as files, and the purge with its vacuum and checkpoint held the broker thread ~0.3 s against
~0.02-0.05 s, growing with what is purged. Without the vacuum (the previous layout) nothing
came back and, as Debian's SQLite zeroes freed pages (SECURE_DELETE), the purge itself grew
the WAL by the size of the purged images. As files, an ``unlink`` gives the space back at
once, the rows stay small (under 500 bytes per task), and the image bytes are counted
exactly and incrementally for the disk budget. The rows still get ``auto_vacuum=INCREMENTAL``
and a truncating checkpoint after each purge, which is cheap at that size.

Durability is unchanged: every accepted task, inputs included, is in the journal before
the front gets its ACK. A new file is written in place (no row names it until it is whole);
one a row may already name is replaced through a temporary name and a rename; no fsync;
rows use WAL with ``synchronous=NORMAL``. Both survive a process crash (kill -9); only a
power loss can drop the last writes, the trade-off every WAL-mode service makes. Ordering
keeps the journal consistent across a crash: files are written before the row that names
them and deleted after the row that named them is gone, so a crash can only leave files
that no row names. Those are deleted when the journal opens; a row whose file is missing
(possible only after a power loss) is repaired: its result is marked expired, or an
unfinished task without its inputs fails.

A journal written by the previous layout (a ``blobs`` table) is migrated when opened: its
images move to files, the table is dropped and the database vacuumed once.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import msgspec

from broker.tasks import Task
from genserve.catalog import default_cfg
from genserve.errors import GENERATION as E_GENERATION
from genserve.spec import GenerationParams, WebhookSpec
from genserve.wire import COMPLETED, FAILED, QUEUED, RUNNING, ResultMeta

log = logging.getLogger(__name__)
_ENCODER = msgspec.msgpack.Encoder()

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, priority INTEGER NOT NULL,
    model TEXT NOT NULL, mode TEXT NOT NULL, owner TEXT NOT NULL, state TEXT NOT NULL,
    params BLOB NOT NULL, image_names BLOB NOT NULL,
    created REAL NOT NULL, started REAL, finished REAL, deadline REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, error_code TEXT, error TEXT, meta BLOB,
    inputs INTEGER NOT NULL DEFAULT 0, input_bytes INTEGER NOT NULL DEFAULT 0,
    result_bytes INTEGER, result_expired INTEGER NOT NULL DEFAULT 0,
    idem_key TEXT, idem_hash TEXT, webhook BLOB, weight REAL NOT NULL DEFAULT 1, node_id TEXT
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state);
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks(finished);
CREATE INDEX IF NOT EXISTS tasks_results ON tasks(finished) WHERE result_bytes > 0;
"""
# Columns added to a journal created before results moved to files.
NEW_COLUMNS = ("inputs INTEGER NOT NULL DEFAULT 0", "input_bytes INTEGER NOT NULL DEFAULT 0",
               "result_bytes INTEGER", "result_expired INTEGER NOT NULL DEFAULT 0")
WAL_LIMIT = 4 << 20  # the WAL file is truncated to this after a checkpoint
TMP = ".tmp"


def _pack(value: Any) -> bytes:
    return _ENCODER.encode(value)


def _unpack(data: bytes | None) -> Any:
    return msgspec.msgpack.decode(data) if data else None


def _params(data: bytes, mode: str) -> GenerationParams:
    """Stored parameters; rows from before typed messages may lack the resolved cfg."""
    raw = msgspec.msgpack.decode(data)
    if raw.get("cfg") is None:
        raw["cfg"] = default_cfg(mode)
    return msgspec.convert(raw, GenerationParams)


def _input_name(task_id: str, idx: int) -> str:
    return f"{task_id}.in{idx}"


def _result_name(task_id: str) -> str:
    return f"{task_id}.result"


class Journal:
    """Durable task table and result store owned by the broker thread."""

    def __init__(self, path: Path, blob_dir: Path | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.blob_dir = blob_dir or path.parent / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.input_bytes = 0  # bytes of input files of unfinished tasks
        self.result_bytes = 0  # bytes of stored result files
        self._after_commit: list[Callable[[], None]] | None = None  # inside batch(): deferred work
        # Built on the starting thread, then used only by the broker thread.
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect only on a new database
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
        self._migrate()
        self._db.executescript(SCHEMA)
        self._reconcile()

    @property
    def blob_bytes(self) -> int:
        """Bytes of every image file the journal holds (inputs and results)."""
        return self.input_bytes + self.result_bytes

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    # ---- files -------------------------------------------------------------

    def _write(self, name: str, data: bytes) -> None:
        path = self.blob_dir / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # a row may name this file already: never leave it half-written
            tmp = self.blob_dir / (name + TMP)
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)

    def _unlink(self, names: Iterable[str]) -> None:
        if self._after_commit is not None:  # a row that named them may still roll back
            names = list(names)
            self._after_commit.append(lambda: self._unlink(names))
            return
        for name in names:
            try:
                os.unlink(self.blob_dir / name)
            except FileNotFoundError:
                pass

    # ---- transactions ------------------------------------------------------

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group every write in the block into one transaction, committed when it ends (group commit).

        Files are still written at once, before the rows that name them; deleting files and
        compacting wait for the commit. Whatever the block raised, what it wrote is committed:
        the caller's memory already holds it. A failed commit raises, and nothing that depends
        on it (an ACK) may be sent.
        """
        if self._after_commit is not None:
            yield
            return
        self._db.execute("BEGIN")
        self._after_commit = []
        try:
            yield
        finally:
            deferred, self._after_commit = self._after_commit, None
            self._db.execute("COMMIT")
            for work in deferred:  # committed: a failure from here on is logged, never raised
                try:
                    work()
                except (OSError, sqlite3.Error):
                    log.exception("journal clean-up after a commit failed")

    @contextmanager
    def _tx(self) -> Iterator[None]:
        """One transaction for a multi-statement change, or part of the running batch."""
        if self._after_commit is not None:
            yield
            return
        with self._db:
            self._db.execute("BEGIN")
            yield

    # ---- opening -----------------------------------------------------------

    def _migrate(self) -> None:
        """Move images out of a previous layout's ``blobs`` table into files."""
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(tasks)")}
        if columns and "inputs" not in columns:
            with self._db:
                self._db.execute("BEGIN")
                for ddl in NEW_COLUMNS:
                    self._db.execute(f"ALTER TABLE tasks ADD COLUMN {ddl}")
        if columns and "idem_key" not in columns:
            self._db.execute("ALTER TABLE tasks ADD COLUMN idem_key TEXT")
            self._db.execute("ALTER TABLE tasks ADD COLUMN idem_hash TEXT")
        if columns and "webhook" not in columns:
            self._db.execute("ALTER TABLE tasks ADD COLUMN webhook BLOB")
        if columns and "weight" not in columns:
            self._db.execute("ALTER TABLE tasks ADD COLUMN weight REAL NOT NULL DEFAULT 1")
        if columns and "node_id" not in columns:
            self._db.execute("ALTER TABLE tasks ADD COLUMN node_id TEXT")
        if not self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='blobs'").fetchone():
            return
        inputs: dict[str, list[int]] = {}
        results: dict[str, int] = {}
        # Files first, then the rows that name them: a crash here only redoes the migration.
        for task_id, kind, idx, data in self._db.execute("SELECT task_id, kind, idx, data FROM blobs"):
            if kind == "result":
                self._write(_result_name(task_id), data)
                results[task_id] = len(data)
            else:
                self._write(_input_name(task_id, idx), data)
                inputs.setdefault(task_id, []).append(len(data))
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("UPDATE tasks SET inputs=?, input_bytes=? WHERE task_id=? AND state IN (?, ?)",
                                 [(len(s), sum(s), t, QUEUED, RUNNING) for t, s in inputs.items()])
            self._db.executemany("UPDATE tasks SET result_bytes=? WHERE task_id=? AND state=?",
                                 [(n, t, COMPLETED) for t, n in results.items()])
            self._db.execute("DROP TABLE blobs")
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # applied by the VACUUM below
        self._db.execute("VACUUM")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        log.info("journal migrated: %d input and %d result images moved to %s",
                 sum(map(len, inputs.values())), len(results), self.blob_dir)

    def _reconcile(self) -> None:
        """Delete files no row names (left by a crash); repair rows whose files are gone; count bytes."""
        present = set(os.listdir(self.blob_dir))
        wanted: set[str] = set()
        lost_inputs, lost_results = [], []
        for task_id, inputs, result_bytes in self._db.execute(
                "SELECT task_id, inputs, result_bytes FROM tasks WHERE inputs > 0 OR result_bytes IS NOT NULL"):
            names = [_input_name(task_id, i) for i in range(inputs)]
            if not present.issuperset(names):
                lost_inputs.append(task_id)
            wanted.update(names)
            if result_bytes is not None:
                if _result_name(task_id) not in present:
                    lost_results.append(task_id)
                wanted.add(_result_name(task_id))
        orphans = present - wanted
        if lost_inputs or lost_results:
            log.error("journal files missing (power loss?): %d tasks lost their inputs, %d their results",
                      len(lost_inputs), len(lost_results))
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "UPDATE tasks SET state=?, finished=?, error_code=?, error=?, inputs=0, input_bytes=0"
                    " WHERE task_id=?",
                    [(FAILED, time.time(), E_GENERATION, "its input images were lost from the journal", t)
                     for t in lost_inputs])
                self._db.executemany("UPDATE tasks SET result_bytes=NULL, result_expired=1 WHERE task_id=?",
                                     [(t,) for t in lost_results])
            orphans |= {n for t in lost_inputs for n in wanted if n.startswith(t + ".")}
        if orphans:
            log.info("deleting %d journal files no task names (left by a crash)", len(orphans))
            self._unlink(orphans)
        self.input_bytes, self.result_bytes = self._db.execute(
            "SELECT COALESCE(SUM(input_bytes), 0), COALESCE(SUM(result_bytes), 0) FROM tasks").fetchone()

    # ---- writing -----------------------------------------------------------

    def add(self, task: Task) -> None:
        """Record an accepted task and its input images (files first, then the row)."""
        for i, data in enumerate(task.inputs):
            self._write(_input_name(task.task_id, i), data)
        size = sum(map(len, task.inputs))
        self._db.execute(
            "INSERT INTO tasks (task_id, seq, priority, model, mode, owner, state, params, image_names,"
            " created, deadline, inputs, input_bytes, idem_key, idem_hash, webhook, weight)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (task.task_id, task.seq, task.priority, task.model, task.mode, task.owner,
             task.state, _pack(task.params), _pack(task.image_names), task.created,
             task.deadline, len(task.inputs), size, task.idem_key, task.idem_hash,
             _pack(task.webhook) if task.webhook else None, task.weight),
        )
        self.input_bytes += size

    def update(self, task: Task) -> None:
        """Persist a task's state change."""
        self._db.execute(
            "UPDATE tasks SET state=?, started=?, finished=?, attempts=?, error_code=?, error=?,"
            " meta=?, node_id=? WHERE task_id=?",
            (task.state, task.started, task.finished, task.attempts, task.error_code,
             task.error, _pack(task.meta) if task.meta else None, task.node_id, task.task_id),
        )

    def finish(self, task: Task, result: bytes | None) -> None:
        """Persist a final state; store the result image and drop the inputs."""
        row = self._db.execute("SELECT inputs, input_bytes, result_bytes FROM tasks WHERE task_id=?",
                               (task.task_id,)).fetchone()
        inputs, input_bytes, old_result = row or (0, 0, None)
        if result is not None:
            self._write(_result_name(task.task_id), result)
        with self._tx():
            self.update(task)
            self._db.execute("UPDATE tasks SET inputs=0, input_bytes=0, result_bytes=?, result_expired=0"
                             " WHERE task_id=?", (None if result is None else len(result), task.task_id))
        self._unlink(_input_name(task.task_id, i) for i in range(inputs))
        if result is None and old_result is not None:
            self._unlink([_result_name(task.task_id)])
        self.input_bytes -= input_bytes
        self.result_bytes += (0 if result is None else len(result)) - (old_result or 0)

    # ---- reading -----------------------------------------------------------

    def result(self, task_id: str) -> bytes | None:
        """The stored result image of a completed task (None once purged or evicted)."""
        try:
            return (self.blob_dir / _result_name(task_id)).read_bytes()
        except FileNotFoundError:
            return None

    def load(self) -> list[Task]:
        """Every task in the journal; unfinished ones come back with their inputs."""
        tasks = []
        rows = self._db.execute(
            "SELECT task_id, seq, priority, model, mode, owner, state, params, image_names,"
            " created, started, finished, deadline, attempts, error_code, error, meta,"
            " inputs, result_expired, idem_key, idem_hash, webhook, weight, node_id FROM tasks ORDER BY seq"
        ).fetchall()
        for row in rows:
            task = Task(
                task_id=row[0], seq=row[1], priority=row[2], model=row[3], mode=row[4],
                owner=row[5], state=row[6], params=_params(row[7], row[4]),
                image_names=_unpack(row[8]) or [], created=row[9], started=row[10],
                finished=row[11], deadline=row[12], attempts=row[13], error_code=row[14],
                error=row[15], meta=msgspec.msgpack.decode(row[16], type=ResultMeta) if row[16] else None,
                result_expired=bool(row[18]),
                idem_key=row[19], idem_hash=row[20],
                webhook=msgspec.msgpack.decode(row[21], type=WebhookSpec) if row[21] else None,
                weight=row[22], node_id=row[23],
            )
            if task.state in (QUEUED, RUNNING):
                task.inputs = [(self.blob_dir / _input_name(task.task_id, i)).read_bytes()
                               for i in range(row[17])]
            tasks.append(task)
        return tasks

    def disk_usage(self) -> dict[str, int]:
        """Bytes on disk now: database, WAL, and image files (from the counters, no folder scan)."""
        def size(p: Path) -> int:
            try:
                return p.stat().st_size
            except FileNotFoundError:
                return 0
        return {"db": size(self.path), "wal": size(Path(f"{self.path}-wal")),
                "inputs": self.input_bytes, "results": self.result_bytes}

    # ---- giving space back -------------------------------------------------

    def purge(self, finished_before: float) -> list[str]:
        """Delete final tasks finished before the given time and their files; returns their ids."""
        rows = self._db.execute(
            "SELECT task_id, result_bytes FROM tasks WHERE finished IS NOT NULL AND finished < ?",
            (finished_before,)).fetchall()
        if not rows:
            return []
        with self._tx():
            self._db.executemany("DELETE FROM tasks WHERE task_id=?", [(r[0],) for r in rows])
        self._unlink(_result_name(r[0]) for r in rows if r[1] is not None)
        self.result_bytes -= sum(r[1] or 0 for r in rows)
        self._compact()
        return [r[0] for r in rows]

    def evict_results(self, nbytes: int) -> list[str]:
        """Delete the oldest stored results until `nbytes` are freed or none is left; returns their ids.

        The tasks stay known as completed, with ``result_expired`` set.
        """
        victims: list[tuple[str, int]] = []
        freed = 0
        cursor = self._db.execute("SELECT task_id, result_bytes FROM tasks WHERE result_bytes > 0"
                                  " ORDER BY finished")
        while freed < nbytes:
            row = cursor.fetchone()
            if row is None:
                break
            victims.append(row)
            freed += row[1]
        cursor.close()
        if not victims:
            return []
        with self._tx():
            self._db.executemany("UPDATE tasks SET result_bytes=NULL, result_expired=1 WHERE task_id=?",
                                 [(t,) for t, _ in victims])
        self._unlink(_result_name(t) for t, _ in victims)
        self.result_bytes -= freed
        log.info("disk budget: evicted %d results (%d bytes), oldest first", len(victims), freed)
        return [t for t, _ in victims]

    def _compact(self) -> None:
        """Return freed database pages to the filesystem and truncate the WAL."""
        if self._after_commit is not None:  # a checkpoint cannot run inside a transaction
            self._after_commit.append(self._compact)
            return
        self._db.executescript("PRAGMA incremental_vacuum;")  # execute() would free one page only
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
