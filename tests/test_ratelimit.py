"""Sliding-window rate limiter with an injected clock (no sleeping)."""

from __future__ import annotations

from http_front.ratelimit import SlidingWindowLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sliding_window_allows_limit_then_reports_retry_after() -> None:
    clock = Clock()
    rl = SlidingWindowLimiter(limit=3, window=60, clock=clock)
    assert [rl.hit("k")[0] for _ in range(3)] == [True, True, True]
    clock.now += 10
    assert rl.hit("k") == (False, 50)
    assert rl.hit("other") == (True, 0)  # per key
    clock.now += 50.5  # the first three leave the window one by one
    assert rl.hit("k") == (True, 0)
    assert rl.count("k") == 1


def test_window_slides_rather_than_resetting() -> None:
    clock = Clock()
    rl = SlidingWindowLimiter(limit=2, window=60, clock=clock)
    rl.hit("k")
    clock.now += 59
    rl.hit("k")
    clock.now += 2  # first hit has left, second is still inside
    assert rl.hit("k")[0] and not rl.hit("k")[0]
