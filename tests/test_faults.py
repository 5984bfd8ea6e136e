"""Fault injection with real processes: nodes, broker and front killed mid-work (bounded in time)."""

from __future__ import annotations

import re
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import DEFAULT_KEY, Cluster, Processes, wait_healthy, wait_until

pytestmark = pytest.mark.e2e
H = {"Authorization": f"Bearer {DEFAULT_KEY}"}
LONG = {"prompt": "slow", "width": 1024, "height": 1024, "num_inference_steps": 100, "async": True}
QUICK = {"prompt": "quick", "width": 32, "height": 32, "num_inference_steps": 1, "async": True}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # several nodes share 2 cores


def submit(cluster: Cluster, body: dict) -> str:
    r = requests.post(f"{cluster.url}/generate", json=body, headers=H, timeout=10)
    assert r.status_code == 202, r.text
    return r.json()["task_id"]


def task(cluster: Cluster, task_id: str) -> dict:
    """The task as a polling client sees it; 503 while the broker restarts is expected, 404 is not."""
    try:
        r = requests.get(f"{cluster.url}/task/{task_id}", headers=H, timeout=5)
    except requests.RequestException:
        return {"status": "unreachable"}
    if r.status_code == 503:
        return {"status": "unreachable"}
    assert r.status_code == 200, (r.status_code, r.text)
    return r.json()


def wait_completed(cluster: Cluster, ids: list[str], timeout: float = 120) -> dict[str, dict]:
    done: dict[str, dict] = {}

    def all_done() -> bool:
        for task_id in ids:
            if task_id not in done:
                body = task(cluster, task_id)
                assert body["status"] not in ("failed", "cancelled"), body
                if body["status"] == "completed":
                    done[task_id] = body
        return len(done) == len(ids)

    wait_until(all_done, timeout, 0.2, f"{len(ids)} tasks to complete")
    return done


def completions(procs: Processes, names: list[str]) -> dict[str, int]:
    """How many times each task id was generated to the end, over the given node logs."""
    counts: dict[str, int] = {}
    for name in names:
        for task_id in re.findall(r"task (\w+) done in", procs.log(name)):
            counts[task_id] = counts.get(task_id, 0) + 1
    return counts


def running_on(cluster: Cluster, task_id: str) -> str:
    def check():
        body = task(cluster, task_id)
        return body.get("node_id") if body["status"] == "running" else None
    return wait_until(check, 60, 0.05, "the task to start")


def test_node_killed_mid_job_the_other_node_completes_it_once(processes, tiny_models, tmp_path) -> None:
    cluster = Cluster(processes, tiny_models, tmp_path / "b", nodes=2, node_env=ONE_THREAD)
    task_id = submit(cluster, LONG)
    victim = running_on(cluster, task_id)
    processes.kill(victim, signal.SIGKILL)
    body = wait_completed(cluster, [task_id])[task_id]
    survivor = "node1" if victim == "node0" else "node0"
    assert body["node_id"] == survivor
    assert completions(processes, ["node0", "node1"]) == {task_id: 1}


def test_broker_killed_and_restarted_every_task_completes_once(processes, tiny_models, tmp_path) -> None:
    cluster = Cluster(processes, tiny_models, tmp_path / "b", nodes=1)
    running = submit(cluster, LONG)
    running_on(cluster, running)
    queued = [submit(cluster, {**QUICK, "priority": p, "seed": p}) for p in (3, 1, 2)]
    processes.kill("broker", signal.SIGKILL)
    r = requests.post(f"{cluster.url}/generate", json=QUICK, headers=H, timeout=10)
    assert r.status_code == 503  # answered within the front's broker timeout, not hung
    health = requests.get(f"{cluster.url}/health", headers=H, timeout=10)
    assert health.status_code == 503 and health.json()["broker"] == "unreachable"
    cluster.start_broker()
    done = wait_completed(cluster, [running, *queued])
    assert all(body["image"].startswith("data:image/png") for body in done.values())
    counts = completions(processes, ["node0"])
    assert all(counts.get(t) == 1 for t in [running, *queued]), counts


def test_front_killed_and_restarted_tasks_complete_and_can_be_fetched(processes, tiny_models, tmp_path) -> None:
    cluster = Cluster(processes, tiny_models, tmp_path / "b", nodes=1)
    ids = [submit(cluster, LONG | {"num_inference_steps": 30}), submit(cluster, QUICK)]
    running_on(cluster, ids[0])
    processes.kill("front", signal.SIGKILL)
    cluster.start_front()
    wait_healthy(cluster.url)
    wait_completed(cluster, ids)
    # The restarted front serves both results, and the node generated each exactly once.
    for task_id in ids:
        body = task(cluster, task_id)
        assert body["status"] == "completed" and body["image"].startswith("data:image/png;base64,")
    assert completions(processes, ["node0"]) == {task_id: 1 for task_id in ids}


def test_200_concurrent_submissions_over_3_nodes_complete_once_in_priority_order(processes, tiny_models,
                                                                                tmp_path) -> None:
    cluster = Cluster(processes, tiny_models, tmp_path / "b", nodes=3, node_env=ONE_THREAD,
                      broker_args=["--max-queued-per-key", "1000"])
    blockers = [submit(cluster, LONG | {"num_inference_steps": 40, "seed": i}) for i in range(3)]
    for b in blockers:
        running_on(cluster, b)
    bodies = [{**QUICK, "priority": i % 5, "seed": i} for i in range(200)]
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda body: submit(cluster, body), bodies))
    assert len(set(ids)) == 200
    done = wait_completed(cluster, blockers + ids, timeout=240)
    counts = completions(processes, ["node0", "node1", "node2"])
    assert all(counts.get(t) == 1 for t in blockers + ids) and len(counts) == 203
    assert all(done[t]["attempts"] == 1 for t in ids)
    # All 200 were queued together behind the blockers: they must start in priority order.
    started = sorted(ids, key=lambda t: done[t]["started_at"])
    priorities = [done[t]["priority"] for t in started]
    assert priorities == sorted(priorities)
