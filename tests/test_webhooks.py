"""Webhook outbox: signing, retries, timeouts, the SSRF guard, restarts, against a real local receiver."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import logging
import random
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import ssrf, webhooks
from broker.webhooks import (
    WebhookConfig,
    WebhookOutbox,
    WebhookRefused,
    backoff_delay,
    check_url,
    new_secret,
    parse_secret,
    sign,
    signed_headers,
)
from tests.receiver import Receiver

SECRET_TEXT = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SECRET = base64.b64decode(SECRET_TEXT.removeprefix("whsec_"))
PAYLOAD = b'{"type": "task.completed", "data": {"task_id": "t1"}}'


def wait(predicate: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
    """Poll predicate every 10 ms until it is truthy; the deliveries under test take milliseconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Clock:
    """time.time() plus an offset a test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def make_receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(**kwargs: Any) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.fixture
def make_outbox(tmp_path: Path) -> Iterator[Callable[..., WebhookOutbox]]:
    """Outboxes with test-sized delays; all closed, their threads checked stopped, at teardown."""
    made: list[WebhookOutbox] = []

    def make(start: bool = True, path: Path | None = None, clock: Callable[[], float] = time.time,
             ssl_context: ssl.SSLContext | None = None, **overrides: Any) -> WebhookOutbox:
        settings: dict[str, Any] = {"secret": SECRET, "allow_private": True, "max_age": 2.0,
                                    "first_delay": 0.05, "max_delay": 0.2, "timeout": 1.0, "workers": 2}
        settings.update(overrides)
        outbox = WebhookOutbox(path or tmp_path / "webhooks.sqlite3", WebhookConfig(**settings),
                               clock=clock, ssl_context=ssl_context)
        made.append(outbox)
        return outbox.start() if start else outbox

    yield make
    for outbox in made:
        outbox.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("webhook-")]


def state_of(outbox: WebhookOutbox, msg_id: str) -> str | None:
    status = outbox.status(msg_id)
    return status["state"] if status else None


def verify(headers: dict[str, str], body: bytes) -> bool:
    """The receiver's check, written from the Standard Webhooks spec, independently of sign()."""
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(SECRET, signed, hashlib.sha256).digest()).decode()
    versions = dict(part.split(",", 1) for part in headers["webhook-signature"].split())
    return hmac.compare_digest(versions["v1"], expected)


# -- signing and secrets ---------------------------------------------------------------------


def test_sign_reproduces_the_standard_webhooks_test_vector() -> None:
    key = parse_secret(SECRET_TEXT)
    assert sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}') == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = signed_headers(key, "msg_1", 1614265330, b"{}")
    assert headers["webhook-id"] == "msg_1" and headers["webhook-timestamp"] == "1614265330"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "GenServe-Webhooks/1"
    assert verify(headers, b"{}") and not verify(headers, b"{ }")


def test_secrets_parse_and_generate() -> None:
    fresh = new_secret()
    assert fresh.startswith("whsec_") and len(parse_secret(fresh)) == 32
    assert new_secret() != fresh
    for bad in ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_", "whsec_not base64!", "whsec_c2hvcnQ=",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS"]:
        with pytest.raises(ValueError):
            parse_secret(bad)
    config = WebhookConfig(secret=SECRET)
    assert SECRET_TEXT[6:] not in repr(config) and repr(SECRET) not in repr(config)
    with pytest.raises(ValueError):
        WebhookConfig(secret=b"short")


def test_delivery_is_signed_and_keeps_the_url_path_and_query(make_outbox: Callable[..., WebhookOutbox],
                                                           receiver: Receiver) -> None:
    outbox = make_outbox()
    assert outbox.enqueue("msg_a", receiver.url("/hook?token=abc"), "task.completed", PAYLOAD)
    wait(lambda: state_of(outbox, "msg_a") == "delivered", "the delivery")
    (request,) = receiver.requests
    headers = request["headers"]
    assert request["path"] == "/hook?token=abc" and request["body"] == PAYLOAD
    assert headers["webhook-id"] == "msg_a"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert verify(headers, PAYLOAD)
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "GenServe-Webhooks/1"
    assert headers["host"] == f"127.0.0.1:{receiver.port}"
    status = outbox.status("msg_a")
    assert status is not None and status["attempts"] == 1 and status["last_status"] == 200
    assert outbox.stats() == {"pending": 0, "delivered": 1, "failed": 0, "refused": 0}


