"""API keys: parsing of API_KEY_N, principals, and the in-memory key store.

Keys are held only as SHA-256 hashes. Lookup is by hash: comparing digests of
a secret reveals nothing useful about the secret through timing, and the final
equality check uses ``hmac.compare_digest``.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping

from genserve.catalog import DEFAULT_PRIORITY_FLOOR
from genserve.keyfile import (  # noqa: F401  (re-exported: the front's key API in one place)
    DEFAULT_KEY,
    MAX_NAME_LENGTH,
    MIN_KEY_LENGTH,
    OWNER_HEX,
    PERMISSIONS,
    InvalidKeySpec,
    KeyRecord,
    check_name,
    hash_key,
    key_id_of,
    new_key,
    owner_of,
    parse_permissions,
    preview_of,
)

log = logging.getLogger(__name__)

def weak_keys(records: Iterable[tuple[str, str, tuple[str, ...]]]) -> list[str]:
    """Names of keys short enough to guess, from (key, name, permissions) as parse_env_keys returns them."""
    return [name for raw, name, _ in records if len(raw) < MIN_KEY_LENGTH]


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of a request."""

    key_id: str  # for display only: two keys may share it
    name: str
    permissions: tuple[str, ...]
    source: str
    owner: str  # unique per key: task ownership and rate limits
    weight: float = 1.0  # fair share against other keys at one priority
    priority_floor: int = DEFAULT_PRIORITY_FLOOR  # the most urgent priority it may ask for


def parse_env_keys(env: Mapping[str, str]) -> list[tuple[str, str, tuple[str, ...]]]:
    """API_KEY_1..N ("key:name:perms"), any N, sorted by N; items trimmed."""
    found = []
    for name, value in env.items():
        suffix = name[len("API_KEY_"):] if name.startswith("API_KEY_") else ""
        if not suffix.isdigit() or not value.strip():
            continue
        parts = [x.strip() for x in value.split(":", 2)]
        raw = parts[0]
        if not raw:
            raise InvalidKeySpec(f"{name} has an empty key")
        key_name = parts[1] if len(parts) > 1 and parts[1] else f"key{suffix}"
        perms = parse_permissions(parts[2] if len(parts) > 2 else "")
        found.append((int(suffix), raw, key_name, perms))
    return [(raw, key_name, perms) for _, raw, key_name, perms in sorted(found)]


