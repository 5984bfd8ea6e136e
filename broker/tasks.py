"""Task records kept by the broker (no sockets, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from broker.protocol import FINAL_STATES, QUEUED


@dataclass
class Task:
    """One accepted generation task and its lifecycle state."""

    task_id: str
    model: str
    mode: str
    priority: int
    seq: int
    params: dict[str, Any]
    owner: str = ""
    image_names: list[str] = field(default_factory=list)
    inputs: list[bytes] = field(default_factory=list)
    state: str = QUEUED
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    deadline: float = 0.0
    attempts: int = 0
    node: bytes | None = None
    node_id: str | None = None
    step: int = 0
    total: int = 0
    error_code: str | None = None
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    watchers: set[bytes] = field(default_factory=set)

    @property
    def final(self) -> bool:
        """True once the task is completed, failed or cancelled."""
        return self.state in FINAL_STATES

    def job_header(self) -> dict[str, Any]:
        """The JOB header a node receives for this task."""
        return {"task_id": self.task_id, "model_id": self.model, "mode": self.mode,
                "params": self.params, "images": self.image_names, "attempt": self.attempts}

    def describe(self, position: int | None = None) -> dict[str, Any]:
        """Plain-dict status for STATUS / FETCH replies."""
        out: dict[str, Any] = {
            "task_id": self.task_id, "status": self.state, "model_id": self.model,
            "mode": self.mode, "priority": self.priority, "owner": self.owner,
            "created_at": self.created, "started_at": self.started,
            "finished_at": self.finished, "attempts": self.attempts, "node_id": self.node_id,
            "params": self.params,
        }
        if position is not None:
            out["queue_position"] = position
        if self.total:
            out["progress"] = {"step": self.step, "total": self.total}
        if self.error_code:
            out["error_code"] = self.error_code
            out["error"] = self.error
        if self.meta:
            out["meta"] = self.meta
        return out
