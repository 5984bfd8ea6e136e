"""create_app: the Falcon application from injected parts."""

from __future__ import annotations

import secrets

import falcon
from falcon.media import JSONHandler

from http_front import errors
from http_front.auth import AuthMiddleware
from http_front.broker_client import BrokerClient
from http_front.config import FrontConfig
from http_front.errors import ApiError
from http_front.events import EventHub, StreamSlots
from http_front.jsonout import dumps
from http_front.keys import KeyStore
from http_front.leases import LeasedLimiter, broker_lease
from http_front.metrics import ClusterMetrics, FrontMetrics, Metrics, MetricsMiddleware
from http_front.openapi import build_document
from http_front.ratelimit import SlidingWindowLimiter
from http_front.resources import keys_admin
from http_front.resources.docs import DocsPage, OpenApiDocument
from http_front.resources.events import TaskEvents
from http_front.resources.generate import Generate, GenerateUpload
from http_front.resources.info import Health, Loras, Models, Root, Status
from http_front.resources.tasks import Task, TaskImage, Tasks
from http_front.resources.ui import UiAsset, UiPage
from http_front.services import Services
from http_front.signing import UrlSigner
from http_front.validation import RequestValidator
from http_front.waits import SyncWaits


HEADER_BYTES = "genserve.header_bytes"  # http_front.server.HEADER_BYTES (waitress); absent elsewhere


class HeaderLimit:
    """Answers 431 in the JSON error shape when the header fields exceed `limit` bytes.

    Waitress's own limit (set above this one by http_front.server) would answer first
    otherwise, in plain text.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Runs before routing and authentication."""
        received = req.env.get(HEADER_BYTES)
        if received is not None and received <= self.limit:
            return  # the raw header (request line included) is never smaller than the count below
        # "Name: value\r\n" per field; WSGI names them HTTP_*, except these two.
        size = sum(len(k) - 1 + len(v) for k, v in req.env.items()
                   if k.startswith("HTTP_") or k in ("CONTENT_TYPE", "CONTENT_LENGTH"))
        if size > self.limit:
            raise ApiError(431, "request header fields too large",
                           f"the header fields exceed {self.limit // 1024} KB")


def create_app(broker: BrokerClient, keys: KeyStore, config: FrontConfig | None = None,
               limiter: SlidingWindowLimiter | None = None,
               failures: SlidingWindowLimiter | None = None) -> falcon.App:
    """Build the app; nothing here reads the environment or opens sockets."""
    config = config or FrontConfig()
    if limiter is None:
        local = SlidingWindowLimiter(config.rate_limit, config.rate_window)
        # With a broker, the limit holds per key across every front (tokens leased in batches).
        limiter = local if broker is None else LeasedLimiter(broker_lease(broker), config.rate_limit,
                                                             config.rate_window, local)
    failures = failures or SlidingWindowLimiter(config.auth_failure_limit, config.auth_failure_window)
    signer = UrlSigner(config.url_secret or secrets.token_bytes(32), config.url_ttl)
    services = Services(broker, config, RequestValidator(config.max_prompt_length, config.max_image_size), signer)
    metrics = FrontMetrics()
    app = falcon.App(middleware=[MetricsMiddleware(metrics), HeaderLimit(config.max_header_bytes),
                                 AuthMiddleware(keys, limiter, failures, config.default_key_remote,
                                                signer=signer, metrics=metrics)])
    app.resp_options.media_handlers[falcon.MEDIA_JSON] = JSONHandler(dumps=dumps)
    errors.install(app)
    app.add_route("/", Root(services))
    app.add_route("/health", Health(services))
    app.add_route("/status", Status(services))
    app.add_route("/models", Models(services))
    app.add_route("/loras", Loras(services))
    waits = SyncWaits(config.max_sync_waits, config.max_sync_waits_per_key)  # shared by both endpoints
    app.add_route("/generate", Generate(services, waits))
    app.add_route("/generate/upload", GenerateUpload(services, waits))
    app.add_route("/task/{task_id}", Task(services))
    app.add_route("/task/{task_id}/image", TaskImage(services))
    slots = StreamSlots(config.max_streams, config.max_streams_per_key)
    app.add_route("/task/{task_id}/events", TaskEvents(services, EventHub(broker), slots))
    app.add_route("/tasks", Tasks(services))
    app.add_route("/metrics", Metrics(metrics))
    app.add_route("/metrics/cluster", ClusterMetrics(services))
    metrics.gauge("genserve_event_streams", "Event streams open on this front", lambda: slots.in_use)
    metrics.gauge("genserve_sync_waits", "Synchronous /generate requests waiting on this front",
                  lambda: waits.in_use)
    keys_admin.install(app, keys)
    document = OpenApiDocument()  # public, like /docs: see http_front.auth
    app.add_route("/openapi.json", document)
    app.add_route("/docs", DocsPage())
    app.add_route("/ui", UiPage())  # public page and assets: see http_front.resources.ui
    app.add_route("/ui/{name}", UiAsset())
    document.set_document(build_document(app, config, services.version))
    return app
