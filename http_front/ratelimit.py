"""Sliding-window rate limiter and a bounded recently-seen set (no sockets, injectable clock)."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from typing import Callable, Hashable


class SlidingWindowLimiter:
    """At most `limit` events per `window` seconds per key, counted over a true sliding window."""

    def __init__(self, limit: int = 100, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self.max_keys = max_keys
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str) -> tuple[bool, int]:
        """Record one event; returns (allowed, seconds until the next one would be allowed)."""
        now = self.clock()
        with self._lock:
            events = self._events.get(key)
            if events is None:
                if len(self._events) >= self.max_keys:
                    self._prune(now)
                events = self._events[key] = deque()
            while events and events[0] <= now - self.window:
                events.popleft()
            if len(events) >= self.limit:
                return False, max(1, math.ceil(events[0] + self.window - now))
            events.append(now)
            return True, 0

    def count(self, key: str) -> int:
        """Events currently inside the window for `key`."""
        if key not in self._events:  # the common case (e.g. an address that never failed): no lock
            return 0
        now = self.clock()
        with self._lock:
            return sum(1 for t in self._events.get(key, ()) if t > now - self.window)

    def _prune(self, now: float) -> None:
        for key in [k for k, ev in self._events.items() if not ev or ev[-1] <= now - self.window]:
            del self._events[key]


class RecentSet:
    """Items seen in the last `ttl` seconds, at most `max_items` (the least recently seen leave first)."""

    def __init__(self, ttl: float = 86_400.0, max_items: int = 50_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_items = max_items
        self.clock = clock
        self._seen: OrderedDict[Hashable, float] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, item: Hashable) -> None:
        """Remember `item` (again) as seen now."""
        with self._lock:
            self._seen[item] = self.clock()
            self._seen.move_to_end(item)
            while len(self._seen) > self.max_items:
                self._seen.popitem(last=False)

    def __contains__(self, item: Hashable) -> bool:
        """Whether `item` was seen within the last `ttl` seconds."""
        with self._lock:
            seen = self._seen.get(item)
            if seen is None:
                return False
            if seen <= self.clock() - self.ttl:
                del self._seen[item]
                return False
            return True

    def __len__(self) -> int:
        """Items held (expired ones included until looked up or pushed out)."""
        with self._lock:
            return len(self._seen)
