"""Which fronts follow which tasks, for event streams (no sockets).

A front subscribes (WATCH) while it streams a task's events to at least one client; the
broker then pushes an EVENT to it for every change of that task. Positions are not pushed
by the transition that moved them (one dispatch moves every task behind it) but compared
once per timer tick, and only when the queue changed since the last comparison.

Event ids come from one counter that starts at the broker's start time in milliseconds,
so ids keep growing across a broker restart and a client's Last-Event-ID stays ordered.
"""

from __future__ import annotations

import time
from typing import Iterable

MAX_PER_PEER = 20_000  # subscriptions one front may hold (each is a few hundred bytes)


class Subscriptions:
    """task id -> subscribed front identities, and the last position each task was told."""

    def __init__(self, start_ms: int | None = None) -> None:
        self._peers: dict[str, set[bytes]] = {}
        self._per_peer: dict[bytes, int] = {}
        self._told: dict[str, int | None] = {}  # last queue position sent per task
        self._last_id = int(time.time() * 1000) if start_ms is None else start_ms

    def __len__(self) -> int:
        return len(self._peers)

    @property
    def last_id(self) -> int:
        """The id of the latest event (events sent later have larger ids)."""
        return self._last_id

    def next_id(self) -> int:
        """A new event id."""
        self._last_id += 1
        return self._last_id

    def add(self, task_id: str, peer: bytes) -> bool:
        """Subscribe `peer` to a task; False when the peer already holds MAX_PER_PEER."""
        peers = self._peers.setdefault(task_id, set())
        if peer in peers:
            return True
        if self._per_peer.get(peer, 0) >= MAX_PER_PEER:
            if not peers:
                del self._peers[task_id]
            return False
        peers.add(peer)
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        return True

    def remove(self, task_id: str, peer: bytes) -> None:
        """Unsubscribe `peer` from a task."""
        peers = self._peers.get(task_id)
        if peers is None or peer not in peers:
            return
        peers.discard(peer)
        self._release(peer)
        if not peers:
            self.forget(task_id)

    def drop_peer(self, peer: bytes) -> None:
        """Forget every subscription of a front that can no longer be reached."""
        for task_id in [t for t, peers in self._peers.items() if peer in peers]:
            self.remove(task_id, peer)

    def forget(self, task_id: str) -> None:
        """Drop a task's subscriptions (it ended or was purged)."""
        for peer in self._peers.pop(task_id, ()):
            self._release(peer)
        self._told.pop(task_id, None)

    def peers(self, task_id: str) -> tuple[bytes, ...]:
        """The fronts subscribed to a task."""
        return tuple(self._peers.get(task_id, ()))

    def task_ids(self) -> Iterable[str]:
        """Every subscribed task (a copy: safe to change subscriptions while iterating)."""
        return list(self._peers)

    def position_changed(self, task_id: str, position: int | None) -> bool:
        """Remember `position` as told; True if it differs from what was told before."""
        if task_id in self._told and self._told[task_id] == position:
            return False
        self._told[task_id] = position
        return True

    def _release(self, peer: bytes) -> None:
        left = self._per_peer.get(peer, 1) - 1
        if left > 0:
            self._per_peer[peer] = left
        else:
            self._per_peer.pop(peer, None)
