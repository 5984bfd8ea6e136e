"""Webhook target checks: URL syntax, the SSRF guard on resolved addresses, pinned connections.

A webhook URL is checked twice. ``check_url`` looks at the text only (the HTTP front calls
it at submit time; it never touches the network). ``resolve`` runs at each delivery
attempt: it resolves the host once, refuses the whole URL if any answer is a loopback,
private, link-local, multicast, reserved or otherwise non-global address (also inside an
IPv4-mapped, 6to4, Teredo or NAT64 IPv6 address), and returns the answers.
``PinnedHTTPConnection`` and ``PinnedHTTPSConnection`` then connect to exactly those
addresses while sending the original Host header (and, for https, the original name for
SNI and certificate checks), so a DNS answer that changes between the check and the
connection (DNS rebinding) cannot redirect the request.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from typing import Any

from genserve.urls import MAX_URL_LENGTH, WebhookRefused, check_url, refusal_reason

__all__ = ["MAX_URL_LENGTH", "WebhookRefused", "check_url", "refusal_reason", "resolve", "connect_any",
           "PinnedHTTPConnection", "PinnedHTTPSConnection"]

Address = tuple[int, tuple]  # (family, sockaddr) as socket.getaddrinfo gives them


MAX_LOOKUPS = 8  # name lookups running at once (each on a daemon thread, since none can be cancelled)
_lookups = threading.BoundedSemaphore(MAX_LOOKUPS)


def lookup(host: str, port: int, timeout: float | None = None) -> list[tuple]:
    """socket.getaddrinfo, given up after `timeout` seconds (the lookup itself runs on to its end)."""
    if timeout is None:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    if not _lookups.acquire(timeout=timeout):
        raise TimeoutError(f"{MAX_LOOKUPS} name lookups are already running")
    result: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP))
        except OSError as exc:
            result.append(exc)
        finally:
            _lookups.release()
            done.set()

    threading.Thread(target=run, name="dns-lookup", daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError(f"looking up {host!r} took over {timeout:g}s")
    if isinstance(result[0], OSError):
        raise result[0]
    return result[0]


def resolve(host: str, port: int, allow_private: bool, timeout: float | None = None) -> list[Address]:
    """Resolve host once (within `timeout`); refuse it if any answer is not public (unless allow_private)."""
    infos = lookup(host, port, timeout)
    addresses: list[Address] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        if not allow_private and (reason := refusal_reason(sockaddr[0])):
            raise WebhookRefused(f"webhook host {host!r} resolves to a non-public address: {reason}")
        if (family, sockaddr) not in addresses:
            addresses.append((family, sockaddr))
    if not addresses:
        raise OSError(f"webhook host {host!r} has no IPv4 or IPv6 address")
    return addresses


def connect_any(addresses: list[Address], deadline: float) -> socket.socket:
    """A TCP socket connected to the first of these exact addresses that answers by deadline.

    deadline is a time.monotonic() value; the socket's timeout is what is left of it.
    """
    error: OSError | None = None
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(sockaddr)
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    assert error is not None
    raise error


class PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTPConnection that connects to already-checked addresses instead of resolving host."""

    def __init__(self, host: str, port: int, addresses: list[Address], deadline: float) -> None:
        super().__init__(host, port)
        self.addresses = addresses
        self.deadline = deadline

    def connect(self) -> None:
        """Connect to the pinned addresses; Host stays the URL's host."""
        self.sock = connect_any(self.addresses, self.deadline)


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPSConnection to pinned addresses, with SNI and certificate checks against the host name."""

    def __init__(self, host: str, port: int, addresses: list[Address], deadline: float,
                 context: ssl.SSLContext) -> None:
        super().__init__(host, port, context=context)
        self.addresses = addresses
        self.deadline = deadline
        self.tls = context

    def connect(self) -> None:
        """Connect to the pinned addresses, then run the TLS handshake for the URL's host name."""
        raw = connect_any(self.addresses, self.deadline)
        try:
            # Handshake after self.sock is set, so a watchdog can shut the socket mid-handshake.
            self.sock = self.tls.wrap_socket(raw, server_hostname=self.host,
                                             do_handshake_on_connect=False)
            self.sock.do_handshake()
        except BaseException:
            raw.close()
            if self.sock is not None:
                self.sock.close()
            raise
