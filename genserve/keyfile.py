"""The key-file format shared by the front and `genservectl keys`: key records and `api_keys.enc`.

Keys are held only as SHA-256 hashes. The encrypted key file is Fernet over JSON; format 2
(ours) stores hashes and previews only: ``{"version": 2, "keys": [record...]}``. The
earlier implementation stored ``{full_key: {name, permissions, ...}}`` as a Fernet token,
or as plaintext ``api_keys.json``; both are read and rewritten in format 2 (the plaintext
file is then removed).

Anything that cannot be read (wrong key, corrupted token, bad JSON) raises KeyFileError
and the file is left exactly as it was: never a plaintext fallback, never an overwrite of
what could not be read. Every read-modify-write holds an exclusive ``flock`` on a lock file
beside the key file, so several fronts (and threads) sharing one file never lose each
other's changes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
import unicodedata
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from genserve.catalog import DEFAULT_PRIORITY_FLOOR, MAX_PRIORITY, MAX_WEIGHT, MIN_PRIORITY, MIN_WEIGHT

log = logging.getLogger(__name__)

PERMISSIONS = ("generation", "readonly", "admin", "all", "metrics")  # metrics: /metrics only, for scrapers
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


def parse_weight(text: str) -> float:
    """A fair-share weight from form text: a finite number in MIN_WEIGHT..MAX_WEIGHT."""
    try:
        value = float(text.strip())
    except ValueError:
        raise InvalidKeySpec("must be a number") from None
    if not MIN_WEIGHT <= value <= MAX_WEIGHT:  # also false for NaN
        raise InvalidKeySpec(f"must be in {MIN_WEIGHT:g}..{MAX_WEIGHT:g}")
    return value


def parse_floor(text: str) -> int:
    """A priority floor from form text: an integer in MIN_PRIORITY..MAX_PRIORITY."""
    text = text.strip()
    if not re.fullmatch(r"[+-]?[0-9]{1,6}", text):
        raise InvalidKeySpec("must be an integer")
    value = int(text)
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise InvalidKeySpec(f"must be in {MIN_PRIORITY}..{MAX_PRIORITY}")
    return value


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
    weight: float = 1.0  # fair share between keys at one priority (MIN_WEIGHT..MAX_WEIGHT)
    priority_floor: int | None = None  # most urgent priority allowed; None: DEFAULT_PRIORITY_FLOOR, admins any

    def floor(self, default: int = DEFAULT_PRIORITY_FLOOR) -> int:
        """The most urgent (lowest) priority number this key may ask for (`default` unless set; admins any)."""
        if self.priority_floor is not None:
            return self.priority_floor
        return MIN_PRIORITY if {"admin", "all"} & set(self.permissions) else default

    @classmethod
    def from_raw(cls, raw: str, name: str, permissions: tuple[str, ...], source: str) -> "KeyRecord":
        """Build a record from a clear key (which is then forgotten)."""
        return cls(hash_key(raw), key_id_of(raw), preview_of(raw), name, permissions, source)

    @property
    def owner(self) -> str:
        """The key's unique identity (see owner_of)."""
        return self.key_hash[:OWNER_HEX]

    def listing(self, default_floor: int = DEFAULT_PRIORITY_FLOOR) -> dict[str, Any]:
        """The public view used by GET /auth/keys."""
        out = asdict(self)
        del out["key_hash"]
        out["permissions"] = list(self.permissions)
        out["can_delete"] = self.source == "file"
        out["priority_floor"] = self.floor(default_floor)
        return out

    def to_file(self) -> dict[str, Any]:
        """The form stored in the key file; scheduling fields only when set, so older fronts can still read it."""
        out = asdict(self)
        out["permissions"] = list(self.permissions)
        if out["weight"] == 1.0:
            del out["weight"]
        if out["priority_floor"] is None:
            del out["priority_floor"]
        return out



LEGACY_SALT = b"genserve_salt_2024"
LEGACY_ITERATIONS = 100_000
FORMAT = 2


class KeyFileError(Exception):
    """The key file or the encryption key cannot be used; nothing was changed."""


def derive_fernet_key(password: str) -> str:
    """The earlier implementation's key derivation (PBKDF2-HMAC-SHA256, fixed salt)."""
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=LEGACY_SALT, iterations=LEGACY_ITERATIONS)
    return base64.urlsafe_b64encode(kdf.derive(password.encode("utf-8"))).decode("ascii")


def make_fernet(encryption_key: str | None, legacy_password: str) -> Fernet:
    """Fernet from API_KEYS_ENCRYPTION_KEY, or the legacy derivation when it is unset."""
    if encryption_key is None:
        log.warning("API_KEYS_ENCRYPTION_KEY is not set: the key file is encrypted with a key derived"
                    " from DEFAULT_API_KEY (compatible, but weak); set one with `genservectl crypto-key`")
        return Fernet(derive_fernet_key(legacy_password))
    key = encryption_key.strip()
    try:
        if len(key) != 44 or len(base64.urlsafe_b64decode(key)) != 32:
            raise ValueError
        return Fernet(key)
    except (ValueError, binascii.Error):
        raise KeyFileError("API_KEYS_ENCRYPTION_KEY is malformed: it must be 44 characters of url-safe base64"
                           " encoding 32 bytes (create one with `genservectl crypto-key`)") from None


