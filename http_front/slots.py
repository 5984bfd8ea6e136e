"""A count of things held at once, globally and per API key, refused past either cap (no I/O).

Synchronous /generate waits (http_front.waits) and event streams (http_front.events) each
hold one of these: both must leave room for everything else a front serves.
"""

from __future__ import annotations

import threading


class KeyedSlots:
    """Slots held at once, globally and per key; `acquire` says why not past a cap."""

    def __init__(self, limit: int, per_key: int, held: str, held_by_key: str) -> None:
        self.limit = limit
        self.per_key = per_key
        self._held = held  # e.g. "event streams are open on this server"
        self._held_by_key = held_by_key  # e.g. "event streams open"
        self._total = 0
        self._by_key: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        """Slots held now."""
        with self._lock:
            return self._total

    def full(self) -> str | None:
        """Why no slot can be had now (the global cap is reached), or None."""
        with self._lock:
            if self._total >= self.limit:
                return f"{self._total} {self._held} (limit {self.limit})"
        return None

    def acquire(self, key: str) -> str | None:
        """Take a slot for `key`; None when granted, else why not."""
        with self._lock:
            mine = self._by_key.get(key, 0)
            if self._total >= self.limit:
                return f"{self._total} {self._held} (limit {self.limit})"
            if mine >= self.per_key:
                return f"this API key already has {mine} {self._held_by_key} (limit {self.per_key})"
            self._total += 1
            self._by_key[key] = mine + 1
        return None

    def release(self, key: str) -> None:
        """Give a slot back."""
        with self._lock:
            self._total -= 1
            left = self._by_key.get(key, 1) - 1
            if left > 0:
                self._by_key[key] = left
            else:
                self._by_key.pop(key, None)
