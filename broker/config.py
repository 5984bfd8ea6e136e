"""Broker configuration: one frozen dataclass, built by broker.__main__."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BrokerConfig:
    """Everything the broker process needs to run."""

    frontend: str = "tcp://127.0.0.1:5555"
    backend: str = "tcp://127.0.0.1:5556"
    data_dir: Path = Path("var/broker")
    heartbeat_interval: float = 1.0
    liveness: int = 3
    task_timeout: float = 240.0
    max_retries: int = 2
    result_ttl: float = 3600.0
    max_queued: int = 10_000
    max_queued_per_owner: int = 1_000
    # Model affinity (broker.queue): a warm task may pass a colder one by at most `affinity_slack`
    # standard jobs of virtual time, and never once the cold one has waited `affinity_window` seconds.
    # The slack is what bounds a cold task's wait; the window is a backstop (a short one makes nodes
    # switch models for every job under a backlog: bench/scheduler_sim.py). A task that makes its
    # node load a model bills its key `load_cost` standard jobs (a Flux transformer read from disk
    # takes about as long as 10 jobs of 28 steps at 1024x1024).
    affinity_window: float = 3600.0
    affinity_slack: float | None = 10.0
    load_cost: float = 10.0
    # LoRA affinity: a node whose slots hold a task's LoRA set gets it before the pick if its fair-share
    # tag is at most `lora_slack` standard jobs later (None: off).
    lora_slack: float | None = 1.0
    # After a restart, a task that was running waits up to this long (from the first poll) for the node
    # that ran it to claim it, report it or re-register without it; only then may another node run it.
    # A node in reconnect backoff (gpu_node's reconnect_max, 8 s) comes back within it.
    recovery_grace: float = 15.0
    disk_budget_bytes: int = 0  # image files plus reserved results; 0 = unlimited
    curve_secret_file: Path | None = None
    curve_authorized_dir: Path | None = None
    insecure: bool = False  # allow a non-loopback bind without CURVE (trusted networks only)
    # Webhooks: the "whsec_..." signing secret (None: generated once into data_dir/webhook_secret);
    # whether loopback/private/link-local receivers are allowed; retries (doubling from first_delay up
    # to max_delay) until max_age seconds after the event; per-attempt timeout; delivery threads.
    webhook_secret: str | None = None
    webhook_allow_private: bool = False
    webhook_max_age: float = 3600.0
    webhook_first_delay: float = 1.0
    webhook_max_delay: float = 300.0
    webhook_timeout: float = 10.0
    webhook_workers: int = 4

    @property
    def node_timeout(self) -> float:
        """Seconds of silence after which a node is expired."""
        return self.heartbeat_interval * self.liveness
