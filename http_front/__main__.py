"""`genserve-front`: the Falcon app on waitress, connected to the broker."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from genserve import catalog, logs
from genserve.keyfile import KeyFile, KeyFileError, make_fernet
from http_front.app import create_app
from http_front.broker_client import BrokerClient
from http_front.config import FrontConfig
from http_front.keys import DEFAULT_KEY, MIN_KEY_LENGTH, InvalidKeySpec, KeyStore, parse_env_keys, weak_keys
from http_front.server import serve

log = logging.getLogger(__name__)


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def parse_config(argv: list[str] | None = None, env: dict[str, str] | None = None) -> FrontConfig:
    """Flags win over environment variables (legacy names HOST, PORT, ... kept)."""
    env = dict(os.environ if env is None else env)
    d = FrontConfig()
    ap = argparse.ArgumentParser(prog="genserve-front", description=__doc__)
    ap.add_argument("--broker", default=env.get("GENSERVE_BROKER_URL", d.broker),
                    help="broker frontend endpoint (env GENSERVE_BROKER_URL)")
    ap.add_argument("--host", default=env.get("HOST", d.host), help="listen address (env HOST)")
    ap.add_argument("--port", type=int, default=int(env.get("PORT", d.port)), help="listen port (env PORT)")
    ap.add_argument("--threads", type=int, default=int(env.get("GENSERVE_THREADS", d.threads)),
                    help="waitress worker threads (env GENSERVE_THREADS)")
    ap.add_argument("--max-sync-waits", type=int,
                    default=int(env.get("GENSERVE_MAX_SYNC_WAITS", d.max_sync_waits)),
                    help="synchronous /generate requests waiting at once, below --threads; then 429"
                         " (env GENSERVE_MAX_SYNC_WAITS)")
    ap.add_argument("--max-sync-waits-per-key", type=int,
                    default=int(env.get("GENSERVE_MAX_SYNC_WAITS_PER_KEY", d.max_sync_waits_per_key)),
                    help="the same, per API key (env GENSERVE_MAX_SYNC_WAITS_PER_KEY)")
    ap.add_argument("--max-streams", type=int, default=int(env.get("GENSERVE_MAX_STREAMS", d.max_streams)),
                    help="event streams open at once (they hold no thread); then 429"
                         " (env GENSERVE_MAX_STREAMS)")
    ap.add_argument("--max-streams-per-key", type=int,
                    default=int(env.get("GENSERVE_MAX_STREAMS_PER_KEY", d.max_streams_per_key)),
                    help="the same, per API key (env GENSERVE_MAX_STREAMS_PER_KEY)")
    ap.add_argument("--connection-limit", type=int,
                    default=int(env.get("GENSERVE_CONNECTION_LIMIT", d.connection_limit)),
                    help="open client connections (env GENSERVE_CONNECTION_LIMIT)")
    ap.add_argument("--channel-timeout", type=int,
                    default=int(env.get("GENSERVE_CHANNEL_TIMEOUT", d.channel_timeout)),
                    help="seconds an idle connection is kept (env GENSERVE_CHANNEL_TIMEOUT)")
    ap.add_argument("--header-timeout", type=int,
                    default=int(env.get("GENSERVE_HEADER_TIMEOUT", d.header_timeout)),
                    help="seconds a client has to send its request line and headers (env GENSERVE_HEADER_TIMEOUT)")
    ap.add_argument("--backlog", type=int, default=int(env.get("GENSERVE_BACKLOG", d.backlog)),
                    help="listen backlog (env GENSERVE_BACKLOG)")
    ap.add_argument("--max-header-bytes", type=int,
                    default=int(env.get("GENSERVE_MAX_HEADER_BYTES", d.max_header_bytes)),
                    help="header fields larger than this get 431 (env GENSERVE_MAX_HEADER_BYTES)")
    ap.add_argument("--task-timeout", type=float, default=float(env.get("GENSERVE_TASK_TIMEOUT", d.task_timeout)))
    ap.add_argument("--rate-limit", type=int, default=int(env.get("GENSERVE_RATE_LIMIT", d.rate_limit)),
                    help="requests per window per key (env GENSERVE_RATE_LIMIT)")
    ap.add_argument("--rate-window", type=float, default=float(env.get("GENSERVE_RATE_WINDOW", d.rate_window)))
    ap.add_argument("--default-priority-floor", type=int,
                    default=int(env.get("GENSERVE_DEFAULT_PRIORITY_FLOOR", d.default_priority_floor)),
                    help="most urgent priority a non-admin key may ask for unless an admin set its own"
                         " (env GENSERVE_DEFAULT_PRIORITY_FLOOR)")
    ap.add_argument("--auth-failure-limit", type=int,
                    default=int(env.get("GENSERVE_AUTH_FAILURE_LIMIT", d.auth_failure_limit)))
    ap.add_argument("--allow-default-key-remote", action="store_true",
                    default=_flag(env.get("GENSERVE_ALLOW_DEFAULT_KEY_REMOTE")),
                    help="accept the default key from non-loopback clients (not recommended)")
    ap.add_argument("--key-file", default=env.get("API_KEYS_FILE", str(d.key_file)),
                    help="encrypted key file (env API_KEYS_FILE)")
    ap.add_argument("--curve-secret", default=env.get("GENSERVE_CURVE_SECRET"))
    ap.add_argument("--curve-server", default=env.get("GENSERVE_CURVE_SERVER"))
    ap.add_argument("--log-level", default=env.get("LOG_LEVEL", "INFO"))
    ap.add_argument("--log-format", choices=logs.FORMATS, default=env.get("GENSERVE_LOG_FORMAT", "text").lower(),
                    help="text lines or JSON lines with task_id/node_id/key_id fields (env GENSERVE_LOG_FORMAT)")
    a = ap.parse_args(argv)
    if a.log_format not in logs.FORMATS:  # argparse checks choices on the command line only
        ap.error(f"GENSERVE_LOG_FORMAT must be one of {list(logs.FORMATS)}")
    if not catalog.MIN_PRIORITY <= a.default_priority_floor <= catalog.MAX_PRIORITY:
        ap.error(f"--default-priority-floor must be in {catalog.MIN_PRIORITY}..{catalog.MAX_PRIORITY}")
    if not 0 <= a.max_sync_waits < a.threads:
        ap.error("--max-sync-waits must be below --threads: /health, /task and async requests need threads too")
    if a.max_streams < 0 or a.max_streams_per_key < 0:
        ap.error("--max-streams and --max-streams-per-key must be 0 or more")
    if min(a.max_sync_waits_per_key, a.connection_limit, a.channel_timeout, a.header_timeout, a.backlog,
           a.max_header_bytes) < 1:
        ap.error("--max-sync-waits-per-key, --connection-limit, --channel-timeout, --header-timeout,"
                 " --backlog and --max-header-bytes must be positive")
    logs.setup(a.log_level, a.log_format, "front")
    return FrontConfig(
        broker=a.broker, host=a.host, port=a.port, threads=a.threads, task_timeout=a.task_timeout,
        max_sync_waits=a.max_sync_waits, max_sync_waits_per_key=a.max_sync_waits_per_key,
        max_streams=a.max_streams, max_streams_per_key=a.max_streams_per_key,
        connection_limit=a.connection_limit, channel_timeout=a.channel_timeout, header_timeout=a.header_timeout,
        backlog=a.backlog, max_header_bytes=a.max_header_bytes,
        max_prompt_length=int(env.get("MAX_PROMPT_LENGTH", d.max_prompt_length)),
        max_image_size=int(env.get("MAX_IMAGE_SIZE", d.max_image_size)),
        rate_limit=a.rate_limit, rate_window=a.rate_window, auth_failure_limit=a.auth_failure_limit,
        default_priority_floor=a.default_priority_floor,
        default_key_remote=a.allow_default_key_remote, key_file=Path(a.key_file),
        encryption_key=env.get("API_KEYS_ENCRYPTION_KEY") or None,
        legacy_password=env.get("DEFAULT_API_KEY") or DEFAULT_KEY,
        curve_secret_file=Path(a.curve_secret) if a.curve_secret else None,
        curve_server_public_file=Path(a.curve_server) if a.curve_server else None,
        url_secret=env.get("GENSERVE_URL_SECRET", "").encode() or None,
    )


def main(argv: list[str] | None = None) -> None:
    """Serve HTTP until killed (the front holds no state worth a graceful stop)."""
    config = parse_config(argv)
    env = dict(os.environ)
    try:
        keyfile = KeyFile(config.key_file, make_fernet(config.encryption_key, config.legacy_password))
        env_keys = parse_env_keys(env)
        keys = KeyStore.from_env(env_keys, env.get("DEFAULT_API_KEY") or DEFAULT_KEY, keyfile,
                                 config.default_priority_floor)
    except (KeyFileError, InvalidKeySpec) as exc:
        raise SystemExit(f"genserve-front: cannot start: {exc}") from None
    if config.url_secret is not None and len(config.url_secret) < 16:
        raise SystemExit("genserve-front: cannot start: GENSERVE_URL_SECRET needs at least 16 bytes")
    if config.url_secret is None:
        log.info("GENSERVE_URL_SECRET is not set: signed image URLs work on this front only")
    for name in weak_keys(env_keys):
        log.warning("API key %r is shorter than %d characters and can be guessed; replace it with a"
                    " generated key (genservectl keys create)", name, MIN_KEY_LENGTH)
    if keys.uses_default:
        log.warning("no admin-capable API key exists: the default key works%s until one is created",
                    "" if config.default_key_remote else ", from loopback clients only,")
    broker = BrokerClient(config.broker, config.broker_timeout, curve_secret_file=config.curve_secret_file,
                          curve_server_public_file=config.curve_server_public_file).start()
    app = create_app(broker, keys, config)
    log.info("GenServe front on http://%s:%d -> broker %s", config.host, config.port, config.broker)
    try:
        serve(app, config)
    finally:
        broker.close()


if __name__ == "__main__":
    main()
