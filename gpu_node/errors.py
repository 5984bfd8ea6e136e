"""Errors a job can end with on the node; each carries the code the front maps to HTTP."""

from __future__ import annotations


class JobError(ValueError):
    """A job the node refuses or cannot run; the message goes back to the client."""

    code = "bad_request"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class LoraError(JobError):
    """A LoRA that cannot be used for this job (unknown name, unreadable or mismatched file)."""

    code = "lora_error"


class Cancelled(Exception):
    """Raised from the step callback when the broker cancels the running task."""
