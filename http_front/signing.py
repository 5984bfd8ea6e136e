"""Short-lived signed URLs, for clients that cannot send a key header (an `<img src>`, `curl -o`).

A URL ``/task/{id}/image?expires=T&sig=S`` grants GET on that one path until the Unix time
T: S is HMAC-SHA256 over the path and T with a secret every front of a deployment shares
(`GENSERVE_URL_SECRET`; without it each front draws its own, and URLs made by one front
are refused by the others). Comparison is constant-time; no key is ever part of a URL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Callable

MAX_TTL = 24 * 3600.0  # a URL that claims to live longer than this is refused whatever its signature


class UrlSigner:
    """Makes and checks signed URLs for GET paths."""

    def __init__(self, secret: bytes, ttl: float = 900.0, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 16:
            raise ValueError("the URL signing secret needs at least 16 bytes")
        self._secret = secret
        self.ttl = ttl
        self.clock = clock

    def _sig(self, path: str, expires: int) -> str:
        mac = hmac.new(self._secret, f"GET\n{path}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:24]).decode().rstrip("=")

    def sign(self, path: str) -> str:
        """`path` with `expires` and `sig` query parameters, valid for `ttl` seconds."""
        expires = int(self.clock() + self.ttl)
        return f"{path}?expires={expires}&sig={self._sig(path, expires)}"

    def verify(self, path: str, expires: str | None, sig: str | None) -> bool:
        """Whether (`expires`, `sig`) sign `path` and have not expired."""
        if not expires or not sig or not expires.isascii() or not expires.isdigit() or len(expires) > 12:
            return False
        when, now = int(expires), self.clock()
        if not now <= when <= now + MAX_TTL:
            return False
        return hmac.compare_digest(self._sig(path, when), sig)
