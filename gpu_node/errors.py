"""Errors a job can end with on the node; each carries the code the front maps to HTTP."""

from __future__ import annotations

from genserve import errors as e


class JobError(ValueError):
    """A job the node refuses or cannot run; the message goes back to the client."""

    code = e.BAD_REQUEST

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class LoraError(JobError):
    """A LoRA that cannot be used for this job (unknown name, unreadable or mismatched file)."""

    code = e.LORA


class Cancelled(Exception):
    """Raised from the step callback when the broker cancels the running task."""
