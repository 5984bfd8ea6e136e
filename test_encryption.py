"""Legacy self-check from the API guide (section 10.5): `python test_encryption.py`.

A thin wrapper over `genservectl keys check --allow-missing`: checks that the configured
API_KEYS_ENCRYPTION_KEY (or the legacy derived key) works and that the key file, if any,
opens with it. Changes nothing; exits non-zero with a clear message on failure.
"""

from __future__ import annotations

from genservectl.keys import check

if __name__ == "__main__":
    check.main(["--allow-missing"], prog_name="test_encryption.py")
