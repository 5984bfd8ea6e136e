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


# ---- fair share between keys ---------------------------------------------------------------

def dispatch_order(q: TaskQueue, models: list[str], n: int, loaded: list[str] | tuple = ()) -> list[str]:
    """What one node serving `models` runs, n times, as dispatch takes tasks (virtual time advances)."""
    out = []
    for _ in range(n):
        entry = q.peek_for(models, loaded)
        if entry is None:
            break
        q.take(entry.task_id)
        out.append(entry.task_id)
    return out


def test_a_key_with_one_task_is_not_behind_another_keys_backlog() -> None:
    q = TaskQueue()
    for i in range(500):
        q.push(f"a{i}", "m", 0, i, 0.0, owner="A")
    assert dispatch_order(q, ["m"], 3) == ["a0", "a1", "a2"]
    q.push("b0", "m", 0, 500, 1.0, owner="B")
    assert q.position("b0") == 0  # the queue shows it next, and it runs next
    assert dispatch_order(q, ["m"], 2) == ["b0", "a3"]


def test_keys_share_by_weight_within_a_priority_and_priority_still_wins() -> None:
    q = TaskQueue()
    seq = 0
    for i in range(300):
        for owner, weight in (("light", 1.0), ("heavy", 3.0)):
            q.push(f"{owner}{i}", "m", 0, seq, 0.0, owner=owner, weight=weight)
            seq += 1
    q.push("urgent", "m", -1, seq, 0.0, owner="light")
    order = dispatch_order(q, ["m"], 201)
    assert order[0] == "urgent"
    heavy = sum(1 for t in order[1:] if t.startswith("heavy"))
    assert 148 <= heavy <= 152  # 3:1 over 200 starts


def test_an_idle_key_gets_no_credit_for_the_time_it_sent_nothing() -> None:
    q = TaskQueue()
    for i in range(50):
        q.push(f"a{i}", "m", 0, i, 0.0, owner="A")
    dispatch_order(q, ["m"], 40)
    for i in range(5):
        q.push(f"b{i}", "m", 0, 100 + i, 1.0, owner="B")
    assert dispatch_order(q, ["m"], 6) == ["b0", "a40", "b1", "a41", "b2", "a42"]  # turns, not five b's first


def test_a_requeued_task_keeps_its_place_and_charges_move_a_keys_tasks_back() -> None:
    q = TaskQueue()
    tags = {f"{o}{i}": q.push(f"{o}{i}", "m", 0, 2 * i + (o == "b"), 0.0, owner=o) for i in range(3) for o in "ab"}
    assert dispatch_order(q, ["m"], 1) == ["a0"]
    q.push("a0", "m", 0, 0, 5.0, owner="a", tag=tags["a0"])  # its node died: back at the front
    assert q.position("a0") == 0
    q.charge("a", 0, 10.0)  # a's task caused a model load worth 10 jobs
    assert dispatch_order(q, ["m"], 6) == ["b0", "b1", "b2", "a0", "a1", "a2"]


def test_affinity_slack_bounds_how_far_a_warm_task_may_pass_a_cold_one() -> None:
    q = TaskQueue(affinity_window=1e9, affinity_slack=2.0)
    q.push("cold", "A", 0, 0, 0.0, owner="x")
    for i in range(5):
        q.push(f"warm{i}", "B", 0, 1 + i, 0.0, owner="y")  # tags 0, 1, 2, 3, 4
    picks = [q.peek_for(["A", "B"], loaded=["B"]).task_id for _ in range(1)]
    assert picks == ["warm0"]
    assert dispatch_order(q, ["A", "B"], 4, ["B"]) == ["warm0", "warm1", "warm2", "cold"]
    plain = TaskQueue(affinity_window=1e9)  # no slack: the warm model wins while the window lasts
    plain.push("cold", "A", 0, 0, 0.0, owner="x")
    for i in range(5):
        plain.push(f"warm{i}", "B", 0, 1 + i, 0.0, owner="y")
    assert dispatch_order(plain, ["A", "B"], 6, ["B"])[-1] == "cold"


def test_positions_match_the_order_tasks_are_taken_in() -> None:
    import random

    rng = random.Random(4)
    q = TaskQueue()
    for i in range(200):
        q.push(f"t{i}", "m", rng.choice([-1, 0, 0, 5]), i, 0.0, owner=rng.choice("abcd"),
               weight=rng.choice([0.5, 1.0, 4.0]), cost=rng.uniform(0.1, 3.0))
        if i % 7 == 0:
            q.charge(rng.choice("abcd"), 0, rng.uniform(0, 5))
    predicted = sorted(q._live, key=q.position)
    assert dispatch_order(q, ["m"], 200) == predicted


def test_a_late_task_started_on_another_models_node_does_not_push_newcomers_back() -> None:
    q = TaskQueue()
    for i in range(100):
        q.push(f"a{i}", "m1", 0, i, 0.0, owner="A")
    q.push("a-m2", "m2", 0, 100, 0.0, owner="A")  # tag 100: behind A's own hundred
    assert dispatch_order(q, ["m2"], 1) == ["a-m2"]  # a node that serves only m2 starts it at once
    q.push("c0", "m1", 0, 101, 1.0, owner="C")
    assert q.position("c0") == 1  # right behind A's head, not behind A's hundred
    assert dispatch_order(q, ["m1"], 3) == ["a0", "c0", "a1"]


