"""`genserve-broker`: build the config from flags and environment, run the broker."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

from broker.config import BrokerConfig
from broker.server import Broker
from genserve import logs
from genserve.curve import InsecureBind

MB = 1 << 20


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def parse_config(argv: list[str] | None = None, env: dict[str, str] | None = None) -> BrokerConfig:
    """Flags win over environment variables, which win over defaults."""
    env = dict(os.environ if env is None else env)
    d = BrokerConfig()
    ap = argparse.ArgumentParser(prog="genserve-broker", description=__doc__)
    ap.add_argument("--frontend", default=env.get("GENSERVE_BROKER_FRONTEND", d.frontend),
                    help="ROUTER endpoint for HTTP fronts (env GENSERVE_BROKER_FRONTEND)")
    ap.add_argument("--backend", default=env.get("GENSERVE_BROKER_BACKEND", d.backend),
                    help="ROUTER endpoint for GPU nodes (env GENSERVE_BROKER_BACKEND)")
    ap.add_argument("--data-dir", default=env.get("GENSERVE_DATA_DIR", str(d.data_dir)),
                    help="journal and results directory (env GENSERVE_DATA_DIR)")
    ap.add_argument("--heartbeat", type=float, default=float(env.get("GENSERVE_HEARTBEAT", d.heartbeat_interval)),
                    help="heartbeat interval in seconds (env GENSERVE_HEARTBEAT)")
    ap.add_argument("--liveness", type=int, default=int(env.get("GENSERVE_LIVENESS", d.liveness)),
                    help="missed heartbeats before a node is expired (env GENSERVE_LIVENESS)")
    ap.add_argument("--task-timeout", type=float, default=float(env.get("GENSERVE_TASK_TIMEOUT", d.task_timeout)),
                    help="seconds from acceptance before a task fails (env GENSERVE_TASK_TIMEOUT)")
    ap.add_argument("--max-retries", type=int, default=int(env.get("GENSERVE_MAX_RETRIES", d.max_retries)),
                    help="re-queues after a node dies (env GENSERVE_MAX_RETRIES)")
    ap.add_argument("--result-ttl", type=float, default=float(env.get("GENSERVE_RESULT_TTL", d.result_ttl)),
                    help="seconds results are kept (env GENSERVE_RESULT_TTL)")
    ap.add_argument("--max-queued", type=int, default=int(env.get("GENSERVE_MAX_QUEUED", d.max_queued)),
                    help="cap on waiting tasks (env GENSERVE_MAX_QUEUED)")
    ap.add_argument("--max-queued-per-key", type=int,
                    default=int(env.get("GENSERVE_MAX_QUEUED_PER_KEY", d.max_queued_per_owner)),
                    help="cap on unfinished tasks per API key (env GENSERVE_MAX_QUEUED_PER_KEY)")
    ap.add_argument("--affinity-slack", type=float,
                    default=float(env.get("GENSERVE_AFFINITY_SLACK", d.affinity_slack)),
                    help="standard jobs (1024x1024, 28 steps) of fair-share lead a task for a loaded model may"
                         " take over a colder one; 0: ties only; negative: unbounded, the window alone"
                         " (env GENSERVE_AFFINITY_SLACK)")
    ap.add_argument("--affinity-window", type=float,
                    default=float(env.get("GENSERVE_AFFINITY_WINDOW", d.affinity_window)),
                    help="seconds after which a waiting task goes first whatever is loaded"
                         " (env GENSERVE_AFFINITY_WINDOW)")
    ap.add_argument("--load-cost", type=float, default=float(env.get("GENSERVE_LOAD_COST", d.load_cost)),
                    help="standard jobs a model load is billed to the key that caused it (env GENSERVE_LOAD_COST)")
    ap.add_argument("--lora-slack", type=float, default=float(env.get("GENSERVE_LORA_SLACK", d.lora_slack)),
                    help="standard jobs of fair-share lead a task may take over the pick on a node whose LoRA"
                         " slots already hold its set; negative: off (env GENSERVE_LORA_SLACK)")
    ap.add_argument("--recovery-grace", type=float,
                    default=float(env.get("GENSERVE_RECOVERY_GRACE", d.recovery_grace)),
                    help="after a restart, seconds a task that was running waits for its node to come back"
                         " before another node may run it (env GENSERVE_RECOVERY_GRACE)")
    ap.add_argument("--disk-budget-mb", type=float,
                    default=float(env.get("GENSERVE_DISK_BUDGET_MB", d.disk_budget_bytes / MB)),
                    help="disk for input and result images; past it the oldest results are evicted,"
                         " then SUBMITs refused; 0 = unlimited (env GENSERVE_DISK_BUDGET_MB)")
    ap.add_argument("--curve-secret", default=env.get("GENSERVE_CURVE_SECRET"),
                    help="broker secret key file; enables CURVE (env GENSERVE_CURVE_SECRET)")
    ap.add_argument("--curve-authorized", default=env.get("GENSERVE_CURVE_AUTHORIZED"),
                    help="directory of authorised public keys (env GENSERVE_CURVE_AUTHORIZED)")
    ap.add_argument("--insecure", action="store_true", default=env.get("GENSERVE_INSECURE", "") in ("1", "true"),
                    help="allow binding a non-loopback address without CURVE: anyone who reaches it can"
                         " submit, read results or pose as a node (env GENSERVE_INSECURE=1)")
    ap.add_argument("--webhook-secret", default=env.get("GENSERVE_WEBHOOK_SECRET"),
                    help="'whsec_<base64>' key that signs webhooks; default: one generated into"
                         " DATA_DIR/webhook_secret (env GENSERVE_WEBHOOK_SECRET)")
    ap.add_argument("--webhook-allow-private", action="store_true",
                    default=env.get("GENSERVE_WEBHOOK_ALLOW_PRIVATE", "") in ("1", "true"),
                    help="allow webhooks to loopback, private and link-local addresses (trusted networks"
                         " and tests only; env GENSERVE_WEBHOOK_ALLOW_PRIVATE=1)")
    ap.add_argument("--webhook-max-age", type=float,
                    default=float(env.get("GENSERVE_WEBHOOK_MAX_AGE", d.webhook_max_age)),
                    help="seconds a webhook is retried before it is given up (env GENSERVE_WEBHOOK_MAX_AGE)")
    ap.add_argument("--webhook-first-delay", type=float,
                    default=float(env.get("GENSERVE_WEBHOOK_FIRST_DELAY", d.webhook_first_delay)),
                    help="seconds before the first retry, doubling up to --webhook-max-delay"
                         " (env GENSERVE_WEBHOOK_FIRST_DELAY)")
    ap.add_argument("--webhook-max-delay", type=float,
                    default=float(env.get("GENSERVE_WEBHOOK_MAX_DELAY", d.webhook_max_delay)),
                    help="longest wait between retries (env GENSERVE_WEBHOOK_MAX_DELAY)")
    ap.add_argument("--webhook-timeout", type=float,
                    default=float(env.get("GENSERVE_WEBHOOK_TIMEOUT", d.webhook_timeout)),
                    help="seconds one delivery attempt may take (env GENSERVE_WEBHOOK_TIMEOUT)")
    ap.add_argument("--log-level", default=env.get("LOG_LEVEL", "INFO"))
    ap.add_argument("--log-format", choices=logs.FORMATS, default=env.get("GENSERVE_LOG_FORMAT", "text").lower(),
                    help="text lines or JSON lines with task_id/node_id/key_id fields (env GENSERVE_LOG_FORMAT)")
    a = ap.parse_args(argv)
    if a.log_format not in logs.FORMATS:  # argparse checks choices on the command line only
        ap.error(f"GENSERVE_LOG_FORMAT must be one of {list(logs.FORMATS)}")
    for flag, value in (("--affinity-slack", abs(a.affinity_slack)), ("--lora-slack", abs(a.lora_slack)),
                        ("--affinity-window", a.affinity_window),
                        ("--load-cost", a.load_cost), ("--recovery-grace", a.recovery_grace)):
        if not 0 <= value < 1e9:  # also refuses NaN, which would break the queue's ordering
            ap.error(f"{flag} must be a number from 0 to 1e9")
    logs.setup(a.log_level, a.log_format, "broker")
    return BrokerConfig(
        frontend=a.frontend, backend=a.backend, data_dir=Path(a.data_dir),
        heartbeat_interval=a.heartbeat, liveness=a.liveness, task_timeout=a.task_timeout,
        max_retries=a.max_retries, result_ttl=a.result_ttl, max_queued=a.max_queued,
        max_queued_per_owner=a.max_queued_per_key, disk_budget_bytes=int(a.disk_budget_mb * MB),
        affinity_slack=None if a.affinity_slack < 0 else a.affinity_slack, affinity_window=a.affinity_window,
        load_cost=a.load_cost, recovery_grace=a.recovery_grace,
        lora_slack=None if a.lora_slack < 0 else a.lora_slack,
        curve_secret_file=_path(a.curve_secret),
        curve_authorized_dir=_path(a.curve_authorized), insecure=a.insecure,
        webhook_secret=a.webhook_secret, webhook_allow_private=a.webhook_allow_private,
        webhook_max_age=a.webhook_max_age, webhook_first_delay=a.webhook_first_delay,
        webhook_max_delay=a.webhook_max_delay, webhook_timeout=a.webhook_timeout,
    )


def main(argv: list[str] | None = None) -> None:
    """Run the broker until SIGTERM or SIGINT."""
    config = parse_config(argv)
    try:
        broker = Broker(config)
    except ValueError as exc:  # a malformed webhook secret or setting
        raise SystemExit(f"genserve-broker: cannot start: {exc}") from None
    try:
        broker.bind()
    except InsecureBind as exc:
        broker.close()
        raise SystemExit(f"genserve-broker: {exc}") from None
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    signal.signal(signal.SIGINT, lambda *_: broker.stop())
    try:
        broker.run()
    finally:
        broker.close()
    if broker.failed:
        raise SystemExit("genserve-broker: the journal could not commit; restart to recover from it")


if __name__ == "__main__":
    main()
