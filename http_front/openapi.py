"""The front's OpenAPI 3.1 document, generated from the app's routes and http_front.schemas.

The operations skeleton (summaries, which statuses each can answer) is the table below;
every schema comes from a msgspec type through ``msgspec.json.schema_components``, and each
operation's permissions come from its resource's ``auth`` declaration (http_front.auth), so
neither can drift from what the front does. tests/test_openapi.py checks that every route
the app serves is described, and tests/test_fuzz.py that responses match their schemas.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import falcon
import msgspec

from genserve.catalog import IMAGE_FIELDS, OUTPUT_FORMATS
from http_front.auth import SUPER, is_public
from http_front.config import FrontConfig
from http_front.schemas import REQUEST_TYPES, RESPONSE_TYPES, generate_body_type

log = logging.getLogger(__name__)

REF = "#/components/schemas/{name}"
SECURITY = [{"bearerAuth": []}, {"apiKeyAuth": []}]
SECURITY_SCHEMES = {
    "bearerAuth": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer KEY` (preferred)"},
    "apiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "`X-API-Key: KEY`"},
}
DESCRIPTION = """Flux image generation behind one authenticated REST API.

Every endpoint needs an API key, sent as `Authorization: Bearer KEY` or `X-API-Key: KEY`,
except this description itself (`GET /openapi.json`, `GET /docs`) and the web page
(`GET /ui`), which are public. Each operation lists the permissions that grant it in
`x-permissions`; `admin` and `all` grant everything. Errors have two shapes: `AuthErrorBody` (`{"detail"}`: 401, 403 and per-key
429s) and `ErrorBody` (`{"success": false, "error", "detail", ...}`: everything else).
Every answer, errors included, is JSON, except the pages (/docs, /ui and its files), the
images, the event streams and the Prometheus text at /metrics."""

# Error statuses: what they mean and which body shapes they carry.
ERRORS: dict[int, tuple[str, tuple[str, ...]]] = {
    400: (("malformed request: bad JSON, a missing or bad image, an unknown model_id or LoRA, "
           "a malformed Idempotency-Key"), ("ErrorBody",)),
    401: ("no API key, or an unknown one", ("AuthErrorBody",)),
    403: ("the key lacks the permission, or is the default key used from a remote address", ("AuthErrorBody",)),
    404: ("not found (or not this key's)", ("ErrorBody",)),
    409: ("conflict with the current state", ("ErrorBody",)),
    410: ("gone: the image was removed (result retention or disk budget)", ("ErrorBody",)),
    413: ("body over 48 MB or an image over 10 MB", ("ErrorBody",)),
    415: ("unsupported Content-Type", ("ErrorBody",)),
    422: ("a field of the wrong type or out of range, or fields that do not fit together", ("ErrorBody",)),
    429: ("rate limit, failed-authentication throttle, synchronous wait cap or full queue; see Retry-After",
          ("ErrorBody", "AuthErrorBody")),
    431: ("request header fields too large", ("ErrorBody",)),
    500: ("generation failed, key file error, or an unexpected error (see the front's log)", ("ErrorBody",)),
    502: ("the broker answered with an error the front does not know", ("ErrorBody",)),
    503: ("the broker is unreachable, no live node serves the model, or result storage is full",
          ("ErrorBody",)),
    504: ("the task did not finish within the task timeout", ("ErrorBody",)),
}
AUTHENTICATED = (401, 403, 429)
ALWAYS = (431, 500)
BROKER = (502, 503)
RETRY_AFTER = {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "makes a retry safe: a retry with the same key and body returns the original task",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
}
PREFER = {"name": "Prefer", "in": "header", "required": False,
          "description": "`respond-async`: the same as `\"async\": true`",
          "schema": {"type": "string", "examples": ["respond-async"]}}
TASK_ID = {"name": "task_id", "in": "path", "required": True, "description": "as returned by /generate",
           "schema": {"type": "string", "minLength": 1}}
SIGNED = (
    {"name": "expires", "in": "query", "required": False,
     "description": "from image_url or events_url: the Unix time it expires",
     "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"}},
    {"name": "sig", "in": "query", "required": False, "description": "from image_url or events_url: its signature",
     "schema": {"type": "string"}},
)
# One event of a text/event-stream (OpenAPI before 3.2: `schema` describes each event).
SSE_EVENT = {
    "type": "object", "description": "one event: its id, kind and one JSON object as data",
    "properties": {
        "event": {"enum": ["snapshot", "position", "running", "progress", "completed", "failed", "cancelled"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "retry": {"type": "integer", "description": "milliseconds before a reconnect"},
    },
}
LAST_EVENT_ID = {"name": "Last-Event-ID", "in": "header", "required": False,
                 "description": "the id of the last event received, to resume a dropped stream",
                 "schema": {"type": "string", "pattern": "^[0-9]{1,20}$"}}
LIST_PARAMS = (
    {"name": "status", "in": "query", "required": False, "description": "only tasks in this state",
     "schema": {"enum": ["queued", "running", "completed", "failed", "cancelled"]}},
    {"name": "limit", "in": "query", "required": False, "description": "tasks per page (default 20)",
     "schema": {"type": "string", "pattern": "^[0-9]+$"}},
    {"name": "cursor", "in": "query", "required": False, "description": "next_cursor of the previous page",
     "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"}},
)
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded", "application/json")


@dataclass(frozen=True)
class Op:
    """One operation of the skeleton: its words, answers and inputs (schemas by component name)."""

    operation_id: str
    summary: str
    tag: str
    ok: dict[int, tuple[str, str]]  # status -> (description, component)
    errors: tuple[int, ...] = ()
    body: dict[str, str] = field(default_factory=dict)  # media type -> component
    parameters: tuple[dict[str, Any], ...] = ()
    also: dict[int, tuple[str, ...]] = field(default_factory=dict)  # extra shapes for an error status
    description: str = ""


_GENERATE_ERRORS = (400, 404, 409, 413, 415, 422, 504, *BROKER)
_GENERATE_OK = {200: ("the completed task, with its image (synchronous)", "TaskBody"),
                202: (("accepted: poll /task/{task_id} (asynchronous, or a synchronous wait that outlived "
                       "the task timeout)"), "AcceptedBody")}
_KEY_FORM = (400, 404, 409, 415, 422)
_DELETE_NOTE = "403 also when the key comes from the environment (ErrorBody)"

OPERATIONS: dict[tuple[str, str], Op] = {
    ("GET", "/"): Op("getRoot", "Service name, version and main paths", "info", {200: ("service", "RootBody")}),
    ("GET", "/health"): Op("getHealth", "Healthy when the broker answers and a node is registered", "info",
                           {200: ("healthy", "HealthBody"), 503: ("unhealthy, with the reason", "HealthBody")},
                           (502,)),
    ("GET", "/status"): Op("getStatus", "Queue, task counts and nodes", "info",
                           {200: ("status", "StatusBody")}, BROKER),
    ("GET", "/models"): Op("getModels", "Models live nodes serve, with their modes", "info",
                           {200: ("models", "ModelsBody")}, BROKER),
    ("GET", "/loras"): Op("getLoras", "LoRA files the nodes can load", "info",
                          {200: ("LoRAs", "LorasBody")}, BROKER),
    ("POST", "/generate"): Op(
        "generate", "Generate one image from a JSON body (images inline as base64)", "generation",
        _GENERATE_OK, _GENERATE_ERRORS, {"application/json": "GenerateRequest"}, (IDEMPOTENCY_KEY, PREFER),
        description="A mode without an image it needs is a 400 naming the field; schema and range "
                    "violations are 422. Without model_id, the mode's default model runs."),
    ("POST", "/generate/upload"): Op(
        "generateUpload", "Generate one image from a multipart form (images as file parts)", "generation",
        _GENERATE_OK, _GENERATE_ERRORS, {"multipart/form-data": "GenerateUploadForm"},
        (IDEMPOTENCY_KEY, PREFER),
        description="Numbers are plain ASCII decimals; `loras` is the JSON array as text; an empty file "
                    "part counts as absent. Another Content-Type is a 415."),
    ("GET", "/task/{task_id}"): Op("getTask", "A task's state, progress and, once completed, its image",
                                   "tasks", {200: ("the task", "TaskBody")}, (404, *BROKER), parameters=(TASK_ID,)),
    ("DELETE", "/task/{task_id}"): Op("cancelTask", "Cancel a task (409 once it has finished)", "tasks",
                                      {200: ("cancelled", "CancelledBody")}, (404, 409, *BROKER),
                                      parameters=(TASK_ID,)),
    ("GET", "/task/{task_id}/image"): Op(
        "getTaskImage", "A completed task's image as a file", "tasks",
        {200: ("the image (image/png, image/jpeg or image/webp, as requested)", "")},
        errors=(404, 409, 410, *BROKER), parameters=(TASK_ID, *SIGNED),
        description=("Instead of a key, the signed `expires` and `sig` of the task body's `image_url` may be "
                     "sent (for an `<img src>`). Sends ETag and Cache-Control; 304 for a matching If-None-Match.")),
    ("GET", "/task/{task_id}/events"): Op(
        "getTaskEvents", "A task's progress as Server-Sent Events (text/event-stream)", "tasks",
        {200: ("an event stream: snapshot, position, running, progress, then completed, failed or cancelled",
               ""),
         204: ("the task has ended and the request carried Last-Event-ID: a browser's EventSource stops "
               "reconnecting", "")},
        errors=(400, 404, *BROKER), parameters=(TASK_ID, *SIGNED, LAST_EVENT_ID),
        description=("Starts with a `snapshot` event (the task body without its image), then sends `position` "
                     "(queue_position changed), `running` (node_id), `progress` (step, total), and ends with "
                     "one `completed`, `failed` or `cancelled` event carrying the task body and its signed "
                     "`image_url`. An ended task gets only its final event. Each `data:` is one JSON object; "
                     "ids come from the broker, so `Last-Event-ID` resumes on any front (with a fresh "
                     "snapshot). Comment lines keep idle streams open. Instead of a key, the signed `expires` "
                     "and `sig` of the task body's `events_url` may be sent (for a browser's EventSource). "
                     "429 past the open-stream caps (poll /task/{task_id} instead).")),
    ("GET", "/tasks"): Op(
        "listTasks", "The caller's tasks, newest first (every key's for admin keys), without images", "tasks",
        {200: ("one page; next_cursor fetches the next", "TaskListBody")},
        errors=(422, *BROKER), parameters=LIST_PARAMS),
    ("GET", "/auth/keys"): Op("listKeys", "Every API key (previews only)", "keys", {200: ("keys", "KeysBody")}),
    ("POST", "/auth/generate-key"): Op("generateKey", "Create an API key, shown once", "keys",
                                       {201: ("created", "NewKeyBody")}, _KEY_FORM,
                                       dict.fromkeys(FORM_TYPES, "NewKeyRequest")),
    ("POST", "/auth/update-key"): Op("updateKey", "Change a file key's fair-share weight and priority floor",
                                     "keys", {200: ("changed", "UpdateKeyBody")}, _KEY_FORM,
                                     dict.fromkeys(FORM_TYPES, "UpdateKeyRequest"), also={403: ("ErrorBody",)},
                                     description="403 also when the key comes from the environment (ErrorBody)"),
    ("POST", "/auth/delete-key"): Op("deleteKey", "Delete a key, given the whole key", "keys",
                                     {200: ("deleted", "DeletedBody")}, _KEY_FORM,
                                     dict.fromkeys(FORM_TYPES, "DeleteKeyRequest"), also={403: ("ErrorBody",)},
                                     description=_DELETE_NOTE),
    ("POST", "/auth/delete-key-by-id"): Op("deleteKeyById", "Delete a key, given its key_id (409 if ambiguous)",
                                           "keys", {200: ("deleted", "DeletedBody")}, _KEY_FORM,
                                           dict.fromkeys(FORM_TYPES, "DeleteKeyByIdRequest"),
                                           also={403: ("ErrorBody",)}, description=_DELETE_NOTE),
    ("POST", "/auth/delete-key-by-name"): Op("deleteKeyByName", "Delete every file key with a name", "keys",
                                             {200: ("deleted", "DeletedBody")}, _KEY_FORM,
                                             dict.fromkeys(FORM_TYPES, "DeleteKeyByNameRequest"),
                                             also={403: ("ErrorBody",)}, description=_DELETE_NOTE),
    ("POST", "/auth/reload-keys"): Op("reloadKeys", "Re-read the key file", "keys",
                                      {200: ("reloaded", "ReloadBody")}),
    ("GET", "/metrics"): Op(
        "getMetrics", "This front's figures in the Prometheus text format", "operate",
        {200: ("Prometheus text: HTTP requests by route and status, latency, auth and rate-limit refusals", "")},
        description="Scrape every front. A key with only the `metrics` permission can read figures and nothing "
                    "else."),
    ("GET", "/metrics/cluster"): Op(
        "getClusterMetrics", "The broker's and nodes' figures in the Prometheus text format", "operate",
        {200: ("Prometheus text: tasks by model and mode, queue depth, waits, generation times, nodes", "")},
        errors=BROKER,
        description="Counted once by the broker and the same on every front: scrape it from one front only."),
    ("GET", "/ui"): Op("getUi", "The web page for generating images (public; the key is typed in the page)",
                       "docs", {200: ("an HTML page", "")}),
    ("GET", "/ui/{name}"): Op("getUiAsset", "The web page's script and style (public)", "docs",
                              {200: ("a JavaScript or CSS file", "")}, errors=(404,),
                              parameters=({"name": "name", "in": "path", "required": True,
                                           "schema": {"enum": ["ui.js", "ui.css"]}},)),
    ("GET", "/openapi.json"): Op("getOpenApi", "This document (public)", "docs",
                                 {200: ("the OpenAPI 3.1 document", "")}),
    ("GET", "/docs"): Op("getDocs", "This document as a self-contained HTML page (public)", "docs",
                         {200: ("an HTML page", "")}),
}


def routes(app: falcon.App) -> Iterator[tuple[str, str, object]]:
    """(METHOD, path template, resource) for every responder the app's resources define.

    Walks Falcon's compiled router (a private attribute, stable since Falcon 2) and leaves out
    the responders Falcon adds itself (405, OPTIONS).
    """
    stack = list(app._router._roots)
    while stack:
        node = stack.pop()
        if node.resource is not None:
            for method, responder in node.method_map.items():
                if getattr(responder, "__self__", None) is node.resource:
                    yield method, node.uri_template, node.resource
        stack.extend(node.children)


def permissions(resource: object, method: str) -> list[str]:
    """The permissions any one of which grants `method` on `resource` (none for public ones)."""
    if is_public(resource):
        return []
    needed = (getattr(resource, "auth", None) or {}).get(method, ())
    return [*needed, *sorted(SUPER - set(needed))]


def _content(*components: str) -> dict[str, Any]:
    refs = [{"$ref": REF.format(name=c)} for c in components]
    return {"application/json": {"schema": refs[0] if len(refs) == 1 else {"anyOf": refs}}}


def _response(status: int, description: str, component: str) -> dict[str, Any]:
    if status == 204:
        return {"description": description}
    if status == 200 and component == "" and description.startswith("the image"):
        binary = {"schema": {"type": "string", "format": "binary"}}
        return {"description": description, "content": {m: binary for m in OUTPUT_FORMATS.values()},
                "headers": {"ETag": {"schema": {"type": "string"}}, "Cache-Control": {"schema": {"type": "string"}}}}
    if status == 200 and component == "" and description.startswith("Prometheus text"):
        return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}
    if status == 200 and component == "" and description.startswith("a JavaScript or CSS"):
        return {"description": description, "content": {m: {"schema": {"type": "string"}}
                                                        for m in ("text/javascript", "text/css")}}
    if status == 200 and component == "" and description.startswith("an event stream"):
        return {"description": description, "content": {"text/event-stream": {"schema": SSE_EVENT}}}
    if status == 200 and component == "":
        media = "text/html" if description.startswith("an HTML") else "application/json"
        schema = {"type": "string"} if media == "text/html" else {"type": "object"}
        return {"description": description, "content": {media: {"schema": schema}}}
    out: dict[str, Any] = {"description": description, "content": _content(component)}
    if status == 202:
        out["headers"] = {"Location": {"description": "/task/{task_id}", "schema": {"type": "string"}}}
    return out


def operation(method: str, path: str, resource: object, op: Op) -> dict[str, Any]:
    """The OpenAPI operation object for one route."""
    granted = permissions(resource, method)
    public = is_public(resource)
    statuses = (*op.errors, *ALWAYS) if public else (*op.errors, *AUTHENTICATED, *ALWAYS)
    responses = {str(s): _response(s, *answer) for s, answer in op.ok.items()}
    for status in sorted(set(statuses) - set(op.ok)):
        description, shapes = ERRORS[status]
        entry: dict[str, Any] = {"description": description, "content": _content(*shapes, *op.also.get(status, ()))}
        if status in (429, 503):
            entry["headers"] = {"Retry-After": RETRY_AFTER}
        if status == 401:
            entry["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        responses[str(status)] = entry
    access = "Public: no API key needed." if public else \
        f"Permission: {' or '.join(f'`{p}`' for p in granted)}."
    out: dict[str, Any] = {
        "operationId": op.operation_id, "summary": op.summary, "tags": [op.tag],
        "description": f"{access} {op.description}".strip(),
        "security": [] if public else SECURITY, "x-permissions": granted, "responses": responses,
    }
    if op.parameters:
        out["parameters"] = list(op.parameters)
    if op.body:
        out["requestBody"] = {"required": True, "content": {
            media: {"schema": {"$ref": REF.format(name=name)}} for media, name in op.body.items()}}
        if "multipart/form-data" in op.body and op.body["multipart/form-data"] == "GenerateUploadForm":
            out["requestBody"]["content"]["multipart/form-data"]["encoding"] = {
                name: {"contentType": "image/png, image/jpeg, image/webp"} for name in IMAGE_FIELDS}
    return out


def upload_form(body: dict[str, Any]) -> dict[str, Any]:
    """The multipart form of POST /generate/upload, from the JSON body's schema."""
    props = dict(body["properties"])
    props["loras"] = {"type": "string", "contentMediaType": "application/json",
                      "description": "the loras array as JSON text: "
                                     "[{\"name\": \"cute_cat_lora\", \"weight\": 0.8}]"}
    for name in IMAGE_FIELDS:
        props[name] = {"type": "string", "format": "binary",
                       "description": props[name].get("description", "").replace(
                           "a data URI (data:image/png;base64,...) or bare base64 of ", "")}
    return {**body, "title": "GenerateUploadForm", "properties": props,
            "description": "A generation request as form fields; images are file parts.",
            "examples": [{"prompt": "a cat in a garden", "width": 64, "height": 64, "num_inference_steps": 2}]}


def build_document(app: falcon.App, config: FrontConfig, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document for `app` (call once every route is added)."""
    body = generate_body_type(config.max_prompt_length, config.max_image_size)
    _, schemas = msgspec.json.schema_components([body, *REQUEST_TYPES, *RESPONSE_TYPES], ref_template=REF)
    schemas["GenerateUploadForm"] = upload_form(schemas["GenerateRequest"])
    paths: dict[str, dict[str, Any]] = {}
    for method, path, resource in sorted(routes(app), key=lambda r: (r[1], r[0])):
        op = OPERATIONS.get((method, path))
        if op is None:
            log.warning("%s %s has no entry in http_front.openapi.OPERATIONS: described minimally", method, path)
            op = Op(f"{method.lower()}{path.replace('/', '_')}", f"{method} {path}", "other", {})
        paths.setdefault(path, {})[method.lower()] = operation(method, path, resource, op)
    return {
        "openapi": "3.1.0",
        "info": {"title": "GenServe API", "version": version,
                 "description": DESCRIPTION},
        "tags": [{"name": t} for t in ("info", "generation", "tasks", "keys", "operate", "docs")],
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": SECURITY_SCHEMES},
        "security": SECURITY,
    }
