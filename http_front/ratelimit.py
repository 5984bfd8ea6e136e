"""Sliding-window rate limiter (no sockets, injectable clock)."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Callable


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
        now = self.clock()
        with self._lock:
            return sum(1 for t in self._events.get(key, ()) if t > now - self.window)

    def _prune(self, now: float) -> None:
        for key in [k for k, ev in self._events.items() if not ev or ev[-1] <= now - self.window]:
            del self._events[key]