# -- retries, timeouts, giving up ------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    config = WebhookConfig(secret=SECRET, first_delay=1.0, max_delay=300.0)
    rng = random.Random(7)
    for attempts, base in [(1, 1.0), (2, 2.0), (3, 4.0), (9, 256.0), (10, 300.0), (10_000, 300.0)]:
        delays = [backoff_delay(attempts, config, rng) for _ in range(200)]
        assert base * 0.5 <= min(delays) and max(delays) <= base
        assert max(delays) - min(delays) > base * 0.3  # jittered, not constant
    exact = WebhookConfig(secret=SECRET, first_delay=0.1, max_delay=1.0, jitter=0.0)
    assert [backoff_delay(n, exact) for n in (1, 2, 3, 4, 5)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])


def test_retries_after_500_with_growing_spacing_and_fresh_signatures(
        make_outbox: Callable[..., WebhookOutbox], receiver: Receiver) -> None:
    clock = Clock()

    def advance() -> None:
        clock.offset += 1.0  # each attempt sees a later second, so its timestamp must differ

    receiver.on_request = advance
    receiver.script = ["500", "500"]
    outbox = make_outbox(clock=clock, first_delay=0.1, max_delay=1.0, jitter=0.0, max_age=30.0)
    assert outbox.enqueue("msg_r", receiver.url(), "task.completed", PAYLOAD)
    wait(lambda: state_of(outbox, "msg_r") == "delivered", "delivery after two 500s")
    status = outbox.status("msg_r")
    assert status is not None
    assert (status["attempts"], status["last_status"], status["last_error"]) == (3, 200, None)
    first, second, third = receiver.requests
    assert third["at"] - second["at"] >= 0.2  # second delay is twice the first
    assert second["at"] - first["at"] >= 0.1
    stamps = [int(r["headers"]["webhook-timestamp"]) for r in receiver.requests]
    assert stamps[0] < stamps[1] < stamps[2]
    assert {r["headers"]["webhook-id"] for r in receiver.requests} == {"msg_r"}
    assert len({r["headers"]["webhook-signature"] for r in receiver.requests}) == 3
    assert all(verify(r["headers"], r["body"]) for r in receiver.requests)


def test_a_hanging_receiver_times_out_and_never_holds_up_other_deliveries(
        make_outbox: Callable[..., WebhookOutbox], make_receiver: Callable[..., Receiver]) -> None:
    slow, fast = make_receiver(), make_receiver()
    slow.default = "hang"
    outbox = make_outbox(timeout=1.5, workers=2)
    assert outbox.enqueue("msg_slow", slow.url(), "task.started", PAYLOAD)
    wait(lambda: slow.hanging == 1, "the slow receiver to hold the first attempt")
    # The slow attempt is in flight on one worker; enqueue returns and the other worker delivers.
    assert outbox.enqueue("msg_fast", fast.url(), "task.started", PAYLOAD)
    wait(lambda: state_of(outbox, "msg_fast") == "delivered", "the second receiver's delivery")
    slow_status = outbox.status("msg_slow")
    assert slow_status is not None and slow_status["in_flight"] and slow_status["attempts"] == 0
    assert slow.hanging == 1 and slow.count() == 1
    # Then the slow attempt ends at the timeout, counted as failed, and is retried.
    wait(lambda: (outbox.status("msg_slow") or {}).get("attempts", 0) >= 1, "the timeout")
    slow_status = outbox.status("msg_slow")
    assert slow_status is not None and slow_status["state"] == "pending"
    assert slow_status["last_error"] == "timed out after 1.5s" and slow_status["last_status"] is None
    wait(lambda: slow.count() == 2, "the retry")


