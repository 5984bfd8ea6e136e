"""HTTP front configuration: one frozen dataclass, built by http_front.__main__."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from genserve.catalog import DEFAULT_PRIORITY_FLOOR


@dataclass(frozen=True)
class FrontConfig:
    """Everything one front process needs."""

    broker: str = "tcp://127.0.0.1:5555"
    host: str = "0.0.0.0"
    port: int = 12411
    threads: int = 48
    # Synchronous /generate waits allowed at once, below `threads` so /health, /task and
    # async submissions always find a free thread; past a cap, 429 with Retry-After.
    max_sync_waits: int = 32
    max_sync_waits_per_key: int = 16
    # Event streams (GET /task/{id}/events) open at once, and per key; they hold no waitress
    # thread (the stream pump writes them). A comment line is written after `stream_keepalive`
    # quiet seconds.
    max_streams: int = 1000
    max_streams_per_key: int = 100
    stream_keepalive: float = 15.0
    # Waitress: open connections, seconds an idle connection is kept, seconds a client has to
    # send its request line and headers, listen backlog, the app's own header-size limit (431).
    connection_limit: int = 4000
    channel_timeout: int = 30
    header_timeout: int = 20
    backlog: int = 2048
    max_header_bytes: int = 32 * 1024
    max_prompt_length: int = 1000
    max_image_size: int = 2048
    max_body_bytes: int = 48 * 1024 * 1024
    task_timeout: float = 240.0
    broker_timeout: float = 2.0
    rate_limit: int = 100
    default_priority_floor: int = DEFAULT_PRIORITY_FLOOR  # for non-admin keys without one of their own
    rate_window: float = 60.0
    auth_failure_limit: int = 30
    auth_failure_window: float = 60.0
    default_key_remote: bool = False
    key_file: Path = Path("api_keys.enc")
    encryption_key: str | None = None
    legacy_password: str = "genserve-default-key-2024"
    curve_secret_file: Path | None = None
    curve_server_public_file: Path | None = None
    url_secret: bytes | None = None  # signs image URLs; shared by every front (None: one per process)
    url_ttl: float = 900.0  # seconds a signed image URL stays valid
