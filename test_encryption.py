"""Legacy self-check from the API guide (section 10.5): `python test_encryption.py`.

Checks that the configured API_KEYS_ENCRYPTION_KEY (or the legacy derived key) is
usable, round-trips a Fernet token, and, when the key file exists, that it opens.
Changes nothing; exits non-zero with a clear message on failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from http_front.keyfile import KeyFile, KeyFileError, make_fernet
from http_front.keys import DEFAULT_KEY


def main() -> int:
    """Run the checks and print one line per result."""
    try:
        fernet = make_fernet(os.environ.get("API_KEYS_ENCRYPTION_KEY") or None,
                             os.environ.get("DEFAULT_API_KEY") or DEFAULT_KEY)
    except KeyFileError as exc:
        print(f"FAIL encryption key: {exc}")
        return 1
    probe = "genserve-encryption-self-check".encode()
    if fernet.decrypt(fernet.encrypt(probe)) != probe:
        print("FAIL round trip")
        return 1
    print("ok   encryption key and Fernet round trip")
    path = Path(os.environ.get("API_KEYS_FILE", "api_keys.enc"))
    if not path.exists():
        print(f"ok   no key file at {path} yet (it is created by the first generate-key)")
        return 0
    try:
        records, legacy = KeyFile(path, fernet).inspect()
    except KeyFileError as exc:
        print(f"FAIL {exc}")
        return 1
    print(f"ok   {path} opens: {len(records)} keys{' (legacy format)' if legacy else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