def test_a_response_dripping_bytes_is_cut_at_the_timeout(make_outbox: Callable[..., WebhookOutbox],
                                                         receiver: Receiver) -> None:
    receiver.default = "drip"  # every recv gets a byte in time: only the overall deadline stops it
    outbox = make_outbox(timeout=0.5, first_delay=5.0, max_delay=5.0, max_age=60.0)
    assert outbox.enqueue("msg_drip", receiver.url(), "task.started", PAYLOAD)
    wait(lambda: (outbox.status("msg_drip") or {}).get("attempts") == 1, "the attempt to be cut", timeout=4)
    status = outbox.status("msg_drip")
    assert status is not None and status["last_error"] == "timed out after 0.5s"


def test_gives_up_after_max_age(make_outbox: Callable[..., WebhookOutbox], receiver: Receiver,
                                caplog: pytest.LogCaptureFixture) -> None:
    receiver.default = "500"
    caplog.set_level(logging.WARNING, logger="broker.webhooks")
    outbox = make_outbox(max_age=0.6, first_delay=0.05, max_delay=0.1)
    assert outbox.enqueue("msg_old", receiver.url(), "task.completed", PAYLOAD)
    wait(lambda: state_of(outbox, "msg_old") == "failed", "the outbox to give up")
    status = outbox.status("msg_old")
    assert status is not None
    assert status["attempts"] >= 3 and status["attempts"] == receiver.count()
    assert status["last_status"] == 500 and "gave up" in status["last_error"] and "HTTP 500" in status["last_error"]
    assert status["finished"] - status["created"] >= 0.6  # the last attempt is made at the deadline
    assert outbox.stats()["failed"] == 1 and outbox.stats()["pending"] == 0
    time.sleep(0.3)
    assert receiver.count() == status["attempts"]  # no attempt after giving up
    assert any("msg_old" in r.getMessage() and "127.0.0.1" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)


def test_410_gone_fails_at_once(make_outbox: Callable[..., WebhookOutbox], receiver: Receiver) -> None:
    receiver.default = "410"
    outbox = make_outbox()
    assert outbox.enqueue("msg_gone", receiver.url(), "task.completed", PAYLOAD)
    wait(lambda: state_of(outbox, "msg_gone") == "failed", "the 410")
    status = outbox.status("msg_gone")
    assert status is not None and status["attempts"] == 1 and status["last_status"] == 410


def test_redirects_are_not_followed(make_outbox: Callable[..., WebhookOutbox], receiver: Receiver) -> None:
    receiver.default = "302"
    outbox = make_outbox(max_age=30.0)
    assert outbox.enqueue("msg_302", receiver.url(), "task.completed", PAYLOAD)
    wait(lambda: (outbox.status("msg_302") or {}).get("attempts", 0) >= 2, "a retry after the 302")
    status = outbox.status("msg_302")
    assert status is not None and status["state"] == "pending" and status["last_status"] == 302
    assert "redirects are not followed" in status["last_error"]
    assert "/target" not in receiver.paths() and receiver.count() >= 2


# -- SSRF guard -----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "[::ffff:127.0.0.1]"])
def test_loopback_targets_are_refused_without_allow_private(
        make_outbox: Callable[..., WebhookOutbox], receiver: Receiver, host: str) -> None:
    outbox = make_outbox(allow_private=False)
    assert outbox.enqueue("msg_ssrf", receiver.url(host=host), "task.completed", PAYLOAD)
    wait(lambda: state_of(outbox, "msg_ssrf") == "refused", "the refusal")
    status = outbox.status("msg_ssrf")
    assert status is not None and status["attempts"] == 1 and "non-public" in status["last_error"]
    assert receiver.requests == []
    assert outbox.stats()["refused"] == 1


@pytest.mark.parametrize("url", ["http://10.0.0.1/", "http://169.254.169.254/latest/meta-data/",
                                 "http://192.168.1.1:8080/", "http://0.0.0.0/", "http://[fe80::1]/",
                                 "http://224.0.0.1/", "http://100.64.0.1/"])
