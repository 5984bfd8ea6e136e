"""The broker's priority queue of waiting tasks (no sockets, no I/O).

Scheduling policy (pull-based; a node asks for work when it is idle):

1. Lower ``priority`` number first.
2. Within a priority, keys share the nodes by start-time fair queuing: each task gets
   a virtual start tag ``S = max(V, F_key)`` and the key's finish tag becomes
   ``F_key = S + cost / weight``, where ``cost`` is the task's estimated GPU time and ``V``
   the virtual time: the tag of the latest task started at that priority, but never past
   the earliest tag still queued there (a late-tagged task that starts early on a node of
   another model must not push newcomers behind the whole backlog). Tasks run in tag order, so one
   key's 500 queued tasks take turns with another key's single task instead of running
   first, and each key's share of GPU time follows its weight. A key that was idle gets
   no credit for it (``S >= V``). With one key, tag order is acceptance order (FIFO).
3. A node is only offered tasks for models it serves, so a busy or absent model
   never blocks tasks for other models (one heap per model: no head-of-line blocking).
4. Among tasks of equal priority, a task for a model already loaded on that node
   goes first, because switching pipelines costs seconds to minutes on a GPU.
   That preference is bounded two ways: by ``affinity_slack`` in virtual time (a warm
   task may pass a cold one only while its tag is at most that much later, so under
   a backlog nodes stay on their models but a cold task's turn still comes), and by
   ``affinity_window`` in wall time (once the cold task has waited that long it goes
   first). Without a slack (``None``) only the wall-time window applies.
5. With ``lora_slack`` set, a node whose model holds a LoRA set (``loras``) gets a task with
   that same set before the chosen one, if its tag is at most ``lora_slack`` later: the
   same bound one level down, for nodes that keep LoRAs resident between jobs.
"""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator, Mapping


@dataclass(frozen=True, order=True)
class Entry:
    """One queued task: ordering key (priority, tag, seq) plus its identity."""

    priority: int
    tag: float
    seq: int
    task_id: str
    model: str
    enqueued_at: float
    owner: str = ""
    weight: float = 1.0
    lora: str = ""  # the task's LoRA set (genserve.spec.lora_set_key), "" for none
    share: float = 0.0  # cost / weight: what its key was charged for it, given back if it never runs