def test_a_held_task_goes_before_everything_queued_at_its_priority() -> None:
    q = TaskQueue()
    for i in range(3):
        q.push(f"a{i}", "m", 0, i, 0.0, owner="A")
    q.push("held", "m", 0, 99, 1.0, owner="B", tag=q.front_tag(0))
    assert q.position("held") == 0


def test_repeated_charges_do_not_grow_the_heaps_without_bound() -> None:
    q = TaskQueue()
    for i in range(1000):
        q.push(f"a{i}", "m", 0, i, 0.0, owner="A")
    for _ in range(50):
        q.charge("A", 0, 1.0)
    assert len(q._heaps["m"]) <= 2 * 1000 + 64
    assert dispatch_order(q, ["m"], 3) == ["a0", "a1", "a2"]


def test_lora_affinity_prefers_the_set_a_node_holds_within_its_slack() -> None:
    q = TaskQueue(affinity_window=1e9, lora_slack=1.5)
    for i, lora in enumerate(["x", "y", "x", "y"]):
        q.push(f"t{i}", "m", 0, i, 0.0, owner=f"k{i}", lora=lora)  # every tag is 0: four keys
    q.push("late-y", "m", 0, 9, 0.0, owner="k0", cost=5.0, lora="y")  # k0's second task: tag 1
    held = {"m": "y"}
    assert q.peek_for(["m"], ["m"], loras=held).task_id == "t1"  # t0 would switch the set; t1 ties
    assert dispatch_order(q, ["m"], 1) == ["t0"]  # a node holding nothing takes the fair pick
    plain = TaskQueue(affinity_window=1e9)  # no lora_slack: LoRA sets are ignored
    plain.push("a", "m", 0, 0, 0.0, owner="k0", lora="x")
    plain.push("b", "m", 0, 1, 0.0, owner="k1", lora="y")
    assert plain.peek_for(["m"], ["m"], loras={"m": "y"}).task_id == "a"
    q.charge("k1", 0, 10.0)  # t1 (y) moves 10 jobs back, beyond the slack: t3 is the y task now
    assert q.peek_for(["m"], ["m"], loras=held).task_id == "t3"
    assert q.peek_for(["m"], ["m"], loras={"m": "x"}).task_id == "t2"
    q.charge("k3", 0, 10.0)  # and t3: the y task within the slack is late-y (tag 1, against t2's 0)
    assert q.peek_for(["m"], ["m"], loras=held).task_id == "late-y"
    q.charge("k0", 0, 10.0)  # now every y task is far behind: the fair pick wins
    assert q.peek_for(["m"], ["m"], loras=held).task_id == "t2"


def test_a_task_that_never_runs_costs_its_key_nothing() -> None:
    q = TaskQueue()
    for i in range(100):
        q.push(f"a{i}", "m", 0, i, 0.0, owner="A")
    for i in range(100):
        assert q.remove(f"a{i}")  # all cancelled (or timed out) before running
    q.push("b0", "m", 0, 200, 0.0, owner="B")
    assert q.push("a-next", "m", 0, 201, 0.0, owner="A") == 0.0  # not behind 100 jobs it never got
    three = [q.push(f"c{i}", "m", 0, 300 + i, 0.0, owner="C") for i in range(3)]
    assert three == [0.0, 1.0, 2.0]
    q.remove("c1")  # the one after it moves up into its place
    assert q._live["c2"].tag == 1.0 and q.push("c3", "m", 0, 303, 0.0, owner="C") == 2.0
    assert len(q._heaps["m"]) <= 2 * len(q) + 64  # removals do not leave the heap growing


def test_companions_follow_queue_order_and_are_bounded_by_what_the_node_could_run() -> None:
    q = TaskQueue(affinity_slack=1.0)
    for i in range(6):
        q.push(f"y{i}", "y", 0, i, 0.0, owner="k2", cost=1.0)  # an early backlog of another model
    for i in range(4):
        q.push(f"x{i}", "x", 0, 10 + i, 0.0, owner="k1", cost=0.5)
    q.push("x-later", "x", 1, 20, 0.0, owner="k1")
    lead = q.take("x0")
    # A node serving only x: its riders are the next x tasks in order, whatever y's queue holds.
    assert [e.task_id for e in q.companions(lead, ["x"], limit=8)] == ["x1", "x2", "x3"]
    assert [e.task_id for e in q.companions(lead, ["x"], limit=2)] == ["x1", "x2"]
    # A node serving both may not pass y's earlier tasks by more than the slack.
    assert [e.task_id for e in q.companions(lead, ["x", "y"], limit=8)] == ["x1", "x2"]  # x3 is 1.5 past y0
    assert q.companions(lead, ["z"], limit=8) == []


def test_nth_for_is_what_a_node_gets_once_others_took_the_first_ones() -> None:
    q = TaskQueue()
    q.push("x0", "x", 1, 0, 0.0)
    q.push("y0", "y", 0, 1, 0.0)
    q.push("x1", "x", 0, 2, 0.0)
    assert [q.nth_for(["x", "y"], n).task_id for n in range(3)] == ["y0", "x1", "x0"]
    assert q.nth_for(["x"], 1).task_id == "x0" and q.nth_for(["x"], 2) is None and q.nth_for(["z"], 0) is None
    q.remove("x1")  # a removed task is skipped
    assert q.nth_for(["x"], 0).task_id == "x0"
