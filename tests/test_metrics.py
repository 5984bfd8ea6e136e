"""Metrics through the Falcon TestClient on a real broker and tiny-model node: the front's own
figures, the cluster's (counted once by the broker), and the `metrics` permission."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from falcon import testing
from prometheus_client.parser import text_string_to_metric_families

from http_front.app import create_app
from http_front.config import FrontConfig
from http_front.keys import KeyStore
from tests.conftest import Stack, wait_until

KEYS = {"gen": "gen-key-0123456789abcdefghij", "scraper": "scrape-key-0123456789abcdefgh",
        "root": "root-key-0123456789abcdefghij", "limited": "limited-key-0123456789abcdefg"}
QUICK = {"prompt": "a dial", "width": 64, "height": 64, "num_inference_steps": 2}


def as_(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Stack]:
    keys = KeyStore.from_env([(KEYS["gen"], "gen", ("generation", "readonly")),
                              (KEYS["scraper"], "scraper", ("metrics",)), (KEYS["root"], "root", ("admin",)),
                              (KEYS["limited"], "limited", ("generation", "readonly"))], None)
    s = Stack(tmp_path_factory.mktemp("metrics"), tiny_models, ("flux1-dev",), keys=keys,
              front_overrides={"rate_limit": 1_000_000})
    yield s
    s.close()


def test_the_cluster_is_counted_once_however_many_fronts_ask(metered: Stack) -> None:
    other = testing.TestClient(create_app(metered.client, metered.keys, FrontConfig(rate_limit=1_000_000)))
    before = samples(metered.http.simulate_get("/metrics/cluster", headers=as_("scraper")).text)
    for client in (metered.http, metered.http, other):
        assert client.simulate_post("/generate", json=QUICK, headers=as_("gen")).status_code == 200
    cancelled = metered.http.simulate_post("/generate", headers=as_("gen"), json={
        **QUICK, "width": 512, "height": 512, "num_inference_steps": 100, "async": True}).json["task_id"]
    metered.http.simulate_delete(f"/task/{cancelled}", headers=as_("gen"))
    wait_until(lambda: metered.http.simulate_get(f"/task/{cancelled}", headers=as_("gen")).json["status"]
               == "cancelled", 30, 0.05, "the cancel")
    texts = [client.simulate_get("/metrics/cluster", headers=as_("scraper")).text for client in (metered.http, other)]
    a, b = (samples(t) for t in texts)
    labels = {"model": "flux1-dev", "mode": "text2img"}
    for found in (a, b):  # the same figures from either front: the broker's own
        assert value(found, "genserve_tasks_total", event="submitted", **labels) - \
            value(before, "genserve_tasks_total", event="submitted", **labels) == 4
        assert value(found, "genserve_tasks_total", event="completed", **labels) - \
            value(before, "genserve_tasks_total", event="completed", **labels) == 3
        assert value(found, "genserve_tasks_total", event="cancelled", **labels) - \
            value(before, "genserve_tasks_total", event="cancelled", **labels) == 1
        assert value(found, "genserve_generation_seconds_count", **labels) - \
            value(before, "genserve_generation_seconds_count", **labels) == 3
        assert value(found, "genserve_queue_wait_seconds_count", model="flux1-dev") >= 3
    assert value(a, "genserve_nodes", state="idle") + value(a, "genserve_nodes", state="busy") == 1
    assert value(a, "genserve_queue_depth", model="flux1-dev", priority="0") == 0

    def node_totals() -> dict:
        found = samples(metered.http.simulate_get("/metrics/cluster", headers=as_("scraper")).text)
        # 3, not 4: a cancel that reaches the node before the call's first step ends a job that never ran
        return found if value(found, "genserve_node_jobs_total", node="test-node") >= 3 else {}
    found = wait_until(node_totals, 10, 0.1, "the node's heartbeat totals")
    assert value(found, "genserve_node_busy_seconds_total", node="test-node") > 0
    assert value(found, "genserve_node_model_loads_total", node="test-node") >= 1
    assert ("genserve_node_cache_evictions_total", (("node", "test-node"),)) in found


def test_the_front_counts_requests_by_route_and_refusals_by_reason(metered: Stack) -> None:
    app = create_app(metered.client, metered.keys, FrontConfig(rate_limit=2, rate_window=60))
    client = testing.TestClient(app)
    task_id = client.simulate_post("/generate", json=QUICK, headers=as_("limited")).json["task_id"]
    client.simulate_get(f"/task/{task_id}", headers=as_("limited"))
    client.simulate_get("/task/no-such-task", headers=as_("limited"))  # rate limit of 2: this one is refused
    client.simulate_get("/health", headers={"Authorization": "Bearer not-a-key-at-all-0123456789"})
    client.simulate_get("/health")
    client.simulate_get("/metrics", headers=as_("gen"))  # a generation key: forbidden
    client.simulate_get("/nowhere", headers=as_("root"))
    found = samples(client.simulate_get("/metrics", headers=as_("root")).text)
    assert value(found, "genserve_http_requests_total", route="/generate", method="POST", status="200") == 1
    assert value(found, "genserve_http_requests_total", route="/task/{task_id}", method="GET", status="200") == 1
    assert value(found, "genserve_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert value(found, "genserve_rate_limited_total") == 1
    for reason in ("invalid_key", "missing_key", "forbidden"):
        assert value(found, "genserve_auth_rejections_total", reason=reason) == 1, reason
    assert value(found, "genserve_http_request_duration_seconds_count", route="/generate", method="POST") == 1
    assert not [name for name, labels in found if any(v == task_id for _, v in labels)]  # no ids as labels
    assert value(found, "genserve_event_streams") == 0


def test_a_metrics_key_reads_figures_and_nothing_else(metered: Stack) -> None:
    http = metered.http
    assert http.simulate_get("/metrics", headers=as_("scraper")).status_code == 200
    cluster = http.simulate_get("/metrics/cluster", headers=as_("scraper"))
    assert cluster.status_code == 200 and cluster.headers["content-type"].startswith("text/plain")
    for method, path in (("POST", "/generate"), ("GET", "/status"), ("GET", "/tasks"), ("GET", "/auth/keys")):
        assert http.simulate_request(method, path, headers=as_("scraper"), json=QUICK).status_code == 403, path
    assert http.simulate_get("/metrics", headers=as_("gen")).status_code == 403
    assert http.simulate_get("/metrics/cluster").status_code == 401
    from genserve.keyfile import parse_permissions
    from http_front.keys import parse_env_keys

    assert parse_permissions("metrics") == ("metrics",)  # what key creation and API_KEY_N accept
    assert parse_env_keys({"API_KEY_1": "scrape-0123456789abcdefghij:prom:metrics"})[0][2] == ("metrics",)


def test_methods_that_no_route_has_cannot_create_label_values(metered: Stack) -> None:
    app = create_app(metered.client, metered.keys, FrontConfig(rate_limit=1_000_000))
    client = testing.TestClient(app)
    for method in ("FOO1", "X9999", "BREW"):
        client.simulate_request(method, "/health")
    found = samples(client.simulate_get("/metrics", headers=as_("root")).text)
    methods = {dict(labels).get("method") for name, labels in found if name == "genserve_http_requests_total"}
    assert methods <= {"GET", "other"} and "other" in methods, methods


def test_a_tasks_queue_wait_is_observed_once_even_when_its_start_is_redone() -> None:
    from types import SimpleNamespace

    from broker.metrics import BrokerMetrics
    from broker.tasks import Task
    from tests.fakes import params

    metrics = BrokerMetrics(SimpleNamespace())  # the state collector is only read when scraped
    task = Task(task_id="t1", model="flux1-dev", mode="text2img", priority=0, seq=1, params=params(),
                created=10.0, started=12.0, attempts=1)
    metrics.started(task)
    task.started = 30.0  # its node could not take it: attempts went back to 0, then a new start
    metrics.started(task)
    count = metrics.registry.get_sample_value("genserve_queue_wait_seconds_count", {"model": "flux1-dev"})
    total = metrics.registry.get_sample_value("genserve_queue_wait_seconds_sum", {"model": "flux1-dev"})
    assert (count, total) == (1.0, 2.0)
