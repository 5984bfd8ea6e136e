"""Webhook delivery: a SQLite-journaled outbox, delivered at least once by its own threads.

The broker thread only calls ``WebhookOutbox.enqueue``, which writes one row and wakes a
delivery thread; it never waits on the network. Delivery threads claim due rows (the
``claimed_by`` column, set in a transaction; claims left by a previous run are cleared when
the outbox opens), POST the payload signed as Standard Webhooks (https://www.standardwebhooks.com:
``webhook-id`` is the msg_id on every attempt, ``webhook-timestamp`` and
``webhook-signature`` are fresh on each), and record the outcome:

* 2xx: delivered.
* 410 Gone: failed at once; the receiver asked for no more deliveries.
* any other status (3xx included: redirects are never followed), a timeout or a connection,
  TLS or DNS error: retried after ``first_delay`` doubling up to ``max_delay``, each delay
  scaled by a random factor in [1 - jitter, 1]; the last attempt is made at
  ``created + max_age`` and if it fails the delivery is failed.
* a URL or resolved address that is not allowed (see ``broker.ssrf``): refused, never retried.

Each attempt, TLS handshake and response included, is bounded by ``timeout``: a watchdog
thread shuts the socket of an attempt that runs past it. ``close`` shuts in-flight attempts
the same way; their rows keep their claim on disk and are delivered after the next start,
so a receiver may see a message twice (at least once, as the standard expects).

One outbox per database file: opening one clears every claim in it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import http.client
import logging
import random
import secrets
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from broker.ssrf import (
    MAX_URL_LENGTH,
    PinnedHTTPConnection,
    PinnedHTTPSConnection,
    WebhookRefused,
    check_url,
    resolve,
)

__all__ = ["WebhookConfig", "WebhookOutbox", "WebhookRefused", "backoff_delay", "check_url",
           "new_secret", "parse_secret", "sign", "signed_headers"]

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 16
USER_AGENT = "GenServe-Webhooks/1"
MAX_RESPONSE_BYTES = 64 * 1024
MAX_ERROR_CHARS = 500
PURGE_EVERY = 60.0  # seconds between purges of finished rows
IDLE_WAIT = 1.0  # longest an idle delivery thread sleeps before looking again
PENDING, DELIVERED, FAILED, REFUSED = "pending", "delivered", "failed", "refused"
STATES = (PENDING, DELIVERED, FAILED, REFUSED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    msg_id TEXT PRIMARY KEY, url TEXT NOT NULL, event_type TEXT NOT NULL, payload BLOB NOT NULL,
    created REAL NOT NULL, next_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending', last_status INTEGER, last_error TEXT,
    finished REAL, claimed_by TEXT, host TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(next_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_finished ON deliveries(finished) WHERE state != 'pending';
"""


@dataclass(frozen=True)
class WebhookConfig:
    """Webhook delivery settings; the defaults retry a delivery for an hour."""

    secret: bytes = field(repr=False)
    allow_private: bool = False
    max_age: float = 3600.0
    first_delay: float = 1.0
    max_delay: float = 300.0
    timeout: float = 10.0
    workers: int = 16  # threads mostly wait on the network; a dead host holds at most one (see _Host)
    max_pending: int = 10000
    jitter: float = 0.5  # each delay is scaled by a random factor in [1 - jitter, 1]

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_SECRET_BYTES:
            raise ValueError(f"webhook secret must be at least {MIN_SECRET_BYTES} bytes")
        if min(self.max_age, self.first_delay, self.timeout) <= 0 or self.max_delay < self.first_delay:
            raise ValueError("webhook max_age, first_delay and timeout must be > 0, max_delay >= first_delay")
        if self.workers < 1 or self.max_pending < 1 or not 0 <= self.jitter <= 1:
            raise ValueError("webhook workers and max_pending must be >= 1, jitter within [0, 1]")


