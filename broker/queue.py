"""The broker's priority queue of waiting tasks (no sockets, no I/O).

Scheduling policy (pull-based; a node asks for work when it is idle):

1. Lower ``priority`` number first; FIFO (by acceptance sequence) within a priority.
2. A node is only offered tasks for models it serves, so a busy or absent model
   never blocks tasks for other models (one heap per model: no head-of-line blocking).
3. Among tasks of equal priority, a task for a model already loaded on that node
   goes first, because switching pipelines costs seconds to minutes on a GPU.
   That preference is bounded: once the oldest competing task has waited longer
   than ``affinity_window`` seconds, plain FIFO order wins again, so a steady
   stream for a loaded model cannot starve another model.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True, order=True)
class Entry:
    """One queued task: ordering key (priority, seq) plus its identity."""

    priority: int
    seq: int
    task_id: str
    model: str
    enqueued_at: float


class TaskQueue:
    """Per-model heaps ordered by (priority, seq), with lazy removal."""

    def __init__(self, affinity_window: float = 30.0) -> None:
        self.affinity_window = affinity_window
        self._heaps: dict[str, list[Entry]] = {}
        self._live: dict[str, Entry] = {}
        # For positions and INFO without scanning the queue: sorted seqs per priority
        # (a position is computed on every SUBMIT and every /task poll) and counts per model.
        self._seqs: dict[int, list[int]] = {}
        self._per_model: dict[str, int] = {}
        self.changes = 0  # bumped by every push and removal: positions may have moved

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._live

    def push(self, task_id: str, model: str, priority: int, seq: int, now: float) -> None:
        """Queue a task; re-pushing a queued task replaces its entry."""
        self.remove(task_id)
        self.changes += 1
        entry = Entry(priority, seq, task_id, model, now)
        self._live[task_id] = entry
        heapq.heappush(self._heaps.setdefault(model, []), entry)
        bisect.insort(self._seqs.setdefault(priority, []), seq)
        self._per_model[model] = self._per_model.get(model, 0) + 1

    def remove(self, task_id: str) -> bool:
        """Drop a queued task (e.g. cancelled or timed out); False if it was not queued."""
        entry = self._live.pop(task_id, None)
        if entry is None:
            return False
        self.changes += 1
        seqs = self._seqs[entry.priority]
        del seqs[bisect.bisect_left(seqs, entry.seq)]
        if not seqs:
            del self._seqs[entry.priority]
        left = self._per_model[entry.model] - 1
        if left:
            self._per_model[entry.model] = left
        else:
            del self._per_model[entry.model]
        return True

    def _head(self, model: str) -> Entry | None:
        heap = self._heaps.get(model)
        while heap:
            entry = heap[0]
            if self._live.get(entry.task_id) is entry:
                return entry
            heapq.heappop(heap)
        return None

    def peek_for(self, models: Iterable[str], loaded: Iterable[str] = (),
                 now: float = 0.0) -> Entry | None:
        """The task a node serving `models` (with `loaded` in memory) should run next."""
        loaded_set = set(loaded)
        heads = [h for h in (self._head(m) for m in models) if h is not None]
        if not heads:
            return None
        best = min(heads)
        if best.model in loaded_set or now - best.enqueued_at > self.affinity_window:
            return best
        warm = [h for h in heads if h.model in loaded_set and h.priority == best.priority]
        return min(warm) if warm else best

    def position(self, task_id: str) -> int | None:
        """0-based number of queued tasks ahead of `task_id` in global priority order."""
        own = self._live.get(task_id)
        if own is None:
            return None
        ahead = sum(len(seqs) for prio, seqs in self._seqs.items() if prio < own.priority)
        return ahead + bisect.bisect_left(self._seqs[own.priority], own.seq)

    def depths(self) -> dict[tuple[str, int], int]:
        """Queued tasks per (model, priority), for metrics (walks the queue: call it per scrape)."""
        out: dict[tuple[str, int], int] = {}
        for entry in self._live.values():
            key = (entry.model, entry.priority)
            out[key] = out.get(key, 0) + 1
        return out

    def models_waiting(self) -> dict[str, int]:
        """Count of queued tasks per model."""
        return dict(self._per_model)