def test_private_and_metadata_addresses_are_refused(make_outbox: Callable[..., WebhookOutbox],
                                                    url: str) -> None:
    outbox = make_outbox(allow_private=False)
    assert outbox.enqueue("msg_ssrf", url, "task.completed", PAYLOAD)
    wait(lambda: state_of(outbox, "msg_ssrf") == "refused", "the refusal")


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.0.1", "169.254.169.254",
                                     "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255",
                                     "::1", "::", "fe80::1%eth0", "fc00::1", "ff02::1", "::ffff:127.0.0.1",
                                     "::ffff:10.0.0.1", "2002:7f00:1::", "2002:a00:1::", "64:ff9b::a00:1",
                                     "64:ff9b::7f00:1", "::127.0.0.1"])
def test_refusal_reason_covers_non_public_addresses(address: str) -> None:
    assert ssrf.refusal_reason(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111",
                                     "::ffff:93.184.216.34", "2002:5db8:d822::"])
def test_refusal_reason_accepts_public_addresses(address: str) -> None:
    assert ssrf.refusal_reason(address) is None


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> list[str]:
    """Make socket.getaddrinfo answer these names with these addresses; return the names asked."""
    real = socket.getaddrinfo
    asked: list[str] = []

    def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in answers:
            return real(host, port, *args, **kwargs)
        asked.append(host)
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                 (ip, int(port)) if ":" not in ip else (ip, int(port), 0, 0)) for ip in answers[host]]

    monkeypatch.setattr(ssrf.socket, "getaddrinfo", getaddrinfo)
    return asked


def test_a_public_name_resolving_to_loopback_is_refused_at_connect_time(
        make_outbox: Callable[..., WebhookOutbox], receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {"hooks.example.com": ["127.0.0.1"],
                           "mixed.example.com": ["93.184.216.34", "127.0.0.1"]})
    check_url(receiver.url(host="hooks.example.com"))  # the name itself passes the submit-time check
    outbox = make_outbox(allow_private=False)
    assert outbox.enqueue("msg_rebind", receiver.url(host="hooks.example.com"), "task.completed", PAYLOAD)
    assert outbox.enqueue("msg_mixed", receiver.url(host="mixed.example.com"), "task.completed", PAYLOAD)
    wait(lambda: outbox.stats()["refused"] == 2, "both refusals")
    assert "127.0.0.1 is loopback" in outbox.status("msg_rebind")["last_error"]
    assert "127.0.0.1 is loopback" in outbox.status("msg_mixed")["last_error"]
    assert receiver.requests == []


