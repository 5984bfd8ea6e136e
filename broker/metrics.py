"""The cluster's figures (broker and nodes), counted once, in the broker, with prometheus_client.

Every front serves these same figures at GET /metrics/cluster (the broker's text, fetched
with METRICS), and its own HTTP figures at GET /metrics. So however many fronts run, the
cluster is counted once: scrape /metrics/cluster from one front (or through the load
balancer: every front answers the same), and /metrics from every front.

Counters and histograms are updated by the broker thread as tasks move; gauges (queue
depth, nodes by state, per-node totals the nodes report in their heartbeats, webhook
deliveries) are read from the broker's state when scraped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from broker.nodes import BUSY
from broker.tasks import Task

if TYPE_CHECKING:
    from broker.server import Broker

WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class BrokerMetrics:
    """The broker's registry: task counters and timing histograms, plus a collector of its state."""

    def __init__(self, broker: Broker) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tasks = Counter("genserve_tasks", "Tasks by event (submitted, completed, failed, cancelled)",
                             ["event", "model", "mode"], registry=self.registry)
        self.queue_wait = Histogram("genserve_queue_wait_seconds", "Seconds from acceptance to the first start",
                                    ["model"], buckets=WAIT_BUCKETS, registry=self.registry)
        self.generation = Histogram("genserve_generation_seconds", "Seconds a node spent making an image",
                                    ["model", "mode"], buckets=GENERATION_BUCKETS, registry=self.registry)
        self.registry.register(_StateCollector(broker))

    def submitted(self, task: Task) -> None:
        """A task was accepted."""
        self.tasks.labels("submitted", task.model, task.mode).inc()

    def started(self, task: Task) -> None:
        """A task started on a node; its first start gives its queue wait."""
        if not task.waited and task.started is not None:
            task.waited = True
            self.queue_wait.labels(task.model).observe(max(0.0, task.started - task.created))

    def ended(self, task: Task) -> None:
        """A task completed, failed or was cancelled."""
        self.tasks.labels(task.state, task.model, task.mode).inc()
        if task.meta is not None and task.state == "completed":
            self.generation.labels(task.model, task.mode).observe(task.meta.generation_time)

    def text(self) -> bytes:
        """Every figure in the Prometheus text format."""
        return generate_latest(self.registry)


class _StateCollector:
    """Gauges and node totals read from the broker's state at scrape time (broker thread)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def describe(self) -> list[Metric]:
        """No fixed description: the families depend on the nodes and models present."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The families, built from the queue, the node registry and the webhook outbox."""
        broker = self.broker
        depth = GaugeMetricFamily("genserve_queue_depth", "Queued tasks by model and priority",
                                  labels=["model", "priority"])
        for (model, priority), count in sorted(broker.queue.depths().items()):
            depth.add_metric([model, str(priority)], count)
        yield depth
        states = {"idle": 0, "busy": 0, "draining": 0, "leaving": 0}
        for node in broker.nodes:
            state = "leaving" if node.leaving else "draining" if node.draining else \
                "busy" if node.state == BUSY else "idle"
            states[state] += 1
        nodes = GaugeMetricFamily("genserve_nodes", "Registered nodes by state", labels=["state"])
        for state, count in states.items():
            nodes.add_metric([state], count)
        yield nodes
        families = {
            "busy": CounterMetricFamily("genserve_node_busy_seconds", "Seconds inside pipeline calls",
                                        labels=["node"]),
            "jobs": CounterMetricFamily("genserve_node_jobs", "Jobs run (one given up before its first step is not)",
                                        labels=["node"]),
            "loads": CounterMetricFamily("genserve_node_model_loads", "Pipelines loaded", labels=["node"]),
            "load_seconds": CounterMetricFamily("genserve_node_model_load_seconds", "Seconds spent loading",
                                                labels=["node"]),
            "evictions": CounterMetricFamily("genserve_node_cache_evictions", "Pipelines evicted",
                                             labels=["node"]),
        }
        for node in broker.nodes:
            stats = node.stats
            if stats is None:
                continue
            families["busy"].add_metric([node.node_id], stats.busy_seconds)
            families["jobs"].add_metric([node.node_id], stats.jobs)
            families["loads"].add_metric([node.node_id], stats.model_loads)
            families["load_seconds"].add_metric([node.node_id], stats.load_seconds)
            families["evictions"].add_metric([node.node_id], stats.evictions)
        yield from families.values()
        pending, ended = broker.outbox.counts()
        yield GaugeMetricFamily("genserve_webhook_pending", "Webhook deliveries waiting to be made", value=pending)
        outcomes = CounterMetricFamily("genserve_webhook_deliveries", "Webhook deliveries ended since the"
                                       " broker started, by outcome", labels=["state"])
        for state, count in sorted(ended.items()):
            outcomes.add_metric([state], count)
        yield outcomes
        yield GaugeMetricFamily("genserve_event_subscriptions", "Tasks some front streams events of",
                                value=len(broker.subs))
