"""API keys: records, parsing of API_KEY_N, and the in-memory key store.

Keys are held only as SHA-256 hashes. Lookup is by hash: comparing digests of
a secret reveals nothing useful about the secret through timing, and the final
equality check uses ``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
import unicodedata
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Mapping

log = logging.getLogger(__name__)

PERMISSIONS = ("generation", "readonly", "admin", "all")
DEFAULT_KEY = "genserve-default-key-2024"
MIN_KEY_LENGTH = 20
OWNER_HEX = 32
MAX_NAME_LENGTH = 100
# Control, format, surrogate, private-use and line/paragraph separator characters.
_BAD_NAME_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})


class InvalidKeySpec(ValueError):
    """A key definition or administration request that cannot be honoured."""


def hash_key(raw: str) -> str:
    """Hex SHA-256 of a key."""
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def owner_of(raw: str) -> str:
    """The identity used for task ownership and rate limits: 128 bits of the key's SHA-256.

    Unlike the display ``key_id`` (first 8 + last 4 characters), two different keys
    never share it in practice, so it is safe to authorise with.
    """
    return hash_key(raw)[:OWNER_HEX]


def key_id_of(raw: str) -> str:
    """The legacy key id (first 8 characters, '-', last 4); short keys get a hash-based id instead."""
    if len(raw) >= 24:
        return f"{raw[:8]}-{raw[-4:]}"
    return "h-" + hash_key(raw)[:12]


def preview_of(raw: str) -> str:
    """'first8...last4' for long keys; short keys show at most a quarter of themselves."""
    if len(raw) >= 24:
        return f"{raw[:8]}...{raw[-4:]}"
    shown = max(1, len(raw) // 4)
    return f"{raw[:shown]}...({len(raw)} chars)"


def new_key() -> str:
    """A fresh key: 32 random bytes from `secrets` (256 bits), URL-safe."""
    return "gs-" + secrets.token_urlsafe(32)


def parse_permissions(text: str | Iterable[str] | None, empty_means_all: bool = True) -> tuple[str, ...]:
    """Comma list (or iterable) of permissions, trimmed; empty means all (API_KEY_N) unless told otherwise."""
    items = text.split(",") if isinstance(text, str) else list(text or [])
    perms = tuple(dict.fromkeys(p.strip() for p in items if p and p.strip()))
    unknown = [p for p in perms if p not in PERMISSIONS]
    if unknown:
        raise InvalidKeySpec(f"unknown permission(s) {unknown}; valid: {list(PERMISSIONS)}")
    if not perms and not empty_means_all:
        raise InvalidKeySpec(f"at least one permission is required; valid: {list(PERMISSIONS)}")
    return perms or ("all",)


def check_name(name: str) -> str:
    """A key name, trimmed; InvalidKeySpec unless 1-100 printable characters without ':'."""
    name = name.strip()
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidKeySpec(f"must be 1-{MAX_NAME_LENGTH} characters")
    if any(unicodedata.category(c) in _BAD_NAME_CATEGORIES for c in name):
        raise InvalidKeySpec("must not contain control characters (NUL, newline, ...)")
    if ":" in name:
        raise InvalidKeySpec("must not contain ':' (config_string is key:name:permissions)")
    return name


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


@dataclass
class KeyRecord:
    """One key as stored: hash and preview, never the key itself."""

    key_hash: str
    key_id: str
    key_preview: str
    name: str
    permissions: tuple[str, ...]
    source: str  # environment | file | default
    created_at: float = field(default_factory=time.time)
    last_used: float | None = None
    usage_count: int = 0

    @classmethod
    def from_raw(cls, raw: str, name: str, permissions: tuple[str, ...], source: str) -> "KeyRecord":
        """Build a record from a clear key (which is then forgotten)."""
        return cls(hash_key(raw), key_id_of(raw), preview_of(raw), name, permissions, source)

    @property
    def owner(self) -> str:
        """The key's unique identity (see owner_of)."""
        return self.key_hash[:OWNER_HEX]

    def listing(self) -> dict[str, Any]:
        """The public view used by GET /auth/keys."""
        out = asdict(self)
        del out["key_hash"]
        out["permissions"] = list(self.permissions)
        out["can_delete"] = self.source == "file"
        return out

    def to_file(self) -> dict[str, Any]:
        """The form stored in the key file."""
        out = asdict(self)
        out["permissions"] = list(self.permissions)
        return out


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
                 default_key: str | None = None, clock: Any = time.monotonic) -> None:
        self._lock = threading.RLock()
        self._env = list(env_records)
        self._keyfile = keyfile
        self._default = default_key
        self._clock = clock
        self._file_records: list[KeyRecord] = []
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._by_hash: dict[str, KeyRecord] = {}
        self._rebuild()

    @classmethod
    def from_env(cls, env_keys: list[tuple[str, str, tuple[str, ...]]], default_key: str | None,
                 keyfile: Any = None) -> "KeyStore":
        """Environment keys (API_KEY_N), an optional key file, and the default key."""
        records = [KeyRecord.from_raw(raw, name, perms, "environment") for raw, name, perms in env_keys]
        store = cls(records, keyfile, default_key)
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
            return Principal(record.key_id, record.name, record.permissions, record.source, record.owner)

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

    def create(self, name: str, permissions: tuple[str, ...]) -> tuple[str, KeyRecord]:
        """A new random key stored in the file; returns (the key, shown only now, and its record)."""
        if self._keyfile is None:
            raise StoreError(409, "no key file is configured on this front")
        try:
            name = check_name(name)
        except InvalidKeySpec as exc:
            raise StoreError(422, f"name: {exc}") from None
        raw = new_key()
        record = KeyRecord.from_raw(raw, name, permissions, "file")
        records = self._keyfile.update(lambda current: current + [record])
        with self._lock:
            self._file_records = records
            self._stamp = self._keyfile.stamp()
            self._rebuild()
        return raw, record

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

        if self._keyfile is None:
            raise StoreError(404, f"no API key matches {what}")
        records = self._keyfile.update(change)
        with self._lock:
            self._file_records = records
            self._stamp = self._keyfile.stamp()
            self._rebuild()
        return deleted
