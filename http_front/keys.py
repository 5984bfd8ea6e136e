"""API keys: records, parsing of API_KEY_N, and the in-memory key store.

Keys are held only as SHA-256 hashes. Lookup is by hash: comparing digests of
a secret reveals nothing useful about the secret through timing, and the final
equality check uses ``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Mapping

PERMISSIONS = ("generation", "readonly", "admin", "all")
DEFAULT_KEY = "genserve-default-key-2024"


class KeyError_(ValueError):
    """A key definition or administration request that cannot be honoured."""


def hash_key(raw: str) -> str:
    """Hex SHA-256 of a key."""
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


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


def parse_permissions(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """Comma list (or iterable) of permissions, trimmed; empty means all."""
    items = text.split(",") if isinstance(text, str) else list(text or [])
    perms = tuple(dict.fromkeys(p.strip() for p in items if p and p.strip()))
    unknown = [p for p in perms if p not in PERMISSIONS]
    if unknown:
        raise KeyError_(f"unknown permission(s) {unknown}; valid: {list(PERMISSIONS)}")
    return perms or ("all",)


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of a request."""

    key_id: str
    name: str
    permissions: tuple[str, ...]
    source: str


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
            raise KeyError_(f"{name} has an empty key")
        key_name = parts[1] if len(parts) > 1 and parts[1] else f"key{suffix}"
        perms = parse_permissions(parts[2] if len(parts) > 2 else "")
        found.append((int(suffix), raw, key_name, perms))
    return [(raw, key_name, perms) for _, raw, key_name, perms in sorted(found)]


class KeyStore:
    """Thread-safe set of key records with authentication and usage counting."""

    def __init__(self, records: Iterable[KeyRecord] = ()) -> None:
        self._lock = threading.RLock()
        self._by_hash: dict[str, KeyRecord] = {}
        for record in records:
            self._by_hash[record.key_hash] = record

    @classmethod
    def from_env(cls, env_keys: list[tuple[str, str, tuple[str, ...]]], default_key: str | None,
                 extra: Iterable[KeyRecord] = ()) -> "KeyStore":
        """Environment keys + `extra`; the default key only when there is no other key."""
        records = [KeyRecord.from_raw(raw, name, perms, "environment") for raw, name, perms in env_keys]
        records += list(extra)
        if not records and default_key:
            records.append(KeyRecord.from_raw(default_key, "default", ("all",), "default"))
        return cls(records)

    def authenticate(self, raw: str) -> Principal | None:
        """The principal for a key, or None; counts the use."""
        digest = hash_key(raw)
        with self._lock:
            record = self._by_hash.get(digest)
            if record is None or not hmac.compare_digest(record.key_hash, digest):
                return None
            record.last_used = time.time()
            record.usage_count += 1
            return Principal(record.key_id, record.name, record.permissions, record.source)

    def records(self) -> list[KeyRecord]:
        """Copies of every record, by creation time."""
        with self._lock:
            return sorted((replace(r) for r in self._by_hash.values()), key=lambda r: r.created_at)

    @property
    def uses_default(self) -> bool:
        """True while the built-in default key is the only key."""
        with self._lock:
            return any(r.source == "default" for r in self._by_hash.values())
