"""Error codes carried in FAIL and ERROR messages and in failed tasks; the front maps them to HTTP."""

from __future__ import annotations

from typing import Final

BAD_REQUEST: Final = "bad_request"
UNKNOWN_MODEL: Final = "unknown_model"
UNSUPPORTED_MODE: Final = "unsupported_mode"
NO_NODE: Final = "no_node"
NOT_FOUND: Final = "not_found"
QUEUE_FULL: Final = "queue_full"
DISK_FULL: Final = "disk_full"  # the disk budget cannot hold a new task's images: retry later
TIMEOUT: Final = "timeout"
CANCELLED: Final = "cancelled"
NODE_LOST: Final = "node_lost"
ABANDONED: Final = "abandoned"  # node lost the broker or is stopping: re-queue, not a failure
RECALLED: Final = "recalled"  # a waiting job the node gave back unstarted: re-queue, no attempt spent
NODE_BUSY: Final = "node_busy"  # a JOB reached a node that already runs one: re-queue
IDEMPOTENCY: Final = "idempotency_mismatch"  # an Idempotency-Key reused for a different request
EXPIRED: Final = "expired"  # a SUBMIT reached the broker after its deadline: its client was told it failed
GENERATION: Final = "generation_failed"
LORA: Final = "lora_error"  # a LoRA file that cannot be applied to this model
PROTOCOL: Final = "protocol"
