"""GPU node configuration: frozen dataclasses built by gpu_node.__main__ (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

QUANTIZE = ("none", "fp8")
CACHES = ("none", "first_block")


class SpeedError(RuntimeError):
    """An option that this device or installation cannot run (raised at node start)."""


@dataclass(frozen=True)
class SpeedOptions:
    """How a node runs its transformers; the defaults are plain eager bf16 with no cache."""

    compile: bool = False
    compile_backend: str = "inductor"
    quantize: str = "none"
    cache: str = "none"  # the node's default; a request's "speed" overrides it
    cache_threshold: float = 0.12
    lora_rank: int = 0  # rank capacity of the resident LoRA slots; 0 = load and unload per job
    warmup: tuple[tuple[int, int], ...] = ()  # (width, height) run once at start when compiling

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE:
            raise SpeedError(f"--quantize must be one of {list(QUANTIZE)}, not {self.quantize!r}")
        if self.cache not in CACHES:
            raise SpeedError(f"--cache must be one of {list(CACHES)}, not {self.cache!r}")
        if not 0 < self.cache_threshold < 10:
            raise SpeedError("--cache-threshold must be in (0, 10)")
        if not 0 <= self.lora_rank <= 1024:
            raise SpeedError("--lora-slots-rank must be in 0..1024")


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
    prefetch: int = 1  # jobs taken beyond the running one, so the next starts while an image is encoded
    batch: int = 1  # most tasks run in one pipeline call (the broker groups them); 1: each job alone (see README)
    batch_pixels: int = 512 * 512  # only images up to this size batch (on an H200 1024x1024 hardly gained)
    preload: tuple[str, ...] = ()
    memory_budget: int = 0  # bytes of weights kept loaded; 0 = 90% of the device
    lora_cache_bytes: int = 2 << 30
    png_compress_level: int = 1
    max_sequence_length: int = 512
    curve_secret_file: Path | None = None
    curve_server_public_file: Path | None = None
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    host_memory_budget: int = 0  # bytes of pinned host memory for parked transformers; 0 = none
    compile_cache: Path | None = None  # inductor's cache folder, kept across restarts; None = torch's default
