"""Per-key request tokens granted to fronts in batches, so one limit holds across all fronts.

A front asks for a batch of tokens (LEASE) when its local supply for a key runs out and
spends them without asking again; the broker grants at most `limit` tokens per key in
any `window` seconds, over a true sliding window of grants. Tokens a front did not use
before its lease lapsed are given back with its next request for that key. No sockets.
"""

from __future__ import annotations

import math
from collections import deque


class TokenLedger:
    """Sliding-window grants per key; the limit and window come with each request."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._grants: dict[str, deque[list[float]]] = {}  # key -> [[time, tokens], ...], oldest first

    def grant(self, key: str, want: int, limit: int, window: float, now: float,
              returned: int = 0) -> tuple[int, float]:
        """Grant up to `want` tokens now; returns (granted, seconds until one more could be granted)."""
        grants = self._grants.get(key)
        if grants is None:
            if len(self._grants) >= self.max_keys:
                self.prune(now, window)
            grants = self._grants[key] = deque()
        while grants and grants[0][0] <= now - window:
            grants.popleft()
        self._give_back(grants, returned)
        used = sum(n for _, n in grants)
        granted = max(0, min(want, limit - used))
        if granted:
            grants.append([now, float(granted)])
            return granted, 0.0
        retry = grants[0][0] + window - now if grants else window
        return 0, max(0.0, math.ceil(retry * 1000) / 1000)

    @staticmethod
    def _give_back(grants: deque[list[float]], returned: int) -> None:
        # Unused tokens come off the newest grants: those are the ones that lapsed unspent.
        for entry in reversed(grants):
            if returned <= 0:
                break
            taken = min(entry[1], returned)
            entry[1] -= taken
            returned -= int(taken)

    def prune(self, now: float, window: float) -> None:
        """Forget keys with no grant inside the window."""
        for key in [k for k, g in self._grants.items() if not g or g[-1][0] <= now - window]:
            del self._grants[key]

    def __len__(self) -> int:
        return len(self._grants)
