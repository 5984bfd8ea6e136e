"""CurveZMQ setup for links that cross machines (broker side and client side).

The broker holds a secret key and a directory of authorised client public keys
(``*.key`` files as written by ``zmq.auth.create_certificates``); a ZAP
authenticator thread refuses any node or front whose key is not there, and
logs the refusal. Without a configured secret key, links are plain TCP.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Iterable

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)


class _ZapLog(logging.LoggerAdapter):
    """pyzmq logs every ZAP decision at debug level; refusals deserve a warning."""

    def debug(self, msg: object, *args: object, **kwargs: object) -> None:
        """Raise DENIED decisions to WARNING; keep the rest at DEBUG."""
        level = logging.WARNING if str(msg).startswith("DENIED") or (
            args and str(args[0]).startswith("DENIED")) else logging.DEBUG
        self.logger.log(level, "ZAP: " + str(msg), *args, **kwargs)


def create_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret into `directory`; returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


def setup_server(context: zmq.Context, config, sockets: Iterable[zmq.Socket]) -> ThreadAuthenticator | None:
    """Make `sockets` CURVE servers when the config names a secret key; start ZAP."""
    secret_file: Path | None = config.curve_secret_file
    if secret_file is None:
        return None
    public, secret = zmq.auth.load_certificate(str(secret_file))
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key")
    auth = ThreadAuthenticator(context, log=_ZapLog(logging.getLogger("genserve.curve.zap"), {}))
    auth.start()
    authorized = config.curve_authorized_dir
    if authorized is None or not Path(authorized).is_dir():
        raise ValueError("CURVE needs a directory of authorised public keys")
    auth.configure_curve(domain="*", location=str(authorized))
    for sock in sockets:
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
    log.info("CURVE enabled; authorised keys from %s", authorized)
    return auth


def setup_client(sock: zmq.Socket, secret_file: Path | None, server_public_file: Path | None) -> None:
    """Make `sock` a CURVE client with its own key pair and the broker's public key."""
    if secret_file is None:
        return
    if server_public_file is None:
        raise ValueError("a CURVE client needs the broker's public key file")
    public, secret = zmq.auth.load_certificate(str(secret_file))
    server_public, _ = zmq.auth.load_certificate(str(server_public_file))
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key")
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public


class InsecureBind(ValueError):
    """A bind that would expose the broker without authentication."""


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc/inproc endpoints and tcp endpoints on a loopback address."""
    scheme, _, rest = endpoint.partition("://")
    if scheme != "tcp":
        return scheme in ("ipc", "inproc")
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: reachable from elsewhere


def check_exposure(endpoints: Iterable[str], curve: bool, insecure: bool) -> None:
    """Refuse a non-loopback bind without CURVE unless the operator said --insecure."""
    exposed = [e for e in endpoints if not is_loopback_endpoint(e)]
    if exposed and not curve and not insecure:
        raise InsecureBind(f"refusing to bind {', '.join(exposed)} without CURVE: anyone who reaches it could pose"
                           " as a node or submit without a key. Use --curve-secret/--curve-authorized, bind"
                           " 127.0.0.1, or pass --insecure on a trusted network")
    for endpoint in exposed:
        log.warning("%s is reachable from other machines%s", endpoint,
                    "" if curve else " WITHOUT authentication (--insecure)")