def test_connects_to_the_checked_address_and_sends_the_original_host(
        make_outbox: Callable[..., WebhookOutbox], receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = fake_dns(monkeypatch, {"hooks.example.com": ["127.0.0.1"]})
    receiver.script = ["500"]
    outbox = make_outbox()
    assert outbox.enqueue("msg_pin", receiver.url(host="hooks.example.com"), "task.completed", PAYLOAD)
    wait(lambda: state_of(outbox, "msg_pin") == "delivered", "the delivery")
    assert [r["headers"]["host"] for r in receiver.requests] == [f"hooks.example.com:{receiver.port}"] * 2
    assert asked == ["hooks.example.com"] * 2  # resolved once per attempt, never again to connect


@pytest.mark.parametrize("url", ["ftp://example.com/", "file:///etc/passwd", "http://user:pw@example.com/",
                                 "http://user@example.com/", "gopher://example.com/", "javascript:alert(1)"])
def test_check_url_refuses_other_schemes_and_userinfo(url: str) -> None:
    with pytest.raises(WebhookRefused):
        check_url(url)


@pytest.mark.parametrize("url", ["", "not a url", "example.com/hook", "//example.com/hook", "http://",
                                 "http:///hook", "http://:80/hook", "http://[::1/hook", "http://[nothex]/",
                                 "http://exa mple.com/", "http://ex\u00e4mple.com/", "http://example.com/\u00e9",
                                 "http://example.com/a\nb", "http://-bad-.example.com/", "http://a..b/",
                                 "http://example.com:0/", "http://example.com:99999/", "http://example.com:x/",
                                 "http://example.com/" + "a" * 2048, "http://%31%32%37.0.0.1/",
                                 "http://" + "a" * 64 + ".com/", "http://999.1.1.1/", "http://01.2.3.4/"])
def test_check_url_refuses_malformed_urls(url: str) -> None:
    with pytest.raises(WebhookRefused):
        check_url(url)


@pytest.mark.parametrize("url", ["https://hooks.example.com/x?y=1", "http://127.0.0.1:8080/",
                                 "http://[::1]:80/", "HTTPS://Example.COM", "http://example.com./",
                                 "http://my_host.example.com:65535/a%20b"])
def test_check_url_accepts_well_formed_urls(url: str) -> None:
    check_url(url)


def test_check_url_can_refuse_non_public_address_literals_early() -> None:
    for url in ["http://127.0.0.1:8080/", "http://[::1]/", "http://10.0.0.1/", "http://[::ffff:169.254.169.254]/"]:
        check_url(url)  # syntax only by default
        with pytest.raises(WebhookRefused, match="non-public"):
            check_url(url, allow_private=False)
    for url in ["http://hooks.example.com/", "http://8.8.8.8/", "http://localhost/"]:
        check_url(url, allow_private=False)  # names are judged by what they resolve to, at delivery


def test_enqueue_refuses_a_malformed_url_without_retrying(make_outbox: Callable[..., WebhookOutbox]) -> None:
    outbox = make_outbox(start=False)
    assert not outbox.enqueue("msg_bad", "ftp://example.com/", "task.completed", PAYLOAD)
    status = outbox.status("msg_bad")
    assert status is not None and status["state"] == "refused" and "scheme" in status["last_error"]
    with pytest.raises(ValueError):
        outbox.enqueue("msg\r\nX-Injected: 1", "http://example.com/", "task.completed", PAYLOAD)
    with pytest.raises(TypeError):
        outbox.enqueue("msg_str", "http://example.com/", "task.completed", PAYLOAD.decode())  # type: ignore[arg-type]


# -- https ----------------------------------------------------------------------------------


def make_tls(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for name, and a client context trusting its CA only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])

    def build(subject: x509.Name, public: Any, ca: bool) -> x509.CertificateBuilder:
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if ca:
            return builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                         critical=True)
        return (builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))

    ca_cert = build(ca_name, ca_key.public_key(), True).sign(ca_key, hashes.SHA256())
    cert = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key(), False) \
        .sign(ca_key, hashes.SHA256())
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client = ssl.create_default_context(cadata=ca_cert.public_bytes(serialization.Encoding.PEM).decode())
    return server, client