def _legacy_records(data: dict) -> list[KeyRecord]:
    records = []
    for raw, info in data.items():
        if not isinstance(info, dict):
            raise KeyFileError("legacy key file entry is not an object")
        record = KeyRecord(hash_key(raw), key_id_of(raw), preview_of(raw), str(info.get("name", "")),
                           parse_permissions(info.get("permissions") or ["all"]), "file",
                           float(info.get("created_at") or 0.0), info.get("last_used"),
                           int(info.get("usage_count") or 0))
        records.append(record)
    return records


def _records(data: object) -> tuple[list[KeyRecord], bool]:
    """Records from decoded JSON, and whether it was a legacy layout."""
    if isinstance(data, dict) and data.get("version") == FORMAT:
        out = []
        known = {f.name for f in fields(KeyRecord)}
        for item in data.get("keys", []):
            item = {k: v for k, v in dict(item).items() if k in known}  # fields of a newer version are skipped
            item["permissions"] = tuple(item["permissions"])
            item["source"] = "file"
            try:
                if "weight" in item:
                    item["weight"] = parse_weight(str(item["weight"]))
                if item.get("priority_floor") is not None:
                    item["priority_floor"] = parse_floor(str(item["priority_floor"]))
            except InvalidKeySpec as exc:
                raise KeyFileError(f"key {item.get('key_id')!r} in the key file: {exc}") from None
            out.append(KeyRecord(**item))
        return out, False
    if isinstance(data, dict):
        return _legacy_records(data), True
    raise KeyFileError("key file content is not a JSON object")


class KeyFile:
    """One encrypted key file shared by any number of fronts."""

    def __init__(self, path: Path, fernet: Fernet) -> None:
        self.path = path
        self.plaintext = path.with_name("api_keys.json")
        self.lock_path = path.with_name(path.name + ".lock")
        self.fernet = fernet
        self._thread_lock = threading.Lock()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def stamp(self) -> tuple[int, int] | None:
        """(mtime_ns, size) of the file, to notice changes made by other fronts."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def _read(self) -> tuple[list[KeyRecord], bool]:
        """Records and whether the file must be rewritten (legacy content); raises KeyFileError."""
        if self.path.exists():
            token = self.path.read_bytes()
            try:
                text = self.fernet.decrypt(token).decode("utf-8")
            except InvalidToken:
                raise KeyFileError(f"cannot decrypt {self.path}: wrong API_KEYS_ENCRYPTION_KEY or a corrupted"
                                   " file (it was left untouched)") from None
            try:
                records, legacy = _records(json.loads(text))
            except (ValueError, TypeError, KeyError) as exc:
                raise KeyFileError(f"{self.path} decrypts but is not a key list: {exc}") from None
            if self.plaintext.exists():
                log.warning("both %s and %s exist; using the encrypted file", self.path, self.plaintext)
            return records, legacy
        if self.plaintext.exists():
            try:
                records, _ = _records(json.loads(self.plaintext.read_text(encoding="utf-8")))
            except (ValueError, TypeError, KeyError) as exc:
                raise KeyFileError(f"{self.plaintext} is not a valid key list: {exc}") from None
            return records, True
        return [], False

    def _write(self, records: list[KeyRecord]) -> None:
        payload = json.dumps({"version": FORMAT, "keys": [r.to_file() for r in records]}, ensure_ascii=False)
        token = self.fernet.encrypt(payload.encode("utf-8"))
        fd, tmp = tempfile.mkstemp(prefix=".api_keys.", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(token)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def inspect(self) -> tuple[list[KeyRecord], bool]:
        """Read without writing anything: (records, whether the content is a legacy layout)."""
        with self._locked():
            return self._read()

    def load(self) -> list[KeyRecord]:
        """Read the keys, migrating legacy content to format 2 (and removing api_keys.json)."""
        with self._locked():
            records, legacy = self._read()
            if legacy:
                self._write(records)
                log.warning("migrated %d legacy keys into %s (full keys are no longer stored)",
                            len(records), self.path)
                if self.plaintext.exists():
                    self.plaintext.unlink()
                    log.warning("removed plaintext %s", self.plaintext)
            return records

    def update(self, change: Callable[[list[KeyRecord]], list[KeyRecord]]) -> list[KeyRecord]:
        """Locked read-modify-write: `change` gets the current records and returns the new list."""
        with self._locked():
            records, _ = self._read()
            new = change(records)
            self._write(new)
            if self.plaintext.exists():
                self.plaintext.unlink()
            return new
