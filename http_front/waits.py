"""Synchronous /generate waits: a cap on how many run at once, and a wait that notices hang-ups.

A synchronous request holds one waitress thread until its task ends (up to the task
timeout). `SyncWaits` keeps the number of such waits below the thread count, globally and
per key, so /health, /task and async submissions always find a thread; past a cap the
front answers 429 with Retry-After. `wait_for_task` waits in short slices and polls
waitress's ``client_disconnected`` callable, so a client that hung up frees its thread
within `POLL_INTERVAL` instead of when its task ends.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import falcon

from genserve import wire as w
from http_front.broker_client import BrokerClient, BrokerUnavailable
from http_front.slots import KeyedSlots

log = logging.getLogger(__name__)

DISCONNECTED_KEY = "waitress.client_disconnected"  # set by waitress; needs channel_request_lookahead > 0
POLL_INTERVAL = 0.25  # seconds between hang-up checks
RECHECK_INTERVAL = 3.0  # seconds between STATUS re-asks, in case a DONE push was lost
RETRY_AFTER = 2  # seconds suggested to a client refused by a cap


class ClientGone(Exception):
    """The HTTP client closed its connection while its synchronous request waited."""


def waiter_key(principal: Any) -> str:
    """Whom the per-key cap counts: the principal's owner where keys have one, else its key id."""
    return str(getattr(principal, "owner", None) or principal.key_id)


class SyncWaits(KeyedSlots):
    """Counts synchronous waits in progress, globally and per key; refuses past either cap."""

    def __init__(self, limit: int, per_key: int) -> None:
        super().__init__(limit, per_key, "synchronous requests are already waiting", "synchronous requests waiting")

    @contextmanager
    def slot(self, key: str) -> Iterator[None]:
        """Hold one wait for `key` for the duration of the block; raises 429 past a cap."""
        refusal = self.acquire(key)
        if refusal is not None:
            log.debug("sync wait refused for %s: %s", key, refusal)
            raise falcon.HTTPTooManyRequests(
                title="too many synchronous requests", retry_after=RETRY_AFTER,
                description=f"{refusal}; retry later, or send \"async\": true and poll /task/{{task_id}}")
        try:
            yield
        finally:
            self.release(key)


def wait_for_task(broker: BrokerClient, task_id: str, future: Future, timeout: float,
                  hung_up: Callable[[], bool] | None = None) -> w.Message | None:
    """The task's DONE message, or None after `timeout`; raises ClientGone once `hung_up()` is true.

    Re-asks the broker every few seconds in case a push was lost (a restarted broker forgets
    its watchers), and waits in slices of POLL_INTERVAL when there is a hang-up check to poll.
    """
    now = time.monotonic()
    deadline, recheck = now + timeout, now + RECHECK_INTERVAL
    slice_s = POLL_INTERVAL if hung_up is not None else RECHECK_INTERVAL
    try:
        while True:
            if hung_up is not None and hung_up():
                raise ClientGone(task_id)
            now = time.monotonic()
            if now >= deadline:
                return None
            try:
                return future.result(max(0.0, min(slice_s, deadline - now, recheck - now)))
            except FutureTimeout:
                pass
            if time.monotonic() < recheck:
                continue
            recheck = time.monotonic() + RECHECK_INTERVAL
            try:  # re-register the watch (a restarted broker forgot it) and check state
                msg = broker.request(w.Status(0, task_id, watch=True))
                if msg.header.body.task.status in w.FINAL_STATES:
                    fetched = broker.request(w.Fetch(0, task_id))
                    return w.Message(w.DONE, w.Done(fetched.header.body.task), fetched.blobs)
            except BrokerUnavailable:
                continue
    finally:
        broker.unwatch(task_id, future)