def parse_secret(text: str) -> bytes:
    """The HMAC key of a "whsec_<base64>" secret; ValueError if malformed or under 16 bytes."""
    if not isinstance(text, str) or not text.startswith(SECRET_PREFIX):
        raise ValueError(f"webhook secret must start with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(text[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("webhook secret is not valid base64 after 'whsec_'") from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"webhook secret must decode to at least {MIN_SECRET_BYTES} bytes")
    return key


def new_secret() -> str:
    """A new random secret: "whsec_" + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def sign(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks signature "v1,<base64 HMAC-SHA256 of '{id}.{timestamp}.{body}'>"."""
    mac = hmac.new(secret, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def signed_headers(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one delivery attempt, signature included."""
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, msg_id, timestamp, body),
            "content-type": "application/json", "user-agent": USER_AGENT}


def backoff_delay(attempts: int, config: WebhookConfig, rng: random.Random | None = None) -> float:
    """Seconds to wait after the attempts-th failed attempt: doubling, capped, with jitter."""
    delay = min(config.max_delay, config.first_delay * 2.0 ** min(max(attempts - 1, 0), 64))
    return delay * (1.0 - config.jitter * (rng or random).random())


def _host(url: str) -> str:
    """The host of a URL for log lines (never the path or query, which may hold tokens)."""
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


def _target(url: str) -> str:
    """What a circuit breaker covers: the URL's host and port."""
    try:
        parts = urlsplit(url)
        return f"{(parts.hostname or '?').lower()}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    except ValueError:
        return "?"


@dataclass
class _Host:
    """One receiver host's circuit breaker: after a failed attempt, one attempt at a time and a pause.

    So a dead or slow host costs one worker once per pause, however many deliveries wait for
    it, and never starves the deliveries to other hosts.
    """

    failures: int = 0
    blocked_until: float = 0.0
    inflight: int = 0


MAX_PER_HOST = 4  # attempts at once to one healthy host


class _Row(NamedTuple):
    msg_id: str
    url: str
    payload: bytes
    created: float
    attempts: int


class _Outcome(NamedTuple):
    state: str  # PENDING means "failed attempt, retry"
    status: int | None
    error: str | None


@dataclass(eq=False)
class _Watch:
    conn: http.client.HTTPConnection
    deadline: float  # time.monotonic()
    fired: bool = False


def _abort(conn: http.client.HTTPConnection) -> None:
    """Shut a connection's socket from another thread, waking its blocked reader."""
    sock = conn.sock
    if sock is None:
        return
    try:
        # socket.socket.shutdown, not SSLSocket.shutdown, which would drop its TLS state under the reader.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError as exc:  # already closed by its own thread
        log.debug("webhook socket shutdown: %s", exc)


class WebhookOutbox:
    """Journaled webhook deliveries, retried with backoff, made by the outbox's own threads."""

    def __init__(self, path: Path, config: WebhookConfig, clock: Callable[[], float] = time.time,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.path = Path(path)
        self.config = config
        self.clock = clock
        self.ssl_context = ssl_context or ssl.create_default_context()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(deliveries)")}
        if columns and "host" not in columns:
            self._db.execute("ALTER TABLE deliveries ADD COLUMN host TEXT NOT NULL DEFAULT ''")
        self._db.executescript(SCHEMA)
        recovered = self._db.execute(
            "UPDATE deliveries SET claimed_by = NULL WHERE claimed_by IS NOT NULL").rowcount
        if recovered:
            log.info("webhook outbox: %d attempts interrupted by the last shutdown will be retried", recovered)
        self._pending = self._db.execute(
            "SELECT COUNT(*) FROM deliveries WHERE state = ?", (PENDING,)).fetchone()[0]
        self._lock = threading.Lock()  # guards the connection and the fields below
        self._wake = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._closed = False
        self._last_purge = float("-inf")
        self._rng = random.Random()
        self._watch_cond = threading.Condition()  # guards _inflight
        self._inflight: set[_Watch] = set()
        self._hosts: dict[str, _Host] = {}  # guarded by _lock
        self._ended = dict.fromkeys((DELIVERED, FAILED, REFUSED), 0)  # since this start, for metrics

    @property
    def full(self) -> bool:
        """Whether enqueue would refuse a new delivery now (max_pending reached)."""
        with self._lock:
            return self._pending >= self.config.max_pending

    # -- the broker's side -------------------------------------------------------------

    def enqueue(self, msg_id: str, url: str, event_type: str, payload: bytes,
                now: float | None = None) -> bool:
        """Journal one delivery, no network I/O; False if the outbox is full or closed or the URL refused.

        Enqueueing a msg_id already known is a no-op that returns True: one delivery.
        """
        if not (isinstance(msg_id, str) and 0 < len(msg_id) <= 256 and msg_id.isascii()
                and msg_id.isprintable() and " " not in msg_id):
            raise ValueError("webhook msg_id must be 1-256 printable ASCII characters without spaces")
        if not isinstance(payload, bytes):
            raise TypeError("webhook payload must be bytes (the JSON body)")
        now = self.clock() if now is None else now
        try:
            check_url(url)
            refused = None
        except WebhookRefused as exc:
            refused = str(exc)
        with self._lock:
            if self._stopping:
                log.warning("webhook %s not queued: the outbox is closed", msg_id)
                return False
            if refused is None and self._pending >= self.config.max_pending:
                if self._db.execute("SELECT 1 FROM deliveries WHERE msg_id = ?", (msg_id,)).fetchone():
                    return True  # already journaled: accepting it again adds nothing
                log.warning("webhook %s to %s not queued: %d deliveries already pending",
                            msg_id, _host(url), self._pending)
                return False
            state, finished = (PENDING, None) if refused is None else (REFUSED, now)
            added = self._db.execute(
                "INSERT OR IGNORE INTO deliveries (msg_id, url, event_type, payload, created, next_at,"
                " state, last_error, finished, host) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (msg_id, url[:MAX_URL_LENGTH], event_type, payload, now, now, state, refused,
                 finished, _target(url))).rowcount
            if added and refused is None:
                self._pending += 1
                self._wake.notify()
            elif added:
                self._ended[REFUSED] += 1
        if refused is not None:
            log.warning("webhook %s to %s refused: %s", msg_id, _host(url), refused)
            return False
        return True

    def start(self) -> WebhookOutbox:
        """Start the delivery threads; rows pending from a previous run are delivered too."""
        with self._lock:
            if self._stopping:
                raise RuntimeError("webhook outbox is closed")
            if self._threads:
                return self
            self._threads = [threading.Thread(target=self._work, name=f"webhook-{i}", daemon=True)
                             for i in range(self.config.workers)]
            self._threads.append(threading.Thread(target=self._watchdog, name="webhook-watchdog",
                                                  daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop the threads, abandoning in-flight attempts (retried after a restart), and close the DB."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self._wake.notify_all()
        with self._watch_cond:
            for watch in self._inflight:
                _abort(watch.conn)
            self._watch_cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [thread.name for thread in self._threads if thread.is_alive()]
        if alive:
            log.warning("webhook threads still running after close: %s", ", ".join(alive))
        with self._lock:
            self._closed = True
            self._db.close()

    def counts(self) -> tuple[int, dict[str, int]]:
        """Deliveries pending now, and deliveries ended since this start by state (memory only, cheap)."""
        with self._lock:
            return self._pending, dict(self._ended)

    def stats(self) -> dict[str, int]:
        """Number of deliveries in each state: pending, delivered, failed, refused."""
        counts = dict.fromkeys(STATES, 0)
        with self._lock:
            counts.update(self._db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state"))
        return counts

    def status(self, msg_id: str) -> dict[str, Any] | None:
        """One delivery's state, attempts, last_status, last_error, next_at (None if unknown)."""
        with self._lock:
            row = self._db.execute(
                "SELECT state, attempts, last_status, last_error, next_at, created, finished,"
                " event_type, claimed_by FROM deliveries WHERE msg_id = ?", (msg_id,)).fetchone()
        if row is None:
            return None
        keys = ("state", "attempts", "last_status", "last_error", "next_at", "created", "finished",
                "event_type")
        return dict(zip(keys, row), in_flight=row[-1] is not None)

    def purge(self, now: float | None = None) -> int:
        """Delete finished rows (not pending) finished more than max_age ago; return how many."""
        with self._lock:
            return self._purge(self.clock() if now is None else now)

    # -- delivery threads ---------------------------------------------------------------

    def _purge(self, now: float) -> int:
        self._last_purge = time.monotonic()
        return self._db.execute("DELETE FROM deliveries WHERE state != ? AND finished < ?",
                                (PENDING, now - self.config.max_age)).rowcount

    def _excluded(self, now: float) -> list[str]:
        """Hosts no worker may start an attempt for now: paused, or at their concurrency (lock held)."""
        return [host for host, h in self._hosts.items()
                if h.blocked_until > now or h.inflight >= (1 if h.failures else MAX_PER_HOST)]

    def _claim(self, worker: str) -> _Row | None:
        """The next due unclaimed row of a host that may be tried, claimed for this worker (lock held)."""
        now = self.clock()
        excluded = self._excluded(now)
        skip = f" AND host NOT IN ({','.join('?' * len(excluded))})" if excluded else ""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(
                "SELECT msg_id, url, payload, created, attempts FROM deliveries WHERE state = ?"
                f" AND claimed_by IS NULL AND next_at <= ?{skip} ORDER BY next_at LIMIT 1",
                (PENDING, now, *excluded)).fetchone()
            if row is not None:
                self._db.execute("UPDATE deliveries SET claimed_by = ? WHERE msg_id = ?", (worker, row[0]))
        if row is None:
            return None
        self._hosts.setdefault(_target(row[1]), _Host()).inflight += 1
        return _Row(*row)

    def _idle_wait(self) -> float:
        """Seconds until a row may be due or a host may be tried again, at most IDLE_WAIT (lock held)."""
        now = self.clock()
        excluded = self._excluded(now)
        skip = f" AND host NOT IN ({','.join('?' * len(excluded))})" if excluded else ""
        (next_at,) = self._db.execute(
            f"SELECT MIN(next_at) FROM deliveries WHERE state = ? AND claimed_by IS NULL{skip}",
            (PENDING, *excluded)).fetchone()
        waits = [IDLE_WAIT] + ([next_at - now] if next_at is not None else [])
        waits += [h.blocked_until - now for h in self._hosts.values() if h.blocked_until > now]
        return max(0.001, min(waits))

    def _host_done(self, url: str, state: str, now: float) -> None:
        """Update the host's breaker after an attempt (lock held)."""
        name = _target(url)
        host = self._hosts.setdefault(name, _Host())
        host.inflight = max(0, host.inflight - 1)
        if state == PENDING:  # no answer, or not a 2xx: the host may be down
            host.failures += 1
            host.blocked_until = now + backoff_delay(host.failures, self.config, self._rng)
        else:
            host.failures, host.blocked_until = 0, 0.0
        if not host.failures and not host.inflight:
            del self._hosts[name]
        self._wake.notify_all()  # a host below its limit again, or a retry scheduled

    def _work(self) -> None:
        worker = threading.current_thread().name
        while True:
            try:
                with self._lock:
                    if self._stopping:
                        return
                    if time.monotonic() - self._last_purge >= PURGE_EVERY:
                        self._purge(self.clock())
                    row = self._claim(worker)
                    if row is None:
                        self._wake.wait(self._idle_wait())
                        continue
                try:
                    outcome = self._attempt(row)
                except Exception as exc:  # a bug, not the receiver: keep the thread, retry the row
                    log.exception("webhook %s: unexpected error in a delivery attempt", row.msg_id)
                    outcome = _Outcome(PENDING, None, f"internal error: {type(exc).__name__}: {exc}")
                self._finish(row, outcome)
            except sqlite3.Error:
                log.exception("webhook outbox database error; retrying in %.0fs", IDLE_WAIT)
                time.sleep(IDLE_WAIT)

    def _attempt(self, row: _Row) -> _Outcome:
        """One signed POST of a row; the outcome to record."""
        host = _host(row.url)
        try:
            parts = check_url(row.url)
            host = parts.hostname or host
            https = parts.scheme.lower() == "https"
            port = parts.port or (443 if https else 80)
            addresses = resolve(host, port, self.config.allow_private, timeout=self.config.timeout)
        except WebhookRefused as exc:
            return _Outcome(REFUSED, None, str(exc))
        except OSError as exc:
            return _Outcome(PENDING, None, f"cannot resolve {host}: {exc}")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = signed_headers(self.config.secret, row.msg_id, int(self.clock()), row.payload)
        timeout = self.config.timeout
        deadline = time.monotonic() + timeout
        conn: http.client.HTTPConnection
        if https:
            conn = PinnedHTTPSConnection(host, port, addresses, deadline, self.ssl_context)
        else:
            conn = PinnedHTTPConnection(host, port, addresses, deadline)
        watch = _Watch(conn, deadline)
        with self._watch_cond:
            self._inflight.add(watch)
            self._watch_cond.notify()
        try:
            conn.connect()
            if self._stopping:  # close() ran during connect, before it could shut this socket
                raise ConnectionAbortedError("outbox closing")
            conn.request("POST", path, body=row.payload, headers=headers)
            response = conn.getresponse()
            response.read(MAX_RESPONSE_BYTES)
            status, reason = response.status, response.reason
        except (OSError, http.client.HTTPException) as exc:
            if self._stopping:
                error = "abandoned at shutdown"
            elif watch.fired or isinstance(exc, TimeoutError):
                error = f"timed out after {timeout:g}s"
            else:
                error = f"{type(exc).__name__}: {exc}"
            return _Outcome(PENDING, None, error)
        finally:
            with self._watch_cond:
                self._inflight.discard(watch)
            conn.close()
        if watch.fired:  # e.g. a dripped header cut short, which http.client takes as complete
            return _Outcome(PENDING, None, f"timed out after {timeout:g}s")
        if 200 <= status < 300:
            return _Outcome(DELIVERED, status, None)
        if status == 410:
            return _Outcome(FAILED, status, "HTTP 410 Gone: the receiver wants no more deliveries")
        note = " (redirects are not followed)" if 300 <= status < 400 else ""
        return _Outcome(PENDING, status, f"HTTP {status} {reason}{note}")

    def _finish(self, row: _Row, outcome: _Outcome) -> None:
        """Record an attempt's outcome and schedule the retry, if any."""
        now = self.clock()
        state, status, error = outcome
        error = error[:MAX_ERROR_CHARS] if error else None
        attempts = row.attempts + 1
        delay = 0.0
        with self._lock:
            if self._closed:
                log.info("webhook %s: attempt ended after close; it is retried after restart", row.msg_id)
                return
            self._host_done(row.url, state, now)
            if self._stopping and state == PENDING:
                # Abandoned, not failed: keep the attempt count, due at once after a restart.
                self._db.execute("UPDATE deliveries SET claimed_by = NULL WHERE msg_id = ?", (row.msg_id,))
                return
            if state == PENDING:
                deadline = row.created + self.config.max_age
                if now >= deadline:
                    state = FAILED
                    error = f"gave up after {attempts} attempts; last: {error}"[:MAX_ERROR_CHARS]
                else:
                    delay = min(backoff_delay(attempts, self.config, self._rng), deadline - now)
            self._db.execute(
                "UPDATE deliveries SET state = ?, attempts = ?, next_at = ?, last_status = ?,"
                " last_error = ?, finished = ?, claimed_by = NULL WHERE msg_id = ?",
                (state, attempts, now + delay, status, error, None if state == PENDING else now,
                 row.msg_id))
            if state != PENDING:
                self._pending -= 1
                self._ended[state] = self._ended.get(state, 0) + 1
        host = _host(row.url)
        if state == DELIVERED:
            log.info("webhook %s delivered to %s (attempt %d, HTTP %s)", row.msg_id, host, attempts, status)
        elif state == PENDING:
            log.info("webhook %s to %s: attempt %d failed (%s); retry in %.1fs",
                     row.msg_id, host, attempts, error, delay)
        else:
            log.warning("webhook %s to %s %s: %s", row.msg_id, host, state, error)

    def _watchdog(self) -> None:
        """Shut the sockets of attempts that run past their deadline."""
        with self._watch_cond:
            while not self._stopping:
                now = time.monotonic()
                waiting = []
                for watch in self._inflight:
                    if watch.fired:
                        continue
                    if watch.deadline <= now:
                        watch.fired = True
                        _abort(watch.conn)
                    else:
                        waiting.append(watch.deadline)
                self._watch_cond.wait(min(waiting) - now if waiting else None)
