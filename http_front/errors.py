"""Domain errors and their one mapping to HTTP responses."""

from __future__ import annotations

import logging
from typing import Any

import falcon

from genserve import errors as e
from http_front.broker_client import BrokerError, BrokerUnavailable

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as ``{"success": false, "error", "detail"}``."""

    def __init__(self, status: int, error: str, detail: str = "", retry_after: int | None = None,
                 **extra: Any) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail or error
        self.retry_after = retry_after
        self.extra = extra


class AuthError(Exception):
    """An authentication/authorisation error answered as ``{"detail": ...}`` (guide 5.3)."""

    def __init__(self, status: int, detail: str, retry_after: int | None = None, reason: str = "other") -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after
        self.reason = reason  # for metrics: missing_key, invalid_key, forbidden, throttled, rate_limited, ...


# Broker error code -> (HTTP status, short error).
BROKER_STATUS: dict[str, tuple[int, str]] = {
    e.BAD_REQUEST: (422, "invalid request"),
    e.UNKNOWN_MODEL: (400, "unknown model_id"),
    e.UNSUPPORTED_MODE: (422, "mode not supported by this model"),
    e.NO_NODE: (503, "no node serves this model"),
    e.NOT_FOUND: (404, "task not found"),
    e.QUEUE_FULL: (429, "too many queued tasks"),
    e.DISK_FULL: (503, "result storage is full"),
    e.TIMEOUT: (504, "task timed out"),
    e.CANCELLED: (409, "task was cancelled"),
    e.NODE_LOST: (503, "the node running the task was lost"),
    e.GENERATION: (500, "generation failed"),
    e.LORA: (422, "LoRA cannot be applied"),
    e.IDEMPOTENCY: (422, "Idempotency-Key reused"),
    e.EXPIRED: (503, "the broker received the request too late"),
}

# Broker error code -> Retry-After seconds (a full queue drains as nodes finish jobs).
# Seconds a client should wait before retrying; disk space comes back as results become evictable.
RETRY_AFTER: dict[str, int] = {e.QUEUE_FULL: 5, e.DISK_FULL: 10, e.EXPIRED: 2}


def from_task_error(code: str, message: str) -> ApiError:
    """ApiError for a task that ended failed/cancelled."""
    status, error = BROKER_STATUS.get(code, (500, "generation failed"))
    return ApiError(status, error, message, error_code=code)


def _error_body(error: str, detail: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"success": False, "error": error, "detail": detail, **extra}


def _api_error(req: falcon.Request, resp: falcon.Response, ex: ApiError, params: dict) -> None:
    resp.status = ex.status
    if ex.retry_after is not None:
        resp.set_header("Retry-After", str(ex.retry_after))
    resp.media = _error_body(ex.error, ex.detail, ex.extra)


def _auth_error(req: falcon.Request, resp: falcon.Response, ex: AuthError, params: dict) -> None:
    resp.status = ex.status
    resp.media = {"detail": ex.detail}
    if ex.status == 401:
        resp.set_header("WWW-Authenticate", "Bearer")
    if ex.retry_after is not None:
        resp.set_header("Retry-After", str(ex.retry_after))


def _broker_error(req: falcon.Request, resp: falcon.Response, ex: BrokerError, params: dict) -> None:
    status, error = BROKER_STATUS.get(ex.code, (502, "broker error"))
    resp.status = status
    if ex.code in RETRY_AFTER:
        resp.set_header("Retry-After", str(RETRY_AFTER[ex.code]))
    resp.media = _error_body(error, str(ex), ex.extra)


def _broker_down(req: falcon.Request, resp: falcon.Response, ex: BrokerUnavailable, params: dict) -> None:
    resp.status = 503
    resp.set_header("Retry-After", "2")
    resp.media = _error_body("service unavailable", "the broker is not reachable; retry shortly", {})


def _http_error(req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError, params: dict) -> None:
    resp.status = ex.status
    for name, value in (ex.headers or {}).items():
        resp.set_header(name, value)
    resp.media = _error_body(ex.title or "error", ex.description or ex.title or "", {})


def _too_deep(req: falcon.Request, resp: falcon.Response, ex: RecursionError, params: dict) -> None:
    # Python's JSON decoder raises RecursionError for bodies nested past the recursion limit.
    log.warning("RecursionError on %s %s (a deeply nested body?): %s", req.method, req.path, ex)
    resp.status = 400
    resp.media = _error_body("malformed request", "the body is nested too deeply", {})


def _unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict) -> None:
    log.exception("unhandled error on %s %s", req.method, req.path)
    resp.status = 500
    resp.media = _error_body("internal server error", "see the server log", {})


def install(app: falcon.App) -> None:
    """Register every handler; Falcon picks the most specific class."""
    app.add_error_handler(Exception, _unexpected)
    app.add_error_handler(RecursionError, _too_deep)
    app.add_error_handler(falcon.HTTPError, _http_error)
    app.add_error_handler(ApiError, _api_error)
    app.add_error_handler(AuthError, _auth_error)
    app.add_error_handler(BrokerError, _broker_error)
    app.add_error_handler(BrokerUnavailable, _broker_down)
