"""The typed views the broker reports to fronts and nodes report to the broker: tasks, nodes, results.

Part of the wire contract (genserve.wire re-exports them); declared here to keep each
module readable in one sitting.
"""

from __future__ import annotations

import msgspec

from genserve.spec import GenerationParams


class LoraInfo(msgspec.Struct):
    """A LoRA file a node can load, as /loras lists it."""

    name: str
    size_mb: float = 0.0
    category: str = "root"


class Progress(msgspec.Struct):
    """Denoising progress of a running task."""

    step: int
    total: int


class ResultMeta(msgspec.Struct, omit_defaults=True):
    """What a node reports about an image it made."""

    generation_time: float
    width: int
    height: int
    seed: int
    steps: int
    device: str
    cfg: float | None = None
    format: str = "png"
    speed: str | None = None  # what ran: "fast" (step cache on) or "quality"
    lora_load: str | None = None  # "hotswap" (packed into resident slots) or "reload"
    lora_seconds: float | None = None  # time spent putting the LoRAs on the model
    batch: int | None = None  # images made in the same pipeline call, when more than one


class TaskView(msgspec.Struct, omit_defaults=True):
    """A task as the broker reports it to fronts (STATUS, FETCH, CANCEL_TASK, DONE)."""

    task_id: str
    status: str
    model_id: str
    mode: str
    priority: int
    owner: str
    params: GenerationParams
    created_at: float
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    node_id: str | None = None
    queue_position: int | None = None
    progress: Progress | None = None
    error_code: str | None = None
    error: str | None = None
    meta: ResultMeta | None = None
    result_expired: bool = False


class NodeStats(msgspec.Struct):
    """A node's running totals since it started, reported in its heartbeats (for metrics)."""

    busy_seconds: float = 0.0  # time inside pipeline calls
    jobs: int = 0
    model_loads: int = 0
    load_seconds: float = 0.0
    evictions: int = 0


class NodeView(msgspec.Struct):
    """A registered node as INFO reports it."""

    node_id: str
    device: str
    host: str
    pid: int
    state: str
    draining: bool
    task_id: str | None
    models: dict[str, list[str]]
    loaded: list[str]
    loras: list[LoraInfo]
    memory_total: int
    memory_free: int
    last_heartbeat_age_s: float
    jobs_done: int
    next_task_id: str | None = None  # a job waiting on the node behind task_id (prefetch)


class ServedModel(msgspec.Struct):
    """One model id across live nodes."""

    modes: list[str]
    nodes: list[str]
    loaded_on: list[str]


class QueueView(msgspec.Struct):
    """Waiting tasks."""

    length: int
    by_model: dict[str, int]
