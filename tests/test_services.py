"""The front's short-lived cache of the broker's INFO snapshot (http_front.services), with a fake broker."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from genserve import wire as w
from http_front.broker_client import BrokerUnavailable
from http_front.services import Services


class SlowBroker:
    """Answers INFO after `gate` opens (when given); counts requests."""

    def __init__(self) -> None:
        self.requests = 0
        self.gate: threading.Event | None = None
        self.fail = False

    def request(self, msg: Any, timeout: float | None = None) -> Any:
        self.requests += 1
        if self.gate is not None:
            assert self.gate.wait(5)
        if self.fail:
            raise BrokerUnavailable("down")
        body = w.InfoBody(nodes=[], models={}, queue=w.QueueView(self.requests, {}), tasks={}, time=0.0)
        return SimpleNamespace(header=SimpleNamespace(body=body))


def services(broker: SlowBroker) -> Services:
    return Services(broker=broker, config=None, validator=None, signer=None)  # type: ignore[arg-type]


def test_a_fresh_snapshot_is_reused_and_an_old_one_refreshed() -> None:
    broker = SlowBroker()
    s = services(broker)
    assert s.info(max_age=1.0).queue.length == 1
    assert s.info(max_age=1.0).queue.length == 1 and broker.requests == 1
    assert s.info(max_age=0).queue.length == 2  # /status asks for a fresh one


def test_one_thread_refreshes_while_the_others_get_the_previous_snapshot() -> None:
    broker = SlowBroker()
    s = services(broker)
    s.info()
    s._info = (time.monotonic() - 1.5, s._info[1])  # expired, but within a second of max_age
    broker.gate = threading.Event()
    refresher = threading.Thread(target=s.info)
    refresher.start()
    deadline = time.monotonic() + 5
    while not s._refreshing and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.info().queue.length == 1 and broker.requests == 2  # no second request meanwhile
    broker.gate.set()
    refresher.join(5)
    assert s.info().queue.length == 2


def test_a_snapshot_far_past_its_age_is_not_served_and_failures_reach_the_caller() -> None:
    broker = SlowBroker()
    s = services(broker)
    s.info()
    s._info = (time.monotonic() - 10, s._info[1])
    broker.fail = True
    with pytest.raises(BrokerUnavailable):
        s.info()
    assert not s._refreshing  # the next caller may try again
    broker.gate = threading.Event()  # another thread's refresh is in flight, and will fail too
    errors: list[Exception] = []

    def refresh() -> None:
        try:
            s.info()
        except BrokerUnavailable as exc:
            errors.append(exc)

    first = threading.Thread(target=refresh)
    first.start()
    while not s._refreshing:
        time.sleep(0.01)
    waiter = threading.Thread(target=refresh)  # a snapshot 10 s old is not served: it waits, then tries
    waiter.start()
    time.sleep(0.1)
    broker.gate.set()
    first.join(5)
    waiter.join(5)
    assert len(errors) == 2 and not s._refreshing


def test_a_cold_start_of_many_threads_asks_the_broker_once() -> None:
    broker = SlowBroker()
    broker.gate = threading.Event()
    s = services(broker)
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(s.info().queue.length)) for _ in range(20)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    broker.gate.set()
    for t in threads:
        t.join(5)
    assert broker.requests == 1 and results == [1] * 20


def test_max_age_0_waits_for_the_refresh_in_flight_instead_of_taking_the_old_snapshot() -> None:
    broker = SlowBroker()
    s = services(broker)
    s.info()
    s._info = (time.monotonic() - 1.2, s._info[1])
    broker.gate = threading.Event()
    refresher = threading.Thread(target=s.info)
    refresher.start()
    while not s._refreshing:
        time.sleep(0.01)
    got: list[int] = []
    status = threading.Thread(target=lambda: got.append(s.info(max_age=0).queue.length))
    status.start()
    time.sleep(0.1)
    assert got == []  # /status does not get the 1.2 s old snapshot
    broker.gate.set()
    refresher.join(5)
    status.join(5)
    assert got == [2] and broker.requests == 2
