"""The encrypted key file (`api_keys.enc`): Fernet over JSON, atomic writes, legacy migration.

Format 2 (ours) stores hashes and previews only: ``{"version": 2, "keys": [record...]}``.
The earlier implementation stored ``{full_key: {name, permissions, ...}}`` as a
Fernet token, or as plaintext ``api_keys.json``; both are read and rewritten in
format 2 (the plaintext file is then removed).

Anything that cannot be read (wrong key, corrupted token, bad JSON) raises
KeyFileError and the file is left exactly as it was: never a plaintext fallback,
never an overwrite of what could not be read. Every read-modify-write holds an
exclusive ``flock`` on a lock file beside the key file, so several fronts (and
threads) sharing one file never lose each other's changes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from http_front.keys import KeyRecord, hash_key, key_id_of, parse_permissions, preview_of

log = logging.getLogger(__name__)

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
        for item in data.get("keys", []):
            item = dict(item)
            item["permissions"] = tuple(item["permissions"])
            item["source"] = "file"
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
