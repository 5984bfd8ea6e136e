"""The jobs a node holds: the one running, those finishing (encoded and sent), and those waiting.

Shared by the node's socket thread (which offers, recalls and reports) and its worker thread
(which takes and finishes); every change happens under one lock, so the socket thread's
picture of what the node holds, as READY reports it, is never between two states.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Holding:
    """What the node holds at one instant."""

    running: str | None
    finishing: tuple[str, ...]  # left the pipeline; their RESULT or ERROR is on its way to the socket thread
    recalled: tuple[str, ...]  # were waiting; given back now


class JobSlot:
    """At most `1 + prefetch` jobs running or waiting; jobs are handed to the worker in arrival order."""

    def __init__(self, prefetch: int = 0) -> None:
        self.prefetch = prefetch
        self._cond = threading.Condition()
        self._running: str | None = None
        self._waiting: deque[tuple[str, Any]] = deque()
        self._finishing: set[str] = set()
        self._closed = False  # the node is stopping: nothing more starts

    @property
    def running(self) -> str | None:
        """The task on the worker now, if any."""
        return self._running

    @property
    def busy(self) -> bool:
        """Something runs, waits or is still being encoded and reported."""
        with self._cond:
            return self._running is not None or bool(self._waiting) or bool(self._finishing)

    @property
    def idle(self) -> bool:
        """Nothing running and nothing waiting (finishing jobs do not count)."""
        with self._cond:
            return self._running is None and not self._waiting

    def waiting(self) -> list[str]:
        """Tasks waiting behind the running one, oldest first."""
        with self._cond:
            return [task_id for task_id, _ in self._waiting]

    def holds(self, task_id: str) -> bool:
        """Whether the job is waiting, running or finishing here."""
        with self._cond:
            return task_id == self._running or task_id in self._finishing or any(
                waiting == task_id for waiting, _ in self._waiting)

    def offer(self, task_id: str, job: Any) -> bool:
        """Queue a job for the worker; False when the node already holds as many as it takes."""
        with self._cond:
            if self._closed or (self._running is not None) + len(self._waiting) > self.prefetch:
                return False
            self._waiting.append((task_id, job))
            self._cond.notify()
            return True

    def take(self, timeout: float) -> tuple[str, Any] | None:
        """Worker: the next job, now running; None if none came within `timeout` seconds, or stopping."""
        with self._cond:
            self._cond.wait_for(lambda: self._waiting or self._closed, timeout)
            return None if self._closed or not self._waiting else self._start_next()

    def _start_next(self) -> tuple[str, Any]:
        task_id, job = self._waiting.popleft()
        self._running = task_id
        return task_id, job

    def finished(self, task_id: str, riders: tuple[str, ...] = ()) -> tuple[str, Any] | None:
        """Worker: the running job (with the `riders` of its pipeline call) left the pipeline, its reports
        are being made; the waiting job, if any, runs now. Both in one step, so no report of this job can
        reach the broker before the next starts."""
        with self._cond:
            if self._running == task_id:
                self._running = None
            self._finishing.add(task_id)
            self._finishing.update(riders)
            return None if self._closed or not self._waiting else self._start_next()

    def close(self) -> None:
        """The node is stopping: no job starts or is accepted any more (waiting ones are given back)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reported(self, task_id: str) -> None:
        """Socket thread: the job's RESULT or ERROR has reached it (and is kept until acknowledged)."""
        with self._cond:
            self._finishing.discard(task_id)

    def recall(self, task_id: str) -> bool:
        """Give back a waiting job; False if it is not waiting (it started, or was never here)."""
        with self._cond:
            for i, (waiting, _) in enumerate(self._waiting):
                if waiting == task_id:
                    del self._waiting[i]
                    return True
            return False

    def give_back(self) -> Holding:
        """Give back every waiting job, and say what runs and finishes, in one step."""
        with self._cond:
            recalled = tuple(task_id for task_id, _ in self._waiting)
            self._waiting.clear()
            return Holding(self._running, tuple(sorted(self._finishing)), recalled)
