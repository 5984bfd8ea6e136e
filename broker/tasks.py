"""Task records and the broker's task table (no sockets)."""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from broker.protocol import FINAL_STATES, QUEUED, RUNNING
from broker.queue import TaskQueue

if TYPE_CHECKING:
    from broker.journal import Journal

log = logging.getLogger(__name__)


@dataclass
class Task:
    """One accepted generation task and its lifecycle state."""

    task_id: str
    model: str
    mode: str
    priority: int
    seq: int
    params: dict[str, Any]
    owner: str = ""
    image_names: list[str] = field(default_factory=list)
    inputs: list[bytes] = field(default_factory=list)
    state: str = QUEUED
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    deadline: float = 0.0
    attempts: int = 0
    node: bytes | None = None
    node_id: str | None = None
    step: int = 0
    total: int = 0
    error_code: str | None = None
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    watchers: set[bytes] = field(default_factory=set)

    @property
    def final(self) -> bool:
        """True once the task is completed, failed or cancelled."""
        return self.state in FINAL_STATES

    def job_header(self) -> dict[str, Any]:
        """The JOB header a node receives for this task."""
        return {"task_id": self.task_id, "model_id": self.model, "mode": self.mode,
                "params": self.params, "images": self.image_names, "attempt": self.attempts}

    def describe(self, position: int | None = None) -> dict[str, Any]:
        """Plain-dict status for STATUS / FETCH replies."""
        out: dict[str, Any] = {
            "task_id": self.task_id, "status": self.state, "model_id": self.model,
            "mode": self.mode, "priority": self.priority, "owner": self.owner,
            "created_at": self.created, "started_at": self.started,
            "finished_at": self.finished, "attempts": self.attempts, "node_id": self.node_id,
            "params": self.params,
        }
        if position is not None:
            out["queue_position"] = position
        if self.total:
            out["progress"] = {"step": self.step, "total": self.total}
        if self.error_code:
            out["error_code"] = self.error_code
            out["error"] = self.error
        if self.meta:
            out["meta"] = self.meta
        return out


class TaskTable:
    """Every task the broker knows, with its deadlines, journal and queue placement (no sockets).

    Tasks recovered as *running* after a restart are held back for a grace period
    (one node timeout), so the node still computing one can reclaim it before any
    other node is offered it.
    """

    def __init__(self, journal: Journal, queue: TaskQueue) -> None:
        self.journal = journal
        self.queue = queue
        self.tasks: dict[str, Task] = {}
        self._seq = 0
        self._deadlines: list[tuple[float, str]] = []
        self._held: dict[str, float] = {}
        self._unfinished: dict[str, int] = {}  # owner -> tasks not yet final (the per-key cap)
        self._last_purge = 0.0

    def __len__(self) -> int:
        return len(self.tasks)

    def get(self, task_id: str) -> Task | None:
        """The task with this id, if known."""
        return self.tasks.get(task_id)

    def next_seq(self) -> int:
        """Acceptance order for FIFO within a priority (continues after a restart)."""
        self._seq += 1
        return self._seq

    def accept(self, task: Task, now: float) -> None:
        """Journal a new task (durably, before any ACK) and queue it."""
        self.journal.add(task)
        self.tasks[task.task_id] = task
        self._unfinished[task.owner] = self._unfinished.get(task.owner, 0) + 1
        self.queue.push(task.task_id, task.model, task.priority, task.seq, now)
        heapq.heappush(self._deadlines, (task.deadline, task.task_id))

    def finish(self, task: Task, result: bytes | None) -> None:
        """Persist a final state (the caller has set it) and the result image, if any."""
        self.journal.finish(task, result)
        left = self._unfinished.get(task.owner, 1) - 1
        if left > 0:
            self._unfinished[task.owner] = left
        else:
            self._unfinished.pop(task.owner, None)

    def enqueue(self, task: Task, now: float) -> None:
        """Put an accepted task back in the queue at its original priority and place."""
        task.state, task.step, task.node, task.node_id = QUEUED, 0, None, None
        self.journal.update(task)
        self.queue.push(task.task_id, task.model, task.priority, task.seq, now)

    def claim(self, task_id: str) -> Task | None:
        """Take a waiting (queued or held) task out of line, for a node that already runs it."""
        task = self.tasks.get(task_id)
        if task is None or task.final or task.state != QUEUED:
            return None
        held = self._held.pop(task_id, None) is not None
        return task if held or self.queue.remove(task_id) else None

    def withdraw(self, task_id: str) -> None:
        """Remove a task from the queue or the held set (it is ending)."""
        self.queue.remove(task_id)
        self._held.pop(task_id, None)

    def unfinished_for(self, owner: str) -> int:
        """Tasks of one API key not yet completed, failed or cancelled."""
        return self._unfinished.get(owner, 0)

    def counts(self) -> dict[str, int]:
        """Number of tasks per state."""
        out: dict[str, int] = {}
        for task in self.tasks.values():
            out[task.state] = out.get(task.state, 0) + 1
        return out

    def overdue(self, now: float) -> Iterator[Task]:
        """Unfinished tasks past their deadline."""
        while self._deadlines and self._deadlines[0][0] < now:
            _, task_id = heapq.heappop(self._deadlines)
            task = self.tasks.get(task_id)
            if task is not None and not task.final:
                yield task

    def housekeeping(self, now: float, result_ttl: float) -> None:
        """Release held tasks whose grace is over; purge results past their retention."""
        for task_id, until in list(self._held.items()):
            if now >= until:
                del self._held[task_id]
                task = self.tasks[task_id]
                self.queue.push(task_id, task.model, task.priority, task.seq, now)
        if now - self._last_purge > min(60.0, result_ttl / 2):
            self._last_purge = now
            for task_id in self.journal.purge(now - result_ttl):
                self.tasks.pop(task_id, None)

    def recover(self, now: float, grace: float) -> None:
        """Reload the journal after a (re)start."""
        for task in self.journal.load():
            self.tasks[task.task_id] = task
            self._seq = max(self._seq, task.seq)
            if task.final:
                continue
            self._unfinished[task.owner] = self._unfinished.get(task.owner, 0) + 1
            task.node = task.node_id = None
            heapq.heappush(self._deadlines, (task.deadline, task.task_id))
            if task.state == RUNNING:
                task.state = QUEUED
                self._held[task.task_id] = now + grace
            else:
                self.queue.push(task.task_id, task.model, task.priority, task.seq, now)
        if self.tasks:
            log.info("recovered %d tasks from the journal (%d queued, %d held for their nodes)",
                     len(self.tasks), len(self.queue), len(self._held))
