"""The priority queue and scheduling policy, without sockets."""

from __future__ import annotations

from broker.queue import Entry, TaskQueue


def fill(q: TaskQueue, items: list[tuple[str, str, int]], now: float = 0.0) -> None:
    for seq, (task_id, model, prio) in enumerate(items):
        q.push(task_id, model, prio, seq, now)


def pop(q: TaskQueue, models: list[str], loaded: list[str] | tuple = (), now: float = 0.0) -> Entry | None:
    """What dispatch does for one node: the best entry it can serve, taken out of the queue."""
    entry = q.peek_for(models, loaded, now)
    if entry is not None:
        q.remove(entry.task_id)
    return entry

def test_lower_priority_number_first_and_fifo_within_priority() -> None:
    q = TaskQueue()
    fill(q, [("a", "m", 5), ("b", "m", 0), ("c", "m", 5), ("d", "m", -1), ("e", "m", 0)])
    order = [pop(q, ["m"]).task_id for _ in range(5)]
    assert order == ["d", "b", "e", "a", "c"]
    assert pop(q, ["m"]) is None and len(q) == 0


def test_only_models_the_node_serves_and_no_head_of_line_blocking() -> None:
    q = TaskQueue()
    fill(q, [("fill1", "flux1-fill-dev", 0), ("dev1", "flux1-dev", 1), ("fill2", "flux1-fill-dev", 0)])
    # a node without the fill model still gets the dev task behind two fill tasks
    assert pop(q, ["flux1-dev"]).task_id == "dev1"
    assert pop(q, ["flux1-dev"]) is None
    assert pop(q, ["flux1-dev", "flux1-fill-dev"]).task_id == "fill1"


def test_loaded_model_preferred_among_equal_priority_only() -> None:
    q = TaskQueue(affinity_window=30)
    fill(q, [("cold", "A", 0), ("warm", "B", 0), ("urgent", "A", -1)])
    assert pop(q, ["A", "B"], loaded=["B"], now=1).task_id == "urgent"  # priority still wins
    assert pop(q, ["A", "B"], loaded=["B"], now=1).task_id == "warm"
    assert pop(q, ["A", "B"], loaded=["B"], now=1).task_id == "cold"


def test_affinity_is_bounded_so_other_models_do_not_starve() -> None:
    q = TaskQueue(affinity_window=10)
    q.push("old-cold", "A", 0, 1, now=0.0)
    q.push("new-warm", "B", 0, 2, now=5.0)
    assert q.peek_for(["A", "B"], loaded=["B"], now=6.0).task_id == "new-warm"
    assert q.peek_for(["A", "B"], loaded=["B"], now=11.0).task_id == "old-cold"


def test_remove_and_position() -> None:
    q = TaskQueue()
    fill(q, [("a", "m", 0), ("b", "n", 0), ("c", "m", 1), ("d", "m", -5)])
    assert [q.position(t) for t in "abcd"] == [1, 2, 3, 0]
    assert q.remove("a") and not q.remove("a") and "a" not in q
    assert q.position("c") == 2 and q.position("a") is None
    assert [pop(q, ["m"]).task_id for _ in range(2)] == ["d", "c"]
    assert q.models_waiting() == {"n": 1}


def test_positions_and_counts_stay_right_through_pushes_pops_and_removals() -> None:
    import random

    rng = random.Random(7)
    q = TaskQueue()
    expected: dict[str, tuple[int, int, str]] = {}
    for seq in range(300):
        action = rng.random()
        if action < 0.6 or not expected:
            task_id, prio, model = f"t{seq}", rng.randint(-3, 3), rng.choice("ab")
            q.push(task_id, model, prio, seq, 0.0)
            expected[task_id] = (prio, seq, model)
        elif action < 0.8:
            victim = rng.choice(sorted(expected))
            assert q.remove(victim)
            del expected[victim]
        else:
            entry = pop(q, ["a", "b"])
            assert entry.task_id == min(expected, key=lambda t: expected[t][:2])
            del expected[entry.task_id]
        order = sorted(expected, key=lambda t: expected[t][:2])
        assert all(q.position(t) == i for i, t in enumerate(order))
        counts = {m: sum(1 for v in expected.values() if v[2] == m) for m in "ab"}
        assert q.models_waiting() == {m: n for m, n in counts.items() if n}
    q.push("x", "a", 0, 1000, 0.0)
    q.push("x", "b", 5, 1001, 0.0)  # re-pushing replaces the entry everywhere
    assert q.models_waiting().get("b", 0) == sum(1 for v in expected.values() if v[2] == "b") + 1
    assert len(q) == len(expected) + 1
