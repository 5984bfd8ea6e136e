"""This front's figures (prometheus_client): HTTP requests, latency, auth and rate-limit refusals.

GET /metrics serves them; GET /metrics/cluster serves the broker's and nodes' figures, which
the broker counts once for the whole cluster (broker/metrics.py). Both need the `metrics`
permission (or admin): a scraper's key can read figures and nothing else.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import falcon
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from genserve import wire as w
from http_front.services import Services

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
METRICS = {"GET": ("metrics",)}


class FrontMetrics:
    """One front's registry (one per app, so tests and several apps in a process stay apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("genserve_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("genserve_http_request_duration_seconds",
                                 "Seconds until the response started (a stream: until its first bytes)",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.auth_rejections = Counter("genserve_auth_rejections", "Requests refused by authentication",
                                       ["reason"], registry=self.registry)
        self.rate_limited = Counter("genserve_rate_limited", "Requests refused by a per-key rate limit",
                                    registry=self.registry)
        self._gauges: list[tuple[str, str, Callable[[], float]]] = []
        self.registry.register(_Gauges(self._gauges))

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge read when scraped (open streams, synchronous waits)."""
        self._gauges.append((name, documentation, read))

    def text(self) -> bytes:
        """Every figure in the Prometheus text format."""
        return generate_latest(self.registry)


class _Gauges:
    def __init__(self, gauges: list[tuple[str, str, Callable[[], float]]]) -> None:
        self.gauges = gauges

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        return [GaugeMetricFamily(name, documentation, value=read()) for name, documentation, read in self.gauges]


class MetricsMiddleware:
    """Counts every request by its route template (never its raw path: ids would explode the labels)."""

    def __init__(self, metrics: FrontMetrics) -> None:
        self.metrics = metrics
        # Label children looked up once: labels() takes a lock and validates on every call.
        self._counts: dict[tuple[str, str, str], Any] = {}
        self._latencies: dict[tuple[str, str], Any] = {}

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Note when the request arrived."""
        req.context.metrics_started = time.perf_counter()

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         req_succeeded: bool) -> None:
        """Count the answer and time it."""
        started = getattr(req.context, "metrics_started", None)
        route = req.uri_template or "unmatched"
        method = req.method if req.method in falcon.COMBINED_METHODS else "other"  # clients choose methods
        status = resp.status if isinstance(resp.status, int) else int(str(resp.status)[:3])
        key = (route, method, str(status))
        count = self._counts.get(key)
        if count is None:
            count = self._counts[key] = self.metrics.requests.labels(*key)
        count.inc()
        if started is not None:
            latency = self._latencies.get(key[:2])
            if latency is None:
                latency = self._latencies[key[:2]] = self.metrics.latency.labels(route, method)
            latency.observe(time.perf_counter() - started)


class Metrics:
    """GET /metrics: this front's figures."""

    auth = METRICS

    def __init__(self, metrics: FrontMetrics) -> None:
        self.metrics = metrics

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Prometheus text."""
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = self.metrics.text()


class ClusterMetrics:
    """GET /metrics/cluster: the broker's and nodes' figures, the same on every front."""

    auth = METRICS

    def __init__(self, services: Services) -> None:
        self.services = services

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Prometheus text, as the broker wrote it."""
        msg = self.services.broker.request(w.MetricsRequest(0))
        resp.content_type = msg.header.body.content_type
        resp.data = msg.blobs[0] if msg.blobs else b""
