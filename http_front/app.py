"""create_app: the Falcon application from injected parts."""

from __future__ import annotations

import falcon

from http_front import errors
from http_front.auth import AuthMiddleware
from http_front.broker_client import BrokerClient
from http_front.config import FrontConfig
from http_front.keys import KeyStore
from http_front.ratelimit import SlidingWindowLimiter
from http_front.resources import keys_admin
from http_front.resources.generate import Generate, GenerateUpload
from http_front.resources.info import Health, Loras, Models, Root, Status
from http_front.resources.tasks import Task
from http_front.services import Services
from http_front.validation import RequestValidator


def create_app(broker: BrokerClient, keys: KeyStore, config: FrontConfig | None = None,
               limiter: SlidingWindowLimiter | None = None,
               failures: SlidingWindowLimiter | None = None) -> falcon.App:
    """Build the app; nothing here reads the environment or opens sockets."""
    config = config or FrontConfig()
    limiter = limiter or SlidingWindowLimiter(config.rate_limit, config.rate_window)
    failures = failures or SlidingWindowLimiter(config.auth_failure_limit, config.auth_failure_window)
    services = Services(broker, config, RequestValidator(config.max_prompt_length, config.max_image_size))
    app = falcon.App(middleware=[AuthMiddleware(keys, limiter, failures, config.default_key_remote)])
    errors.install(app)
    app.add_route("/", Root(services))
    app.add_route("/health", Health(services))
    app.add_route("/status", Status(services))
    app.add_route("/models", Models(services))
    app.add_route("/loras", Loras(services))
    app.add_route("/generate", Generate(services))
    app.add_route("/generate/upload", GenerateUpload(services))
    app.add_route("/task/{task_id}", Task(services))
    keys_admin.install(app, keys)
    return app
