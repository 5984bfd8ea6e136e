"""Stopping nodes with SIGTERM: they exit promptly, idle or busy, and a busy node's task is re-queued.

Real processes, repeated, because the defects these guard against were races (a node hung in
its shutdown about every other time; a busy node failed its task 3 times in 10). The bounds are
generous upper limits that tell "exits" from "hangs"; the measured stop times are in
docs/benchmarks.md (bench/shutdown.py), not asserted here.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import Cluster, Processes, wait_until

pytestmark = pytest.mark.e2e

HANG = 15.0  # a node that has not exited by then is hung (supervisord would wait 60 s)


def task(cluster: Cluster, task_id: str) -> dict:
    """The task as its submitter sees it."""
    r = requests.get(f"{cluster.url}/task/{task_id}", headers={"X-API-Key": cluster.key}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def registered(cluster: Cluster) -> set[str]:
    """Node ids the broker has registered."""
    r = requests.get(f"{cluster.url}/status", headers={"X-API-Key": cluster.key}, timeout=10)
    return {n["node_id"] for n in r.json()["nodes"]} if r.status_code == 200 else set()


def stop(cluster: Cluster, name: str) -> int:
    """SIGTERM one node and return its exit code (fails if it hangs)."""
    proc = cluster.procs.procs[name]
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=HANG)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} still running {HANG}s after SIGTERM:\n{cluster.procs.log(name)[-3000:]}")


def test_idle_nodes_exit_on_sigterm_every_time(processes: Processes, tiny_models: Path, tmp_path: Path) -> None:
    cluster = Cluster(processes, tiny_models, tmp_path / "broker", nodes=1)
    for i in range(1, 4):
        name = f"idle{i}"
        cluster.start_node(name)
        wait_until(lambda: name in registered(cluster), 60, 0.1, f"{name} to register")
        assert stop(cluster, name) == 0
        wait_until(lambda: name not in registered(cluster), 10, 0.1, f"{name} to leave the registry")


def test_a_busy_node_stopped_mid_task_requeues_it_and_never_fails_it(
        processes: Processes, tiny_models: Path, tmp_path: Path) -> None:
    cluster = Cluster(processes, tiny_models, tmp_path / "broker", nodes=2)
    outcomes = []
    for i in range(3):
        r = cluster.generate(width=256, height=256, num_inference_steps=100, seed=1000 + i, **{"async": True})
        assert r.status_code == 202, r.text
        task_id = r.json()["task_id"]
        running = wait_until(lambda: (t := task(cluster, task_id))["status"] == "running"
                             and t.get("progress", {}).get("step", 0) > 0 and t, 60, 0.05, "the task to run")
        victim = next(n for n, p in processes.procs.items()
                      if p.poll() is None and n.startswith("node") and n == running["node_id"])
        assert stop(cluster, victim) == 0
        assert f"task {task_id} stopped at step" in processes.log(victim)  # it was busy, not done
        cluster.start_node(f"node-r{i}")  # keep two nodes
        wait_until(lambda: f"node-r{i}" in registered(cluster), 60, 0.1, "the replacement node")
        done = wait_until(lambda: (t := task(cluster, task_id))["status"] in ("completed", "failed", "cancelled")
                          and t, 120, 0.1, "the task to end")
        outcomes.append((done["status"], done.get("error_code"), done["metadata"]["seed"] if "metadata" in done
                         else None))
    assert outcomes == [("completed", None, 1000 + i) for i in range(3)]


def test_sigterm_during_a_burst_loses_nothing(processes: Processes, tiny_models: Path, tmp_path: Path) -> None:
    cluster = Cluster(processes, tiny_models, tmp_path / "broker", nodes=1)
    ids = []
    for i in range(6):
        r = cluster.generate(width=128, height=128, num_inference_steps=20, seed=i, **{"async": True})
        assert r.status_code == 202
        ids.append(r.json()["task_id"])
    cluster.start_node("second")
    time.sleep(0.5)
    assert stop(cluster, "node0") == 0
    finals = [wait_until(lambda t=t: task(cluster, t)["status"] in ("completed", "failed", "cancelled")
                         and task(cluster, t)["status"], 120, 0.1, "every task to end") for t in ids]
    assert finals == ["completed"] * len(ids)
