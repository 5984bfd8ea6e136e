"""Read-only service information: /, /health, /status, /models, /loras."""

from __future__ import annotations

import falcon

from genserve.catalog import CONTROL_TYPES, DEFAULT_MODE, MODEL_IDS, default_model
from http_front.auth import SUPER
from http_front.broker_client import BrokerUnavailable
from http_front.services import Services, builtins

READ = {"GET": ("readonly",)}


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

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """200 healthy / 503 unhealthy with the reason."""
        try:
            info = self.services.info(max_age=1.0, timeout=1.0)
        except BrokerUnavailable:
            resp.status = 503
            resp.media = {"status": "unhealthy", "broker": "unreachable", "nodes": 0,
                          "reason": "the broker does not answer"}
            return
        nodes = len(info.nodes)
        healthy = nodes > 0
        resp.status = 200 if healthy else 503
        resp.media = {"status": "healthy" if healthy else "unhealthy", "broker": "ok", "nodes": nodes,
                      "queue_length": info.queue.length,
                      "reason": None if healthy else "no GPU node is registered"}


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

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Served models and where they are loaded."""
        served = self.services.info().models
        models = [{"model_id": m, "modes": served[m].modes, "controlnet_type": CONTROL_TYPES.get(m),
                   "nodes": served[m].nodes, "loaded_on": served[m].loaded_on,
                   "loaded": bool(served[m].loaded_on)} for m in MODEL_IDS if m in served]
        resp.media = {"success": True, "models": models, "total": len(models),
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
