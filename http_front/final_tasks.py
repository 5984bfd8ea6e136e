"""Tasks that have ended, kept by the front for a second: polling a finished task skips the broker.

A finished task's view no longer changes, except that its image can be evicted or purged; a
second of staleness is what /health already allows. Only final states are kept, with their
image when one was fetched, up to a byte budget (least recently stored first out). Whether the
caller may see the task is still checked on every request, by the resource.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable

from genserve import wire as w


class FinalTasks:
    """A small thread-safe cache of final task views and their images."""

    def __init__(self, max_age: float = 1.0, max_bytes: int = 16 << 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[str, tuple[float, w.TaskView, bytes | None, bool]] = OrderedDict()
        self._bytes = 0

    def get(self, task_id: str, fetch: bool) -> tuple[w.TaskView, bytes | None] | None:
        """The kept view (and image when `fetch`), if it is fresh and was kept with what is asked."""
        with self._lock:
            item = self._items.get(task_id)
            if item is None:
                return None
            stored, view, image, fetched = item
            if self.clock() - stored > self.max_age:
                self._drop(task_id)
                return None
            if fetch and not fetched:
                return None
            return view, image if fetch else None

    def put(self, view: w.TaskView, image: bytes | None, fetched: bool) -> None:
        """Keep `view` if its task has ended (and `image`, which was fetched when `fetched`)."""
        size = len(image) if image else 0
        if view.status not in w.FINAL_STATES or size > self.max_bytes // 8:
            return
        with self._lock:
            self._drop(view.task_id)
            self._items[view.task_id] = (self.clock(), view, image, fetched)
            self._bytes += size
            while self._bytes > self.max_bytes or len(self._items) > 10_000:
                self._drop(next(iter(self._items)))

    def _drop(self, task_id: str) -> None:
        item = self._items.pop(task_id, None)
        if item is not None and item[2]:
            self._bytes -= len(item[2])