def test_https_checks_the_certificate_against_the_url_host(
        make_outbox: Callable[..., WebhookOutbox], make_receiver: Callable[..., Receiver], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    server_tls, client_tls = make_tls(tmp_path, "hooks.example.com")
    receiver = make_receiver(tls=server_tls)
    fake_dns(monkeypatch, {"hooks.example.com": ["127.0.0.1"], "other.example.com": ["127.0.0.1"]})
    outbox = make_outbox(ssl_context=client_tls, max_age=30.0)
    good = receiver.url(host="hooks.example.com", scheme="https")
    assert outbox.enqueue("msg_tls", good, "task.completed", PAYLOAD)
    assert outbox.enqueue("msg_wrong_name", receiver.url(host="other.example.com", scheme="https"),
                          "task.completed", PAYLOAD)
    wait(lambda: state_of(outbox, "msg_tls") == "delivered", "the https delivery")
    wait(lambda: (outbox.status("msg_wrong_name") or {}).get("attempts", 0) >= 1, "the bad certificate")
    (request,) = receiver.requests
    assert request["headers"]["host"] == f"hooks.example.com:{receiver.port}" and verify(request["headers"], PAYLOAD)
    status = outbox.status("msg_wrong_name")
    assert status is not None and status["state"] == "pending"
    assert "SSLCertVerificationError" in status["last_error"] and "other.example.com" in status["last_error"]


# -- durability and limits ------------------------------------------------------------------


def test_pending_deliveries_survive_a_restart_and_are_delivered_once(
        make_outbox: Callable[..., WebhookOutbox], make_receiver: Callable[..., Receiver], tmp_path: Path) -> None:
    port = free_port()  # nothing listens there yet
    path = tmp_path / "restart.sqlite3"
    first = make_outbox(path=path, max_age=60.0, first_delay=0.05, max_delay=0.1)
    url = f"http://127.0.0.1:{port}/hook"
    assert first.enqueue("msg_down", url, "task.completed", PAYLOAD)
    wait(lambda: (first.status("msg_down") or {}).get("attempts", 0) >= 1, "a refused connection")
    status = first.status("msg_down")
    assert status is not None and status["state"] == "pending" and "ConnectionRefused" in status["last_error"]
    first.close()

    receiver = make_receiver(port=port)
    with sqlite3.connect(path) as db:  # as if the last run died mid-attempt, holding the claim
        db.execute("UPDATE deliveries SET claimed_by = 'webhook-0' WHERE msg_id = 'msg_down'")
    db.close()
    second = make_outbox(path=path, max_age=60.0, start=False)
    assert (second.status("msg_down") or {}).get("in_flight") is False  # the stale claim is cleared
    second.start()
    wait(lambda: state_of(second, "msg_down") == "delivered", "the delivery after the restart")
    second.close()  # nothing can deliver after this
    assert receiver.count() == 1 and receiver.requests[0]["headers"]["webhook-id"] == "msg_down"


def test_the_same_msg_id_is_delivered_once(make_outbox: Callable[..., WebhookOutbox], receiver: Receiver) -> None:
    outbox = make_outbox(start=False)
    assert outbox.enqueue("msg_dup", receiver.url(), "task.completed", PAYLOAD)
    assert outbox.enqueue("msg_dup", receiver.url(), "task.completed", PAYLOAD)
    assert outbox.stats()["pending"] == 1
    outbox.start()
    wait(lambda: state_of(outbox, "msg_dup") == "delivered", "the delivery")
    assert outbox.enqueue("msg_dup", receiver.url(), "task.completed", PAYLOAD)  # already delivered: no-op
    outbox.close()
    assert receiver.count() == 1


def test_close_abandons_an_in_flight_attempt_which_is_retried_after_restart(
        make_outbox: Callable[..., WebhookOutbox], receiver: Receiver, tmp_path: Path) -> None:
    receiver.script = ["hang"]
    path = tmp_path / "abandon.sqlite3"
    first = make_outbox(path=path, timeout=10.0)
    assert first.enqueue("msg_hang", receiver.url(), "task.completed", PAYLOAD)
    wait(lambda: receiver.hanging == 1, "the attempt to hang")
    first.close(timeout=3.0)  # shuts the hanging socket rather than waiting 10 s for it
    assert not [t.name for t in threading.enumerate() if t.name.startswith("webhook-")]

    second = make_outbox(path=path, start=False)
    status = second.status("msg_hang")
    assert status is not None
    assert (status["state"], status["in_flight"], status["attempts"]) == ("pending", False, 0)
    second.start()
    wait(lambda: state_of(second, "msg_hang") == "delivered", "the retry after restart")
    assert receiver.count() == 2  # at least once: the abandoned attempt may have reached the receiver


def test_enqueue_beyond_max_pending_is_refused(make_outbox: Callable[..., WebhookOutbox], receiver: Receiver,
                                               caplog: pytest.LogCaptureFixture) -> None:
    outbox = make_outbox(start=False, max_pending=2)
    assert outbox.enqueue("msg_1", receiver.url(), "task.completed", PAYLOAD)
    assert outbox.enqueue("msg_2", receiver.url(), "task.completed", PAYLOAD)
    with caplog.at_level(logging.WARNING, logger="broker.webhooks"):
        assert not outbox.enqueue("msg_3", receiver.url(), "task.completed", PAYLOAD)
    assert "2 deliveries already pending" in caplog.text
    assert outbox.status("msg_3") is None and outbox.stats()["pending"] == 2
    assert outbox.enqueue("msg_2", receiver.url(), "task.completed", PAYLOAD)  # already queued: accepted
    outbox.start()
    wait(lambda: outbox.stats()["delivered"] == 2, "the two deliveries")
    assert outbox.enqueue("msg_3", receiver.url(), "task.completed", PAYLOAD)  # room again


def test_purge_removes_finished_rows_older_than_max_age(make_outbox: Callable[..., WebhookOutbox],
                                                       receiver: Receiver) -> None:
    outbox = make_outbox(max_age=2.0)
    assert outbox.enqueue("msg_done", receiver.url(), "task.completed", PAYLOAD)
    wait(lambda: state_of(outbox, "msg_done") == "delivered", "the delivery")
    assert outbox.enqueue("msg_later", receiver.url(), "task.completed", PAYLOAD, now=time.time() + 100)
    assert outbox.purge(now=time.time() + 1.0) == 0
    assert outbox.purge(now=time.time() + 3.0) == 1
    assert outbox.status("msg_done") is None and state_of(outbox, "msg_later") == "pending"


def test_a_failing_host_is_paused_and_tried_one_attempt_at_a_time(make_outbox: Callable[..., WebhookOutbox]) -> None:
    """The circuit breaker, driven by hand (no delivery threads): a failure pauses its host and
    limits it to one attempt at a time, while other hosts' deliveries go on."""
    clock = Clock()
    outbox = make_outbox(start=False, clock=clock, jitter=0.0, first_delay=1.0, max_delay=8.0, max_age=100.0)
    for i in range(3):
        assert outbox.enqueue(f"msg_dead_{i}", "http://dead.example:8080/hook", "task.completed", PAYLOAD)
    clock.offset += 0.01
    assert outbox.enqueue("msg_live", "http://live.example/hook", "task.completed", PAYLOAD)
    with outbox._lock:
        first = outbox._claim("w1")
        second = outbox._claim("w2")  # a healthy host takes several attempts at once
    assert (first.msg_id, second.msg_id) == ("msg_dead_0", "msg_dead_1")
    outbox._finish(first, webhooks._Outcome("pending", None, "timed out after 10s"))
    with outbox._lock:
        assert outbox._claim("w1").msg_id == "msg_live"  # the paused host is skipped
        assert outbox._claim("w3") is None
        assert 0.9 < outbox._idle_wait() <= 1.0  # wakes when the pause ends
    clock.offset += 1.5  # the pause is over, but msg_dead_1 is still in flight: one at a time now
    with outbox._lock:
        assert outbox._claim("w3") is None
    outbox._finish(second, webhooks._Outcome("pending", 503, "HTTP 503"))
    clock.offset += 2.5  # the second failure doubled the pause (2 s)
    with outbox._lock:
        retry = outbox._claim("w3")
        assert retry is not None and retry.msg_id.startswith("msg_dead") and outbox._claim("w4") is None
    outbox._finish(retry, webhooks._Outcome("delivered", 200, None))
    with outbox._lock:
        assert "dead.example:8080" not in outbox._hosts  # healthy again: its breaker is forgotten
        assert outbox._claim("w4") is not None  # and several attempts may run at once again
        assert outbox._claim("w5") is not None


def test_a_name_lookup_that_hangs_is_given_up_at_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def slow(*args: Any, **kwargs: Any) -> list[Any]:
        release.wait(5)
        return []

    monkeypatch.setattr(ssrf.socket, "getaddrinfo", slow)
    try:
        with pytest.raises(TimeoutError):
            ssrf.resolve("slow.example", 80, allow_private=False, timeout=0.2)
    finally:
        release.set()


def test_counts_for_metrics_come_from_memory(make_outbox: Callable[..., WebhookOutbox], receiver: Receiver) -> None:
    outbox = make_outbox()
    assert outbox.counts() == (0, {"delivered": 0, "failed": 0, "refused": 0})
    outbox.enqueue("msg_ok", receiver.url(), "task.completed", PAYLOAD)
    outbox.enqueue("msg_no", "ftp://example.com/x", "task.completed", PAYLOAD)
    wait(lambda: outbox.counts()[1]["delivered"] == 1, "the delivery")
    assert outbox.counts() == (0, {"delivered": 1, "failed": 0, "refused": 1})
    assert outbox.stats() == {"pending": 0, "delivered": 1, "failed": 0, "refused": 1}
