"""Read-only service information: /, /health, /status, /models, /loras."""

from __future__ import annotations

from typing import Any, Callable

import falcon

from genserve import wire as w
from genserve.catalog import CONTROL_TYPES, DEFAULT_MODE, MODEL_IDS, default_model
from http_front.auth import SUPER
from http_front.broker_client import BrokerUnavailable
from http_front.jsonout import dumps
from http_front.services import Services, builtins

READ = {"GET": ("readonly",)}


class PerSnapshot:
    """A JSON body rendered from one INFO snapshot, reused for as long as that snapshot is served.

    The front serves one snapshot for up to a second, so at load most calls reuse the bytes
    instead of building and encoding the same body again.
    """

    def __init__(self, render: Callable[[w.InfoBody], dict[str, Any]]) -> None:
        self.render = render
        self._last: tuple[w.InfoBody, bytes] | None = None

    def __call__(self, info: w.InfoBody) -> bytes:
        """The body for `info` (thread-safe: a race renders twice, both right)."""
        last = self._last
        if last is None or last[0] is not info:
            last = self._last = (info, dumps(self.render(info)))
        return last[1]


class Root:
    """GET / : what this service is and where to go next."""

    auth = READ

    def __init__(self, services: Services) -> None:
        self.services = services

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Service banner."""
        resp.media = {"service": "GenServe", "version": self.services.version, "status": "running",
                      "endpoints": ["/health", "/status", "/models", "/loras", "/generate",
                                    "/generate/upload", "/task/{task_id}", "/task/{task_id}/events",
                                    "/task/{task_id}/image", "/tasks", "/auth/keys", "/metrics",
                                    "/metrics/cluster", "/openapi.json", "/docs", "/ui"]}


class Health:
    """GET /health : healthy only when the broker answers and a node is registered (as of about 1 s ago)."""

    auth = READ

    def __init__(self, services: Services) -> None:
        self.services = services
        self._body = PerSnapshot(self.render)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """200 healthy / 503 unhealthy with the reason."""
        try:
            info = self.services.info(max_age=1.0, timeout=1.0)
        except BrokerUnavailable:
            resp.status = 503
            resp.media = {"status": "unhealthy", "broker": "unreachable", "nodes": 0,
                          "reason": "the broker does not answer"}
            return
        resp.status = 200 if info.nodes else 503
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._body(info)

    @staticmethod
    def render(info: w.InfoBody) -> dict[str, Any]:
        """The body for a snapshot the broker answered."""
        healthy = len(info.nodes) > 0
        return {"status": "healthy" if healthy else "unhealthy", "broker": "ok", "nodes": len(info.nodes),
                "queue_length": info.queue.length, "reason": None if healthy else "no GPU node is registered"}


class Status:
    """GET /status : queue, nodes and task counts."""

    auth = READ

    def __init__(self, services: Services) -> None:
        self.services = services

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Broker snapshot; task ids only for admin keys (others' ids would let a key probe them)."""
        info = self.services.info(max_age=0)
        nodes = builtins(info.nodes)
        if not set(req.context.principal.permissions) & SUPER:
            nodes = [{**n, "task_id": None} for n in nodes]
        resp.media = {"success": True, "status": "running", "queue": builtins(info.queue), "tasks": info.tasks,
                      "nodes": nodes, "node_count": len(nodes),
                      "busy_nodes": sum(1 for n in nodes if n["state"] == "busy")}


class Models:
    """GET /models : model ids served by live nodes, with their real modes."""

    auth = READ

    def __init__(self, services: Services) -> None:
        self.services = services
        self._body = PerSnapshot(self.render)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Served models and where they are loaded."""
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._body(self.services.info())

    @staticmethod
    def render(info: w.InfoBody) -> dict[str, Any]:
        """The body for a snapshot."""
        served = info.models
        models = [{"model_id": m, "modes": served[m].modes, "controlnet_type": CONTROL_TYPES.get(m),
                   "nodes": served[m].nodes, "loaded_on": served[m].loaded_on,
                   "loaded": bool(served[m].loaded_on)} for m in MODEL_IDS if m in served]
        return {"success": True, "models": models, "total": len(models),
                "known_model_ids": list(MODEL_IDS), "default_model": default_model(DEFAULT_MODE)}


class Loras:
    """GET /loras : LoRA files the nodes can load (relative names only)."""

    auth = READ

    def __init__(self, services: Services) -> None:
        self.services = services

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Union of the nodes' LoRA folders, sorted by name."""
        loras = builtins(self.services.loras())
        resp.media = {"success": True, "loras": loras, "total": len(loras)}
