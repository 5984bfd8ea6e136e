"""Authentication, permissions and rate limits as Falcon middleware.

Each resource declares ``auth = {"GET": ("readonly",), ...}``: the permissions
any one of which grants the method. ``admin`` and ``all`` grant everything
(guide table 0.2). A resource without ``auth`` for a method is refused (403),
so a forgotten declaration fails closed. Only a resource that declares
``public = True`` (the API description: /openapi.json, /docs) is served
without a key, and without counting against any rate limit.
"""

from __future__ import annotations

import functools
import ipaddress
import logging

import falcon

from http_front.errors import AuthError
from http_front.keys import KeyStore, Principal, owner_of
from http_front.metrics import FrontMetrics
from http_front.ratelimit import RecentSet, SlidingWindowLimiter
from http_front.signing import UrlSigner

log = logging.getLogger(__name__)

MISSING_KEY = "缺少API密钥。请在Authorization header中使用Bearer token或在X-API-Key header中提供密钥"
INVALID_KEY = "无效的API密钥"
FORBIDDEN = "权限不足: 此接口需要 {} 权限"
RATE_LIMITED = "请求频率过高: 每个API密钥每{}秒最多{}个请求"
TOO_MANY_FAILURES = "认证失败次数过多，请稍后再试"
BAD_SIGNATURE = "签名URL无效或已过期 (invalid or expired signed URL)"
DEFAULT_KEY_REMOTE = "默认密钥只能从本机使用; 请配置API密钥"
SUPER = frozenset({"admin", "all"})


def extract_key(req: falcon.Request) -> str | None:
    """The API key from `Authorization: Bearer` or `X-API-Key`."""
    header = req.get_header("Authorization")
    if header:
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = req.get_header("X-API-Key")
    return key.strip() if key and key.strip() else None


@functools.lru_cache(maxsize=4096)  # parsed once per client address, not once per request
def is_loopback(address: str | None) -> bool:
    """True for 127.0.0.0/8 and ::1 (the default key is only accepted from there)."""
    try:
        return ipaddress.ip_address((address or "").split("%")[0]).is_loopback
    except ValueError:
        return False


def is_public(resource: object) -> bool:
    """Whether a resource is served without a key: only if it says so with ``public = True``."""
    return getattr(resource, "public", False) is True


def allowed(principal: Principal, needed: tuple[str, ...]) -> bool:
    """Whether the principal holds any of the needed permissions (or a super permission)."""
    perms = set(principal.permissions)
    return bool(perms & SUPER) or bool(perms & set(needed))


class AuthMiddleware:
    """Authenticates, authorises and rate-limits every routed request.

    An address with too many failed authentications is throttled: keys new to it are
    not even looked up (429), so guessing stays as slow as the throttle. A key that
    already authenticated from that address keeps working, so an attacker behind the
    same address (NAT, proxy) cannot lock its legitimate users out; and since only
    keys proven from there pass, 200 versus 429 tells a guesser nothing new.
    """

    def __init__(self, keys: KeyStore, limiter: SlidingWindowLimiter,
                 failures: SlidingWindowLimiter, default_key_remote: bool = False,
                 known: RecentSet | None = None, signer: UrlSigner | None = None,
                 metrics: FrontMetrics | None = None) -> None:
        self.keys = keys
        self.metrics = metrics
        self.signer = signer
        self.limiter = limiter
        self.failures = failures
        self.default_key_remote = default_key_remote
        self.known = known if known is not None else RecentSet()  # (address, owner) that authenticated

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         params: dict) -> None:
        """Runs after routing, before the responder; counts every refusal by its reason."""
        try:
            self._check(req, resource)
        except AuthError as exc:
            if self.metrics is not None:
                if exc.reason == "rate_limited":
                    self.metrics.rate_limited.inc()
                else:
                    self.metrics.auth_rejections.labels(exc.reason).inc()
            raise

    def _check(self, req: falcon.Request, resource: object) -> None:
        if resource is None or is_public(resource) or not hasattr(resource, f"on_{req.method.lower()}"):
            return  # public, or Falcon answers 405 (a method no key could use reveals nothing)
        req.context.signed = False
        if getattr(resource, "signed_urls", False) and req.method == "GET" and req.get_param("sig") is not None:
            # A signed URL stands in for a key on this one path (browsers cannot send key headers).
            if self.signer is None or not self.signer.verify(req.path, req.get_param("expires"),
                                                             req.get_param("sig")):
                raise AuthError(403, BAD_SIGNATURE, reason="bad_signature")
            ok, retry_after = self.limiter.hit(f"signed:{req.path}")  # each signed URL has the key's limit
            if not ok:
                raise AuthError(429, RATE_LIMITED.format(int(self.limiter.window), self.limiter.limit),
                                retry_after=retry_after, reason="rate_limited")
            req.context.signed, req.context.principal = True, None
            return
        client = req.remote_addr or "?"
        raw = extract_key(req)
        if self.failures.count(client) >= self.failures.limit and \
                (raw is None or (client, owner_of(raw)) not in self.known):
            raise AuthError(429, TOO_MANY_FAILURES, retry_after=int(self.failures.window), reason="throttled")
        if raw is None:
            self.failures.hit(client)
            raise AuthError(401, MISSING_KEY, reason="missing_key")
        principal = self.keys.authenticate(raw)
        if principal is None:
            self.failures.hit(client)
            raise AuthError(401, INVALID_KEY, reason="invalid_key")
        self.known.add((client, principal.owner))
        if principal.source == "default" and not self.default_key_remote and not is_loopback(client):
            raise AuthError(403, DEFAULT_KEY_REMOTE, reason="default_key_remote")
        needed = getattr(resource, "auth", {}).get(req.method, ())
        if not allowed(principal, needed):
            raise AuthError(403, FORBIDDEN.format(" 或 ".join(needed) or "admin"), reason="forbidden")
        ok, retry_after = self.limiter.hit(principal.owner)
        if not ok:
            raise AuthError(429, RATE_LIMITED.format(int(self.limiter.window), self.limiter.limit),
                            retry_after=retry_after, reason="rate_limited")
        req.context.principal = principal
