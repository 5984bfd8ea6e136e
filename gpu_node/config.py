"""GPU node configuration: one frozen dataclass, built by gpu_node.__main__."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class NodeConfig:
    """Everything one node process needs."""

    broker: str = "tcp://127.0.0.1:5556"
    device: str = "cpu"
    model_paths: dict[str, str] = field(default_factory=dict)
    lora_dir: Path | None = None
    node_id: str = ""
    heartbeat_interval: float = 1.0
    liveness: int = 3
    reconnect_max: float = 8.0
    shutdown_grace: float = 20.0  # most seconds a stopping node waits for its job's current step
    progress_interval: float = 0.2
    preload: tuple[str, ...] = ()
    memory_budget: int = 0  # bytes of weights kept loaded; 0 = 90% of the device
    lora_cache_bytes: int = 2 << 30
    png_compress_level: int = 1
    max_sequence_length: int = 512
    curve_secret_file: Path | None = None
    curve_server_public_file: Path | None = None
