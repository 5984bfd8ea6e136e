"""One rate limit per key across fronts: the broker's token ledger and the fronts' leased limiter."""

from __future__ import annotations

from pathlib import Path

import pytest
from falcon import testing

from broker.ratelimit import TokenLedger
from http_front.app import create_app
from http_front.broker_client import BrokerClient, BrokerUnavailable
from http_front.config import FrontConfig
from http_front.keys import KeyStore, owner_of
from http_front.leases import LeasedLimiter, broker_lease
from http_front.ratelimit import SlidingWindowLimiter

KEY = "lease-test-key-0123456789abcdef"


def test_the_ledger_grants_at_most_the_limit_per_sliding_window() -> None:
    ledger = TokenLedger()
    assert ledger.grant("k", 40, 100, 60, now=0) == (40, 0.0)
    assert ledger.grant("k", 40, 100, 60, now=10) == (40, 0.0)
    assert ledger.grant("k", 40, 100, 60, now=20) == (20, 0.0)
    granted, retry = ledger.grant("k", 40, 100, 60, now=30)
    assert granted == 0 and retry == 30  # the first grant leaves the window at t=60
    assert ledger.grant("k", 40, 100, 60, now=60.5)[0] == 40
    assert ledger.grant("other", 5, 100, 60, now=30) == (5, 0.0)  # keys are separate


def test_returned_tokens_can_be_granted_again() -> None:
    ledger = TokenLedger()
    assert ledger.grant("k", 100, 100, 60, now=0)[0] == 100
    assert ledger.grant("k", 10, 100, 60, now=1)[0] == 0
    assert ledger.grant("k", 10, 100, 60, now=2, returned=7)[0] == 7


def test_a_front_asks_the_broker_once_per_batch_and_falls_back_when_it_cannot() -> None:
    calls: list[tuple] = []
    now = [0.0]

    def lease(key: str, want: int, limit: int, window: float, returned: int) -> tuple[int, float]:
        calls.append((key, want, returned))
        return want, 0.0

    limiter = LeasedLimiter(lease, 100, 60, SlidingWindowLimiter(100, 60), clock=lambda: now[0])
    assert limiter.batch == 5
    assert all(limiter.hit("k")[0] for _ in range(10)) and len(calls) == 2
    now[0] = 100.0  # the lease lapsed with 0 unspent; the next one gives nothing back
    limiter.hit("k")
    assert calls[-1] == ("k", 5, 0)
    limiter.hit("k")
    now[0] = 200.0  # lapsed with 3 unspent: given back
    limiter.hit("k")
    assert calls[-1] == ("k", 5, 3)

    def down(*_: object) -> tuple[int, float]:
        raise BrokerUnavailable("no broker")

    local = SlidingWindowLimiter(2, 60, clock=lambda: now[0])
    cut_off = LeasedLimiter(down, 100, 60, local, clock=lambda: now[0])
    assert [cut_off.hit("k")[0] for _ in range(3)] == [True, True, False]


def test_two_fronts_share_one_limit_per_key(broker_factory, tmp_path: Path) -> None:
    bt = broker_factory()
    keys = KeyStore.from_env([(KEY, "k", ("readonly",))], None)
    clients = [BrokerClient(bt.frontend, timeout=2.0).start() for _ in range(2)]
    try:
        fronts = [testing.TestClient(create_app(c, keys, FrontConfig(rate_limit=100, rate_window=60)),
                                     headers={"X-API-Key": KEY}) for c in clients]
        codes = [fronts[i % 2].simulate_get("/").status_code for i in range(300)]
        allowed = codes.count(200)
        # Without leases each front would allow 100 (200 in all); the shared limit is 100, and
        # tokens leased but not yet spent may leave it a few short, never over.
        assert 90 <= allowed <= 100, allowed
        assert set(codes) == {200, 429}
        refused = fronts[0].simulate_get("/")
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert broker_lease(clients[0])(owner_of(KEY), 1, 100, 60, 0)[0] == 0  # the broker agrees
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize("limit, window", [(0, 60), (10, 0), (10, -1), (10, 1e9)])
def test_the_broker_refuses_nonsense_lease_requests(broker_factory, limit: int, window: float) -> None:
    from http_front.broker_client import BrokerError

    bt = broker_factory()
    client = BrokerClient(bt.frontend, timeout=2.0).start()
    try:
        with pytest.raises(BrokerError):
            broker_lease(client)("k", 1, limit, window, 0)
    finally:
        client.close()