class StoreError(Exception):
    """An administration request the store refuses, with the HTTP status it deserves."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def can_administer(permissions: Iterable[str]) -> bool:
    """Whether a permission set reaches the admin endpoints."""
    return bool({"admin", "all"} & set(permissions))


class KeyStore:
    """Thread-safe keys from the environment, the key file and the default key.

    The default key works only while no admin-capable key exists, so that a fresh
    install can create its first keys in any order without locking anyone out. Usage counters
    live in memory (per front process); the file holds hashes, names and permissions.
    """

    RELOAD_CHECK_S = 1.0

    def __init__(self, env_records: Iterable[KeyRecord] = (), keyfile: Any = None,
                 default_key: str | None = None, clock: Any = time.monotonic,
                 default_floor: int = DEFAULT_PRIORITY_FLOOR) -> None:
        self.default_floor = default_floor  # the priority floor of non-admin keys that have none set
        self._lock = threading.RLock()
        self._env = list(env_records)
        self._keyfile = keyfile
        self._default = default_key
        self._clock = clock
        self._file_records: list[KeyRecord] = []
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._by_hash: dict[str, KeyRecord] = {}
        self._principals: dict[str, Principal] = {}  # by key hash, made on first use; emptied by _rebuild
        self._rebuild()

    @classmethod
    def from_env(cls, env_keys: list[tuple[str, str, tuple[str, ...]]], default_key: str | None,
                 keyfile: Any = None, default_floor: int = DEFAULT_PRIORITY_FLOOR) -> "KeyStore":
        """Environment keys (API_KEY_N), an optional key file, and the default key."""
        records = [KeyRecord.from_raw(raw, name, perms, "environment") for raw, name, perms in env_keys]
        store = cls(records, keyfile, default_key, default_floor=default_floor)
        if keyfile is not None:
            store.reload()
        return store

    def _rebuild(self) -> None:
        old = self._by_hash
        records = self._env + self._file_records
        default_was_on = any(r.source == "default" for r in old.values())
        if self._default and not any(can_administer(r.permissions) for r in records):
            # Until someone can administer, the default key (loopback only) is the way in.
            records = records + [KeyRecord.from_raw(self._default, "default", ("all",), "default")]
            if old and not default_was_on:
                log.warning("no admin-capable key is left: the default key works again (loopback only)")
        elif default_was_on:
            log.warning("an admin-capable key exists: the default key no longer works")
        fresh: dict[str, KeyRecord] = {}
        for record in records:
            if record.key_hash in fresh:
                continue  # an environment key wins over the same key in the file
            previous = old.get(record.key_hash)
            if previous is not None and previous.usage_count > record.usage_count:
                record.usage_count, record.last_used = previous.usage_count, previous.last_used
            fresh[record.key_hash] = record
        self._by_hash = fresh
        self._principals = {}

    def reload(self) -> int:
        """Re-read the key file (KeyFileError leaves the current keys in place); returns the key count."""
        if self._keyfile is not None:
            records = self._keyfile.load()
            with self._lock:
                self._file_records = records
                self._stamp = self._keyfile.stamp()
                self._rebuild()
        return len(self._by_hash)

    def _maybe_reload(self) -> None:
        now = self._clock()
        if self._keyfile is None or now - self._checked < self.RELOAD_CHECK_S:
            return
        self._checked = now
        if self._keyfile.stamp() != self._stamp:
            try:
                self.reload()
            except Exception:  # keep serving with the keys we have; the admin sees it on reload-keys
                log.exception("key file changed but cannot be read; keeping the current keys")

    def authenticate(self, raw: str) -> Principal | None:
        """The principal for a key, or None; counts the use."""
        self._maybe_reload()
        digest = hash_key(raw)
        with self._lock:
            record = self._by_hash.get(digest)
            if record is None or not hmac.compare_digest(record.key_hash, digest):
                return None
            record.last_used = time.time()
            record.usage_count += 1
            principal = self._principals.get(digest)
            if principal is None:
                principal = self._principals[digest] = Principal(
                    record.key_id, record.name, record.permissions, record.source, record.owner, record.weight,
                    record.floor(self.default_floor))
            return principal

    def records(self) -> list[KeyRecord]:
        """Copies of every record, by creation time."""
        self._maybe_reload()
        with self._lock:
            return sorted((replace(r) for r in self._by_hash.values()), key=lambda r: r.created_at)

    @property
    def uses_default(self) -> bool:
        """True while the built-in default key works (no admin-capable key exists)."""
        with self._lock:
            return any(r.source == "default" for r in self._by_hash.values())

    def create(self, name: str, permissions: tuple[str, ...], weight: float = 1.0,
               priority_floor: int | None = None) -> tuple[str, KeyRecord]:
        """A new random key stored in the file; returns (the key, shown only now, and its record)."""
        if self._keyfile is None:
            raise StoreError(409, "no key file is configured on this front")
        try:
            name = check_name(name)
        except InvalidKeySpec as exc:
            raise StoreError(422, f"name: {exc}") from None
        raw = new_key()
        record = replace(KeyRecord.from_raw(raw, name, permissions, "file"), weight=weight,
                         priority_floor=priority_floor)
        records = self._keyfile.update(lambda current: current + [record])
        with self._lock:
            self._file_records = records
            self._stamp = self._keyfile.stamp()
            self._rebuild()
        return raw, record

    def schedule(self, key_id: str, weight: float | None, priority_floor: int | None,
                 reset_floor: bool = False) -> KeyRecord:
        """Change one file key's fair-share weight and priority floor (the key_id must name one key)."""
        changed: list[KeyRecord] = []

        def change(current: list[KeyRecord]) -> list[KeyRecord]:
            changed.clear()
            targets = [r for r in self._env + current if r.key_id == key_id]
            if not targets:
                raise StoreError(404, f"no API key matches key_id {key_id!r}")
            if len(targets) > 1:
                raise StoreError(409, f"key_id {key_id!r} matches {len(targets)} keys; nothing was changed")
            if targets[0].source != "file":
                raise StoreError(403, "only keys in the key file can be changed; environment keys keep the defaults")
            out = []
            for r in current:
                if r.key_id == key_id:
                    floor = None if reset_floor else (r.priority_floor if priority_floor is None else priority_floor)
                    r = replace(r, weight=r.weight if weight is None else weight, priority_floor=floor)
                    changed.append(r)
                out.append(r)
            return out

        self._update(change, f"key_id {key_id!r}")
        return changed[0]

    def delete(self, match: Any, what: str, unique: bool = False) -> list[KeyRecord]:
        """Delete the file keys for which `match(record)` is true; refuses environment keys and lock-out.

        With `unique`, a match of more than one key deletes nothing (409): a key_id is
        only the key's two ends, and two keys may share it.
        """
        deleted: list[KeyRecord] = []

        def change(current: list[KeyRecord]) -> list[KeyRecord]:
            deleted.clear()
            merged = {r.key_hash: r for r in self._env + current}
            targets = [r for r in merged.values() if match(r)]
            if not targets:
                raise StoreError(404, f"no API key matches {what}")
            if unique and len(targets) > 1:
                raise StoreError(409, f"{what} matches {len(targets)} keys; nothing was deleted:"
                                      " delete by the full key (api_key) instead")
            if any(r.source == "environment" for r in targets):
                raise StoreError(403, f"environment keys cannot be deleted ({what}); remove API_KEY_N instead")
            remaining = [r for r in merged.values() if r not in targets]
            if any(can_administer(r.permissions) for r in targets) and \
                    not any(can_administer(r.permissions) for r in remaining):
                raise StoreError(409, "refusing to delete the last key that can administer")
            deleted.extend(targets)
            return [r for r in current if r not in targets]

        self._update(change, what)
        return deleted

    def _update(self, change: Any, what: str) -> None:
        """Apply `change` to the key file under its lock, then use the records it wrote."""
        if self._keyfile is None:
            raise StoreError(404, f"no API key matches {what}")
        records = self._keyfile.update(change)
        with self._lock:
            self._file_records = records
            self._stamp = self._keyfile.stamp()
            self._rebuild()
