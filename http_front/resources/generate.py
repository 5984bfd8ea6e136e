"""POST /generate (JSON, base64 images) and POST /generate/upload (multipart files)."""

from __future__ import annotations

import logging
from typing import Any

import falcon
import msgspec

from genserve import wire as w
from genserve.catalog import IMAGE_FIELDS
from genserve.logs import ids, key_ref
from http_front.broker_client import BrokerError, BrokerUnavailable
from http_front.errors import ApiError, from_task_error
from http_front.images import MAX_IMAGE_BYTES
from http_front.render import send_task
from http_front.services import Services
from http_front.validation import MAX_FORM_FIELD, GenerateRequest, form_text
from http_front.waits import DISCONNECTED_KEY, ClientGone, SyncWaits, wait_for_task, waiter_key

log = logging.getLogger(__name__)

GENERATE = {"POST": ("generation",)}
MAX_IDEMPOTENCY_KEY = 255


class _Submitter:
    """Shared by both endpoints: check LoRAs, submit, then wait or answer 202."""

    auth = GENERATE

    def __init__(self, services: Services, waits: SyncWaits | None = None) -> None:
        self.services = services
        config = services.config
        self.waits = waits or SyncWaits(config.max_sync_waits, config.max_sync_waits_per_key)

    def _check_body_size(self, req: falcon.Request) -> None:
        if req.content_length and req.content_length > self.services.config.max_body_bytes:
            raise ApiError(413, "request too large",
                           f"body exceeds {self.services.config.max_body_bytes // (1024 * 1024)} MB")

    def _check_loras(self, request: GenerateRequest) -> None:
        """Every LoRA must be one a live node lists (names are already canonical)."""
        loras = request.spec.params.loras
        if not loras:
            return
        known = {e.name for e in self.services.loras()}
        for index, lora in enumerate(loras):
            if lora.name not in known:
                raise ApiError(400, "unknown LoRA", f"LoRA {lora.name!r} not found; available: {sorted(known)}",
                               field=f"loras.{index}.name")

    @staticmethod
    def _is_async(req: falcon.Request, request: GenerateRequest) -> bool:
        return request.is_async or "respond-async" in (req.get_header("Prefer") or "").lower()

    def submit(self, req: falcon.Request, resp: falcon.Response, request: GenerateRequest) -> None:
        """Queue the task; answer with the image (sync, within the wait caps) or 202 and the task id (async)."""
        if self._is_async(req, request):
            self._submit(req, resp, request)
            return
        with self.waits.slot(waiter_key(req.context.principal)):  # 429 past a cap, before SUBMIT
            self._submit(req, resp, request)

    def _abandon(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        """The client hung up mid-wait: cancel its task, unless an Idempotency-Key lets a retry claim it."""
        tagged = ids(task_id, key_id=key_ref(req.context.principal.owner))
        if req.get_header("Idempotency-Key"):
            log.info("client hung up waiting for task %s; kept for a retry with its Idempotency-Key", task_id,
                     extra=tagged)
        else:
            try:
                self.services.broker.request(w.CancelTask(0, task_id))
                log.info("client hung up waiting for task %s; task cancelled", task_id, extra=tagged)
            except (BrokerError, BrokerUnavailable) as exc:
                log.warning("client hung up waiting for task %s; cancelling it failed: %s", task_id, exc,
                            extra=tagged)
        resp.status = 499  # nginx's "client closed request"; nobody reads it
        resp.media = {"success": False, "error": "client closed request",
                      "detail": "the client hung up before the task ended", "task_id": task_id}

    def _submit(self, req: falcon.Request, resp: falcon.Response, request: GenerateRequest) -> None:
        self._check_loras(request)
        principal = req.context.principal
        spec = request.spec
        if not request.priority_given and spec.priority < principal.priority_floor:
            spec = msgspec.structs.replace(spec, priority=principal.priority_floor)
        if spec.priority < principal.priority_floor:
            raise ApiError(403, "priority not allowed",
                           f"priority {spec.priority} is more urgent than this key may ask for"
                           f" (its priority_floor is {principal.priority_floor}; lower numbers run first)",
                           field="priority")
        broker = self.services.broker
        is_async = self._is_async(req, request)
        names = list(request.images)
        submit = w.Submit(0, spec, principal.owner, names, watch=not is_async,
                          idempotency_key=idempotency_key(req), weight=principal.weight)
        ack: w.Ack = broker.request(submit, [request.images[n] for n in names]).header
        task_id = ack.task_id
        if ack.replayed:
            resp.set_header("Idempotent-Replayed", "true")
        if is_async:
            resp.status = 202
            resp.set_header("Location", f"/task/{task_id}")
            resp.media = {"success": True, "task_id": task_id, "status": "queued",
                          "queue_position": ack.queue_position,
                          "events_url": self.services.signer.sign(f"/task/{task_id}/events")}
            return
        future = broker.watch(task_id)
        try:
            done = wait_for_task(broker, task_id, future, self.services.config.task_timeout + 15,
                                 req.env.get(DISCONNECTED_KEY))
        except ClientGone:
            self._abandon(req, resp, task_id)
            return
        if done is None:
            resp.status = 202
            resp.media = {"success": True, "task_id": task_id, "status": "pending",
                          "detail": "still running; poll /task/{task_id}"}
            return
        task = done.header.task
        if task.status != w.COMPLETED:
            raise from_task_error(task.error_code or "", task.error or "task failed")
        send_task(resp, task, done.blobs[0] if done.blobs else None, principal, self.services.image_url(task))


def idempotency_key(req: falcon.Request) -> str | None:
    """The request's Idempotency-Key: 1-255 visible ASCII characters, or a 400."""
    key = req.get_header("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not all(33 <= ord(c) <= 126 for c in key):
        raise ApiError(400, "invalid Idempotency-Key",
                       f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} visible ASCII characters",
                       field="Idempotency-Key")
    return key


class Generate(_Submitter):
    """POST /generate with a JSON body; images as data URIs or base64."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Validate, submit, answer."""
        self._check_body_size(req)
        content_type = (req.content_type or falcon.MEDIA_JSON).split(";")[0].strip().lower()
        if content_type != falcon.MEDIA_JSON:
            raise ApiError(415, "unsupported media type",
                           "send the body as application/json (or files to POST /generate/upload)")
        body = req.get_media()
        if not isinstance(body, dict):
            raise ApiError(422, "validation error", "the request body must be a JSON object", field="body")
        images = {name: body[name] for name in IMAGE_FIELDS if body.get(name)}  # decoded if the mode needs them
        fields = {k: v for k, v in body.items() if k not in IMAGE_FIELDS}
        self.submit(req, resp, self.services.validator.validate(fields, images))


class GenerateUpload(_Submitter):
    """POST /generate/upload with multipart/form-data; images as file parts."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Read parts (bounded), validate, submit, answer."""
        self._check_body_size(req)
        if not (req.content_type or "").startswith("multipart/form-data"):
            raise ApiError(415, "unsupported media type", "use multipart/form-data (or POST /generate for JSON)")
        form: dict[str, str] = {}
        images: dict[str, bytes] = {}
        for part in req.get_media():
            if part.name in IMAGE_FIELDS:
                data = part.stream.read(MAX_IMAGE_BYTES + 1)
                if len(data) > MAX_IMAGE_BYTES:
                    raise ApiError(413, f"{part.name} is too large",
                                   f"{part.name} exceeds {MAX_IMAGE_BYTES // (1024 * 1024)} MB")
                if data:
                    images[part.name] = data
            else:  # read as UTF-8 whatever the part's Content-Type says (clients label text fields variously)
                form[part.name or ""] = form_text(part.name or "", part.stream.read(MAX_FORM_FIELD + 1))
        body: dict[str, Any] = self.services.validator.coerce_form(form)
        self.submit(req, resp, self.services.validator.validate(body, images))
