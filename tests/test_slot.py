"""The node's JobSlot on its own: capacity, order, recall and the registration snapshot (pure unit)."""

from __future__ import annotations

import threading

from gpu_node.slot import Holding, JobSlot


def test_without_prefetch_a_node_holds_one_job() -> None:
    slot = JobSlot(prefetch=0)
    assert slot.offer("a", "job-a")
    assert not slot.offer("b", "job-b")  # waiting for the worker counts
    assert slot.take(0) == ("a", "job-a") and slot.running == "a"
    assert not slot.offer("b", "job-b")  # running counts too
    slot.finished("a")
    assert slot.running is None and slot.offer("b", "job-b")


def test_with_prefetch_one_job_waits_behind_the_running_one_and_runs_next_in_order() -> None:
    slot = JobSlot(prefetch=1)
    assert slot.offer("a", 1) and slot.offer("b", 2)
    assert not slot.offer("c", 3)  # a credit of two
    assert slot.take(0) == ("a", 1)
    assert not slot.offer("c", 3)  # a running and b waiting: full
    assert slot.waiting() == ["b"] and not slot.idle
    assert slot.finished("a") == ("b", 2)  # b starts in the same step as a leaves the pipeline
    assert slot.running == "b" and slot.offer("c", 3)  # a is being encoded: room for c behind b
    assert slot.waiting() == ["c"]


def test_take_waits_for_an_offer_from_another_thread() -> None:
    slot = JobSlot(prefetch=1)
    timer = threading.Timer(0.05, slot.offer, ("a", "job"))
    timer.start()
    try:
        assert slot.take(5.0) == ("a", "job")
    finally:
        timer.cancel()
    assert slot.take(0.01) is None


def test_recall_gives_back_only_a_job_that_has_not_started() -> None:
    slot = JobSlot(prefetch=1)
    slot.offer("a", 1)
    slot.offer("b", 2)
    slot.take(0)
    assert not slot.recall("a")  # running: it runs on
    assert not slot.recall("zzz")
    assert slot.recall("b") and slot.waiting() == []
    assert not slot.recall("b")  # once


def test_give_back_returns_waiting_jobs_and_names_running_and_finishing_at_one_instant() -> None:
    slot = JobSlot(prefetch=1)
    slot.offer("a", 1)
    slot.take(0)
    assert slot.finished("a") is None  # encoding; nothing waited
    slot.offer("b", 2)
    slot.take(0)
    slot.offer("c", 3)
    assert slot.give_back() == Holding(running="b", finishing=("a",), recalled=("c",))
    slot.reported("a")
    assert slot.give_back() == Holding(running="b", finishing=(), recalled=())
    slot.finished("b")
    assert slot.idle and slot.running is None


def test_a_closed_slot_starts_and_accepts_nothing_more() -> None:
    slot = JobSlot(prefetch=1)
    slot.offer("a", 1)
    slot.offer("b", 2)
    slot.take(0)
    slot.close()
    assert slot.finished("a") is None and slot.running is None  # b does not start: it is given back
    assert slot.take(0) is None and not slot.offer("c", 3)
    assert slot.give_back().recalled == ("b",)
