"""Webhook URL rules shared by the front (at submit time) and the broker (at delivery).

``check_url`` looks at a URL's text only and never touches the network; ``refusal_reason``
says why an address (a literal in the URL, or what a name resolves to) must not be a
webhook target: loopback, private, link-local, multicast, reserved or otherwise non-global,
also inside an IPv4-mapped, 6to4, Teredo or NAT64 IPv6 address (see broker/ssrf.py).
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import SplitResult, urlsplit

MAX_URL_LENGTH = 2048
SCHEMES = ("http", "https")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_IPV4 = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$")
# 64:ff9b::/96 embeds an IPv4 address that a NAT64 gateway would reach on our behalf.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

class WebhookRefused(ValueError):
    """A webhook URL that is not allowed: its scheme, its syntax or the address it names."""


def check_url(url: str, allow_private: bool = True) -> SplitResult:
    """Check a webhook URL's syntax (no network); raise WebhookRefused, or return its parts.

    With allow_private=False a host written as a non-public IP address is refused too (an
    early answer for the submitter); names are only judged by what they resolve to, at delivery.
    """
    if not isinstance(url, str):
        raise WebhookRefused("webhook URL must be a string")
    if len(url) > MAX_URL_LENGTH:
        raise WebhookRefused(f"webhook URL is longer than {MAX_URL_LENGTH} characters")
    if not url.isascii() or any(ch <= " " or ch == "\x7f" for ch in url):
        raise WebhookRefused("webhook URL must be ASCII without spaces or control characters "
                             "(percent-encode the path, use the punycode form of the host)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookRefused(f"webhook URL is malformed: {exc}") from None
    if parts.scheme.lower() not in SCHEMES:
        raise WebhookRefused(f"webhook URL scheme must be http or https, not {parts.scheme or 'none'!r}")
    if "@" in parts.netloc:
        raise WebhookRefused("webhook URL must not contain a user name or password")
    host = parts.hostname
    if not host:
        raise WebhookRefused("webhook URL has no host")
    if port == 0:
        raise WebhookRefused("webhook URL port must be between 1 and 65535")
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise WebhookRefused(f"webhook URL host {host!r} is not a valid IPv6 address") from None
    elif _IPV4.match(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise WebhookRefused(f"webhook URL host {host!r} is not a valid IPv4 address") from None
    else:
        name = host.removesuffix(".")
        if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
            raise WebhookRefused(f"webhook URL host {host!r} is not a valid host name")
    if not allow_private and (_IPV4.match(host) or ":" in host) and (reason := refusal_reason(host)):
        raise WebhookRefused(f"webhook URL host is a non-public address: {reason}")
    return parts


def refusal_reason(address: str) -> str | None:
    """Why a resolved address must not be a webhook target, or None if it is a public address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # The same host as the IPv4 address; judged as that (Python < 3.13 calls all of ::ffff:0:0/96 private).
        reason = refusal_reason(str(ip.ipv4_mapped))
        return f"{ip} maps {reason}" if reason else None
    for prop in ("is_loopback", "is_private", "is_link_local", "is_multicast", "is_reserved",
                 "is_unspecified"):
        if getattr(ip, prop):
            return f"{ip} is {prop[3:].replace('_', '-')}"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.sixtofour, ip.teredo[1] if ip.teredo else None,
                    ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None]
        for inner in embedded:
            if inner is not None and (reason := refusal_reason(str(inner))):
                return f"{ip} embeds {reason}"
    if not ip.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT), not "private" to Python
        return f"{ip} is not a global address"
    return None
