"""A rate limiter whose tokens come from the broker in batches: one limit per key across fronts.

Every front spends tokens it leased from the broker, so N fronts allow a key `limit`
requests per window together, not N x limit, while a request costs a broker round trip
only once per batch. Leases lapse after `ttl` seconds; what was not spent is given back
with the next lease for that key. If the broker cannot be asked, each front falls back
to its own sliding window (the service cannot generate then anyway).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from genserve import wire as w
from http_front.ratelimit import SlidingWindowLimiter

log = logging.getLogger(__name__)

# lease(key, want, limit, window, returned) -> (granted, retry_after); raises on an unreachable broker.
Lease = Callable[[str, int, int, float, int], tuple[int, float]]
LEASE_TIMEOUT = 0.5  # seconds; past it the request is limited locally


def broker_lease(broker: Any) -> Lease:
    """A Lease that asks the broker (LEASE) through the front's BrokerClient."""
    def lease(key: str, want: int, limit: int, window: float, returned: int) -> tuple[int, float]:
        body = broker.request(w.Lease(0, key, want, limit, window, returned), timeout=LEASE_TIMEOUT).header.body
        return body.granted, body.retry_after
    return lease


@dataclass
class _Pool:
    tokens: int
    expires: float


class LeasedLimiter:
    """Same interface as SlidingWindowLimiter (`hit`, `limit`, `window`), backed by broker leases."""

    def __init__(self, lease: Lease, limit: int, window: float, fallback: SlidingWindowLimiter,
                 batch: int | None = None, ttl: float | None = None,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        self.lease = lease
        self.limit = limit
        self.window = window
        self.fallback = fallback
        self.batch = batch or max(1, min(limit // 20, 1000))
        self.ttl = ttl if ttl is not None else min(5.0, window / 10)
        self.clock = clock
        self.max_keys = max_keys
        self._pools: dict[str, _Pool] = {}
        self._lock = threading.Lock()
        self._warned = -math.inf

    def hit(self, key: str) -> tuple[bool, int]:
        """Spend one token for `key`; returns (allowed, seconds to wait when not)."""
        now = self.clock()
        returned = 0
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None and pool.expires > now and pool.tokens > 0:
                pool.tokens -= 1
                return True, 0
            if pool is not None:
                returned = pool.tokens  # lapsed unspent: hand them back
                del self._pools[key]
        try:
            granted, retry = self.lease(key, self.batch, self.limit, self.window, returned)
        except Exception as exc:  # the broker is away: limit locally rather than refuse everyone
            if now - self._warned > 60:
                self._warned = now
                log.warning("rate-limit lease failed (%r); limiting on this front alone meanwhile", exc)
            return self.fallback.hit(key)
        if granted <= 0:
            return False, max(1, math.ceil(retry))
        with self._lock:
            if len(self._pools) >= self.max_keys:
                self._pools = {k: p for k, p in self._pools.items() if p.expires > now}
            pool = self._pools.get(key)
            if pool is not None and pool.expires > now:
                pool.tokens += granted - 1  # another thread leased meanwhile: pool them
            else:
                self._pools[key] = _Pool(granted - 1, now + self.ttl)
        return True, 0
