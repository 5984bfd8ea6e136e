"""The dispatch decision (broker/dispatch.py): pure, on the real TaskQueue, no sockets."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.dispatch import plan
from broker.queue import TaskQueue


@dataclass(eq=False)
class N:
    name: str
    models: dict[str, list[str]]
    loaded: list[str] = field(default_factory=list)


def queue_of(*tasks: tuple[str, str, int]) -> TaskQueue:
    q = TaskQueue(affinity_window=30.0)
    for seq, (task_id, model, priority) in enumerate(tasks, 1):
        q.push(task_id, model, priority, seq, now=0.0)
    return q


BOTH = {"a": ["text2img"], "b": ["text2img"]}


def test_priority_first_then_a_node_with_the_model_loaded() -> None:
    q = queue_of(("a1", "a", 0), ("b1", "b", 0), ("b0", "b", -1))
    cold, warm = N("cold", BOTH), N("warm", BOTH, ["a"])
    picks = [(n.name, e.task_id) for n, e in plan(q, [cold, warm], now=1.0)]
    assert picks == [("cold", "b0"), ("warm", "a1")]  # b0 is most urgent; a1 goes where a is loaded
    assert len(q) == 1 and "b1" in q


def test_without_affinity_it_is_first_come_on_any_idle_node() -> None:
    q = queue_of(("a1", "a", 0), ("b1", "b", 0))
    cold, warm = N("cold", BOTH), N("warm", BOTH, ["b"])
    assert [(n.name, e.task_id) for n, e in plan(q, [cold, warm], 1.0, affinity=False)] == [
        ("cold", "a1"), ("warm", "b1")]
    q = queue_of(("a1", "a", 0), ("b1", "b", 0))
    assert [(n.name, e.task_id) for n, e in plan(q, [cold, warm], 1.0)] == [("warm", "b1"), ("cold", "a1")]


def test_a_node_only_gets_models_it_serves_and_nothing_is_taken_for_none() -> None:
    q = queue_of(("b1", "b", 0), ("a1", "a", 5))
    only_a = N("only-a", {"a": ["text2img"]})
    assert [(n.name, e.task_id) for n, e in plan(q, [only_a], 1.0)] == [("only-a", "a1")]
    assert plan(q, [N("other", {"c": ["text2img"]})], 1.0) == [] and "b1" in q


def test_affinity_gives_way_once_the_oldest_task_waited_past_the_window() -> None:
    q = TaskQueue(affinity_window=30.0)
    q.push("a1", "a", 0, 1, now=0.0)
    q.push("b1", "b", 0, 2, now=0.0)
    warm_b = N("warm-b", BOTH, ["b"])
    assert plan(q, [warm_b], now=10.0)[0][1].task_id == "b1"
    q.push("b1", "b", 0, 2, now=0.0)
    assert plan(q, [warm_b], now=31.0)[0][1].task_id == "a1"  # a1 waited too long: FIFO wins


def test_the_simulator_runs_every_task_once_and_never_two_on_one_node() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.scheduler_sim import POLICIES, simulate, workload

    for policy in POLICIES.values():
        tasks, fleet, makespan = simulate(workload(3, 300, 3, 4, 1.2), nodes=4, models=3, load_cost=5.0,
                                          policy=policy, window=30.0)
        assert all(t.start is not None and t.start >= t.arrival for t in tasks)
        ends = [t.start + t.load + t.work for t in tasks]
        assert max(ends) == makespan and sum(n.loads for n in fleet) == sum(1 for t in tasks if t.load)
        busy = sorted((t.start, end) for t, end in zip(tasks, ends))
        running = []  # at no instant more jobs than nodes
        for start, end in busy:
            running = [e for e in running if e > start] + [end]
            assert len(running) <= 4


def test_a_task_that_loads_a_model_bills_its_key_the_load() -> None:
    q = TaskQueue(affinity_window=1e9)
    for i in range(3):
        q.push(f"x{i}", "b", 0, 2 * i, 0.0, owner="x")  # x's model is not loaded anywhere
        q.push(f"y{i}", "a", 0, 2 * i + 1, 0.0, owner="y")
    node = N("n", BOTH, ["a"])
    assert [e.task_id for _, e in plan(q, [node], 0.0, load_cost=0.0)] == ["y0"]
    node.loaded = ["b"]  # now x's model is loaded and y's is not
    (_, first), = plan(q, [node], 0.0, load_cost=5.0)
    assert first.task_id == "x0"  # warm for b; no load, no bill
    node.loaded = ["a"]
    (_, second), = plan(q, [node], 0.0, load_cost=5.0)
    assert second.task_id == "y1"
    cold = N("cold", BOTH, [])
    (_, third), = plan(q, [cold], 0.0, load_cost=5.0)  # x1 has the lowest tag; it loads b
    assert third.task_id == "x1"
    assert q.position("y2") == 0 and q.position("x2") == 1  # x was billed 5 jobs for that load