class TaskQueue:
    """Per-model heaps ordered by (priority, fair tag, seq), with lazy removal."""

    def __init__(self, affinity_window: float = 30.0, affinity_slack: float | None = None,
                 lora_slack: float | None = None) -> None:
        self.affinity_window = affinity_window
        self.affinity_slack = affinity_slack
        self.lora_slack = lora_slack
        self._heaps: dict[str, list[Entry]] = {}
        self._lora_heaps: dict[tuple[str, str], list[Entry]] = {}  # tasks with LoRAs, by (model, set)
        self._per_lora: dict[tuple[str, str], int] = {}  # live tasks per (model, set): the heap goes at 0
        self._live: dict[str, Entry] = {}
        # For positions and INFO without scanning the queue: sorted (tag, seq) per priority
        # (a position is computed on every SUBMIT and every /task poll) and counts per model.
        self._order: dict[int, list[tuple[float, int]]] = {}
        self._per_model: dict[str, int] = {}
        self._vtime: dict[int, float] = {}  # per priority: the tag of the latest task started
        self._finish: dict[tuple[str, int], float] = {}  # per (owner, priority): its last finish tag
        self._owned: dict[tuple[str, int], set[str]] = {}  # per (owner, priority): its queued task ids
        self.changes = 0  # bumped by every push and removal: positions may have moved

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._live

    def push(self, task_id: str, model: str, priority: int, seq: int, now: float, owner: str = "",
             weight: float = 1.0, cost: float = 1.0, tag: float | None = None, lora: str = "") -> float:
        """Queue a task and return its fair tag; `tag` puts a re-queued task back at its old place."""
        self._drop(task_id)
        self.changes += 1
        if tag is None:
            tag = max(self.vtime(priority), self._finish.get((owner, priority), 0.0))
            self._finish[(owner, priority)] = tag + cost / weight
        entry = Entry(priority, tag, seq, task_id, model, now, owner, weight, lora, cost / weight)
        self._live[task_id] = entry
        heapq.heappush(self._heaps.setdefault(model, []), entry)
        if lora and self.lora_slack is not None:
            heapq.heappush(self._lora_heaps.setdefault((model, lora), []), entry)
            self._per_lora[(model, lora)] = self._per_lora.get((model, lora), 0) + 1
        bisect.insort(self._order.setdefault(priority, []), (tag, seq))
        self._owned.setdefault((owner, priority), set()).add(task_id)
        self._per_model[model] = self._per_model.get(model, 0) + 1
        return tag

    def vtime(self, priority: int) -> float:
        """Virtual time at `priority`: the latest started tag, capped by the earliest one still queued."""
        started = self._vtime.get(priority, 0.0)
        order = self._order.get(priority)
        return min(started, order[0][0]) if order else started

    def front_tag(self, priority: int) -> float:
        """A tag that goes before every task queued at `priority` (a task that was already running)."""
        order = self._order.get(priority)
        first = min(self._vtime.get(priority, 0.0), order[0][0] if order else 0.0)
        return math.nextafter(first, -math.inf)

    def charge(self, owner: str, priority: int, cost: float, weight: float = 1.0) -> None:
        """Bill a key for GPU time its task caused beyond the job itself (a model load).

        Its queued tasks at that priority move back by ``cost / weight`` in virtual time, as its
        later ones will: the same as if the job had cost that much more.
        """
        key = (owner, priority)
        self._finish[key] = max(self._finish.get(key, 0.0), self.vtime(priority)) + cost / weight
        self._shift(key, cost / weight, -math.inf)

    def _shift(self, key: tuple[str, int], delta: float, after: float) -> None:
        """Move a key's queued tasks at one priority whose tags are past `after` by `delta`."""
        moving = [t for t in self._owned.get(key, ()) if self._live[t].tag > after]
        if not moving:
            return
        self.changes += 1
        order = self._order[key[1]]
        for task_id in moving:
            old = self._live[task_id]
            del order[bisect.bisect_left(order, (old.tag, old.seq))]
            new = replace(old, tag=old.tag + delta)
            self._live[task_id] = new  # the old heap entry is now stale and dropped lazily
            heapq.heappush(self._heaps[old.model], new)
            if new.lora and self.lora_slack is not None:
                heapq.heappush(self._lora_heaps.setdefault((new.model, new.lora), []), new)
            bisect.insort(order, (new.tag, new.seq))
        moved = [self._live[t] for t in moving]
        for model in {e.model for e in moved}:
            self._compact(self._heaps, model, self._per_model[model])
        for lora_key in {(e.model, e.lora) for e in moved if e.lora and self.lora_slack is not None}:
            self._compact(self._lora_heaps, lora_key, self._per_lora[lora_key])

    def _compact(self, heaps: dict[Any, list[Entry]], key: Any, live_at_most: int) -> None:
        """Rebuild a heap that holds mostly stale entries (left behind by charges)."""
        heap = heaps[key]
        if len(heap) > 2 * live_at_most + 64:
            heaps[key] = [e for e in heap if self._live.get(e.task_id) is e]
            heapq.heapify(heaps[key])

    def take(self, task_id: str) -> Entry | None:
        """Remove a task because it starts now: virtual time at its priority moves to its tag."""
        entry = self._drop(task_id)
        if entry is None:
            return None
        self._vtime[entry.priority] = max(self._vtime.get(entry.priority, 0.0), entry.tag)
        return entry

    def remove(self, task_id: str) -> bool:
        """Drop a queued task that will not run here (cancelled, timed out); its key gets its share back."""
        entry = self._drop(task_id)
        if entry is None:
            return False
        key = (entry.owner, entry.priority)
        if key in self._finish:  # its later tasks move up; the key owes nothing for a task that never ran
            self._finish[key] = max(self._finish[key] - entry.share, entry.tag)
            self._shift(key, -entry.share, entry.tag)
        return True

    def _drop(self, task_id: str) -> Entry | None:
        entry = self._live.pop(task_id, None)
        if entry is None:
            return None
        self.changes += 1
        order = self._order[entry.priority]
        del order[bisect.bisect_left(order, (entry.tag, entry.seq))]
        if not order:
            del self._order[entry.priority]
        owned = self._owned[(entry.owner, entry.priority)]
        owned.discard(task_id)
        if not owned:
            del self._owned[(entry.owner, entry.priority)]
        left = self._per_model[entry.model] - 1
        if left:
            self._per_model[entry.model] = left
            self._compact(self._heaps, entry.model, left)
        else:
            del self._per_model[entry.model]
            self._heaps.pop(entry.model, None)
        if entry.lora and self.lora_slack is not None:
            key = (entry.model, entry.lora)
            left = self._per_lora[key] - 1
            if left:
                self._per_lora[key] = left
                self._compact(self._lora_heaps, key, left)
            else:
                del self._per_lora[key]
                self._lora_heaps.pop(key, None)
        return entry

    def _head(self, model: str) -> Entry | None:
        return self._first(self._heaps, model)

    def _first(self, heaps: dict[Any, list[Entry]], key: Any) -> Entry | None:
        heap = heaps.get(key)
        while heap:
            entry = heap[0]
            if self._live.get(entry.task_id) is entry:
                return entry
            heapq.heappop(heap)
        return None

    def peek_for(self, models: Iterable[str], loaded: Iterable[str] = (), now: float = 0.0,
                 loras: Mapping[str, str] | None = None) -> Entry | None:
        """The task a node serving `models` (with `loaded` in memory, holding `loras` per model) should run next."""
        pick = self._pick(models, loaded, now)
        if pick is None or not loras or self.lora_slack is None:
            return pick
        held = loras.get(pick.model)
        if not held or held == pick.lora:
            return pick
        same = self._first(self._lora_heaps, (pick.model, held))
        if same is not None and same.priority == pick.priority and same.tag - pick.tag <= self.lora_slack:
            return same
        return pick

    def _pick(self, models: Iterable[str], loaded: Iterable[str], now: float) -> Entry | None:
        loaded_set = set(loaded)
        heads = [h for h in (self._head(m) for m in models) if h is not None]
        if not heads:
            return None
        best = min(heads)
        if best.model in loaded_set or now - best.enqueued_at > self.affinity_window:
            return best
        warm = [h for h in heads if h.model in loaded_set and h.priority == best.priority]
        if self.affinity_slack is not None:
            warm = [h for h in warm if h.tag - best.tag <= self.affinity_slack]
        return min(warm) if warm else best

    def companions(self, lead: Entry, models: Iterable[str], limit: int, scan: int = 256) -> list[Entry]:
        """Up to `limit` queued tasks of the lead's model and priority, in queue order, that may share its
        pipeline call on a node serving `models`: among the first `scan` of the model's queue and, with an
        affinity slack, at most that much later in virtual time than the first task that node could run
        at that priority, so that a rider passes others no further than model affinity lets a warm task
        pass a cold one."""
        heads = [h for h in (self._head(m) for m in models) if h is not None and h.priority == lead.priority]
        if not heads:
            return []
        bound = min(h.tag for h in heads) + self.affinity_slack if self.affinity_slack is not None else math.inf
        out: list[Entry] = []
        for entry in self._in_order(self._heaps.get(lead.model, []), scan):
            if len(out) >= limit or entry.priority > lead.priority or entry.tag > bound:
                break
            if entry.priority == lead.priority:
                out.append(entry)
        return out

    def nth_for(self, models: Iterable[str], n: int) -> Entry | None:
        """The n-th (0-based) queued task, in queue order, of the models a node serves: what it would get once
        `n` other nodes took the ones before it (model affinity aside). None: fewer are queued."""
        walks = [self._in_order(self._heaps.get(m, []), 4 * (n + 1) + 64) for m in set(models)]
        for i, entry in enumerate(heapq.merge(*walks)):
            if i == n:
                return entry
        return None

    def _in_order(self, heap: list[Entry], most: int) -> Iterator[Entry]:
        """The heap's live entries in order, at most `most` looked at, without touching the heap."""
        frontier = [(heap[0], 0)] if heap else []
        while frontier and most > 0:
            entry, i = heapq.heappop(frontier)
            most -= 1
            for child in (2 * i + 1, 2 * i + 2):
                if child < len(heap):
                    heapq.heappush(frontier, (heap[child], child))
            if self._live.get(entry.task_id) is entry:
                yield entry

    def position(self, task_id: str) -> int | None:
        """0-based number of queued tasks ahead of `task_id` in global priority order."""
        own = self._live.get(task_id)
        if own is None:
            return None
        ahead = sum(len(order) for prio, order in self._order.items() if prio < own.priority)
        return ahead + bisect.bisect_left(self._order[own.priority], (own.tag, own.seq))

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
