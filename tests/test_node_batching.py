"""A real Node (threads, slot, sockets) with fake pipeline runners: one JOB with riders is one pipeline call.

Each task of the call reports on its own; a cancel stops one task, and
the call only when none is left; a node that gives the call up gives up every task of it; a
waiting JOB given back or cancelled brings every rider back unstarted.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

from genserve import errors as e
from genserve import wire as w
from tests.conftest import wait_until
from tests.fakes import META, params, png_bytes
from tests.test_node_prefetch import RouterNode


def rider(task_id: str, seed: int, run: str = "") -> w.Rider:
    return w.Rider(task_id, params(prompt=f"prompt {task_id}", width=32, height=32, seed=seed), run=run)


class Pipeline:
    """Fake runners that record each call's tasks and hold every call until released (or stopped)."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, str, int]]] = []
        self.release = threading.Event()
        self.stopped: list[tuple[list[str], set[str]]] = []  # each stopped call's tasks, and what was cancelled
        self.node: Any = None
        self.fail_shared = False
        self.deaf = False  # a step that takes longer than the node's patience: it sees no stop until released

    def _run(self, jobs: list[Any], should_stop: Any) -> list[Any]:
        from gpu_node.errors import Cancelled

        self.calls.append([(j.task_id, j.params.prompt, j.params.seed) for j in jobs])
        if self.fail_shared and len(jobs) > 1:
            raise RuntimeError("CUDA out of memory (a fake one)")
        while not self.release.wait(0.01):
            if should_stop() and not self.deaf:
                self.stopped.append(([j.task_id for j in jobs], set(self.node._cancelled) if self.node else set()))
                raise Cancelled(jobs[0].task_id)
        return [lambda: (png_bytes(), META) for _ in jobs]

    def single(self, job: Any, _on_step: Any, should_stop: Any) -> Any:
        return self._run([job], should_stop)[0]

    def batch(self, jobs: list[Any], _on_step: Any, should_stop: Any) -> list[Any]:
        return self._run(jobs, should_stop)


@contextmanager
def serving(ctx: Any, pipe: Pipeline, plain: bool = False, **config: Any) -> Iterator[RouterNode]:
    """A real Node on `pipe`'s runners (`plain`: without a batch runner), closed afterwards."""
    config = {"heartbeat_interval": 0.2, "liveness": 50, **config}
    r = RouterNode(ctx, pipe.single, None if plain else pipe.batch, **config)
    pipe.node = r.node
    try:
        yield r
    finally:
        r.close()


def reports(r: RouterNode, count: int) -> list[tuple[str, str, str]]:
    """The next `count` final reports as (command, task, run or code), in arrival order."""
    out = []
    for _ in range(count):
        msg = r.next(w.RESULT, w.ERROR)[1]
        code = msg.header.run if msg.command == w.RESULT else msg.header.code
        out.append((w.COMMAND_NAMES[msg.command], msg.header.task_id, code))
    return out


def test_a_job_with_riders_is_one_pipeline_call_and_each_task_reports_with_its_run(ctx) -> None:
    pipe = Pipeline()
    with serving(ctx, pipe, node_id="batching", batch=3) as r:
        assert r.ready.header.batch == 3
        r.job("lead", "r0", [rider("one", 1, "r1"), rider("two", 2, "r2")])
        pipe.release.set()
        assert sorted(reports(r, 3)) == [("RESULT", "lead", "r0"), ("RESULT", "one", "r1"), ("RESULT", "two", "r2")]
        assert pipe.calls == [[("lead", "small", 1), ("one", "prompt one", 1), ("two", "prompt two", 2)]]
        assert r.node.jobs == 3 and not r.node._groups and not r.node._rider_of


def test_a_cancelled_rider_reports_cancelled_and_the_call_stops_only_when_every_task_has(ctx) -> None:
    pipe = Pipeline()
    with serving(ctx, pipe, node_id="cancels", batch=3) as r:
        r.job("lead", "r0", [rider("one", 1, "r1"), rider("two", 2, "r2")])
        wait_until(lambda: pipe.calls, 10, 0.01, "the call to start")
        r.send(w.Cancel("one", "by request"))
        wait_until(lambda: "one" in r.node._cancelled, 10, 0.01)
        pipe.release.set()
        assert sorted(reports(r, 3)) == [("ERROR", "one", e.CANCELLED), ("RESULT", "lead", "r0"),
                                         ("RESULT", "two", "r2")]
        pipe.release.clear()
        r.job("next", "r3", [rider("three", 3, "r4")])
        wait_until(lambda: len(pipe.calls) == 2, 10, 0.01, "the second call to start")
        r.send(w.Cancel("three"))
        wait_until(lambda: "three" in r.node._cancelled, 10, 0.01)
        r.send(w.Cancel("next"))
        assert sorted(reports(r, 2)) == [("ERROR", "next", e.CANCELLED), ("ERROR", "three", e.CANCELLED)]
        # It stopped once both were cancelled, not on its rider's cancel alone.
        assert pipe.stopped == [(["next", "three"], {"next", "three"})]


def test_a_node_whose_broker_falls_silent_gives_up_every_task_of_its_call_and_lists_them(ctx) -> None:
    pipe = Pipeline()
    with serving(ctx, pipe, node_id="silent", batch=2, heartbeat_interval=0.5, liveness=2, reconnect_max=0.5) as r:
        r.job("lead", "r0", [rider("one", 1, "r1")])
        wait_until(lambda: pipe.calls, 10, 0.01, "the call to start")
        ready = r.next(w.READY)[1]  # it gave up the call and registers again
        assert {"lead", "one"} <= set(ready.header.reports) and ready.header.busy_task is None
        assert sorted(reports(r, 2)) == [("ERROR", "lead", e.ABANDONED), ("ERROR", "one", e.ABANDONED)]
        assert [tasks for tasks, _ in pipe.stopped] == [["lead", "one"]]


def test_a_waiting_job_given_back_or_cancelled_brings_its_riders_back_unstarted(ctx) -> None:
    pipe = Pipeline()
    with serving(ctx, pipe, node_id="waits", batch=2) as r:
        r.job("running", "r0")
        r.job("lead", "r1", [rider("one", 1, "r2")])
        wait_until(lambda: r.node.slot.waiting() == ["lead"], 10, 0.01)
        r.send(w.Recall("lead"))
        assert reports(r, 2) == [("ERROR", "one", e.RECALLED), ("ERROR", "lead", e.RECALLED)]
        r.job("lead", "r3", [rider("one", 1, "r4")])
        wait_until(lambda: r.node.slot.waiting() == ["lead"], 10, 0.01)
        r.send(w.Cancel("lead"))  # the lead is cancelled before it starts: its rider goes back in line
        assert reports(r, 2) == [("ERROR", "one", e.RECALLED), ("ERROR", "lead", e.CANCELLED)]
        r.job("lead2", "r5", [rider("two", 2, "r6")])
        wait_until(lambda: r.node.slot.waiting() == ["lead2"], 10, 0.01)
        r.send(w.Cancel("two"))  # a waiting rider is dropped when its call starts; the lead runs alone
        wait_until(lambda: "two" in r.node._cancelled, 10, 0.01)
        pipe.release.set()
        assert sorted(reports(r, 3)) == [("ERROR", "two", e.CANCELLED), ("RESULT", "lead2", "r5"),
                                         ("RESULT", "running", "r0")]
        assert [[t for t, _, _ in call] for call in pipe.calls] == [["running"], ["lead2"]]


def test_a_job_with_more_riders_than_the_node_offered_is_refused_task_by_task(ctx) -> None:
    pipe = Pipeline()
    with serving(ctx, pipe, node_id="plain", batch=4, plain=True) as r:
        assert r.ready.header.batch == 1  # no batch runner: it offers nothing, whatever its configuration
        r.job("lead", "r0", [rider("one", 1, "r1")])
        assert sorted(reports(r, 2)) == [("ERROR", "lead", e.NODE_BUSY), ("ERROR", "one", e.NODE_BUSY)]
        assert pipe.calls == []


def test_a_real_node_runs_a_backlog_of_compatible_tasks_in_one_call_and_says_so(broker_factory, tiny_models) -> None:
    import io

    from PIL import Image

    from genserve.spec import TaskSpec
    from http_front.broker_client import BrokerClient
    from tests.test_node import LONG, running_node

    bt = broker_factory()
    node, thread = running_node(bt.backend, tiny_models, "batcher", liveness=1000, batch=3, prefetch=0)
    client = BrokerClient(bt.frontend, context=bt.context).start()
    try:
        wait_until(lambda: len(bt.broker.nodes) == 1, 30)
        long = client.request(w.Submit(0, TaskSpec("flux1-dev", "text2img", 0, LONG), "k")).header.task_id
        wait_until(lambda: bt.broker.tasks[long].step >= 1, 30, 0.01, "the long job to run")
        small = [params(prompt=f"a {animal}", width=32, height=32, seed=seed)
                 for seed, animal in enumerate(("cat", "dog", "fox"))]
        ids = [client.request(w.Submit(0, TaskSpec("flux1-dev", "text2img", 0, p), "k")).header.task_id
               for p in small]
        client.request(w.CancelTask(0, long))  # the node frees; the three queued tasks run as one call
        wait_until(lambda: all(bt.broker.tasks[t].state == w.COMPLETED for t in ids), 60, what="the batch")
        metas = [bt.broker.tasks[t].meta for t in ids]
        assert [(m.batch, m.seed, m.width) for m in metas] == [(3, 0, 32), (3, 1, 32), (3, 2, 32)]
        images = [Image.open(io.BytesIO(bt.broker.journal.result(t))) for t in ids]
        assert all(i.size == (32, 32) for i in images) and len({i.tobytes() for i in images}) == 3
        assert [bt.broker.tasks[t].attempts for t in ids] == [1, 1, 1]
    finally:
        client.close()
        node.stop()
        thread.join(timeout=30)


def test_a_shared_call_that_fails_runs_its_tasks_one_by_one(ctx) -> None:
    pipe = Pipeline()
    pipe.fail_shared = True
    pipe.release.set()
    with serving(ctx, pipe, node_id="falls-back", batch=3) as r:
        r.job("lead", "r0", [rider("one", 1, "r1"), rider("two", 2, "r2")])
        assert sorted(reports(r, 3)) == [("RESULT", "lead", "r0"), ("RESULT", "one", "r1"), ("RESULT", "two", "r2")]
        assert [[t for t, _, _ in call] for call in pipe.calls] == [["lead", "one", "two"], ["lead"], ["one"], ["two"]]


def test_made_images_are_kept_for_the_broker_before_reports_of_unstarted_jobs(ctx) -> None:
    pipe = Pipeline()
    with serving(ctx, pipe, node_id="keeps", batch=4) as r:
        room = r.node._max_unacked
        made = w.encode(w.Result("made", META), [png_bytes()])
        r.node._keep("made", made)
        for i in range(room + 5):  # a flood of RECALLED reports cannot push the image out
            r.node._keep(f"given-back-{i}", w.encode(w.Error(f"given-back-{i}", e.RECALLED, "x")))
        assert r.node._unacked["made"] == made and len(r.node._unacked) == room


def test_a_job_sent_again_or_naming_a_held_rider_runs_nothing_twice(ctx) -> None:
    pipe = Pipeline()
    with serving(ctx, pipe, node_id="again", batch=3) as r:
        r.job("lead", "r0", [rider("one", 1, "r1")])
        wait_until(lambda: pipe.calls, 10, 0.01, "the call to start")
        r.job("lead", "r2", [rider("one", 1, "r3")])  # the same JOB again: both report as this assignment
        r.job("new", "r4", [rider("one", 1, "r5")])  # a JOB naming a rider it runs: that one is not taken again
        wait_until(lambda: r.node.slot.waiting() == ["new"], 10, 0.01)
        pipe.release.set()
        assert sorted(reports(r, 3)) == [("RESULT", "lead", "r2"), ("RESULT", "new", "r4"), ("RESULT", "one", "r5")]
        assert [[t for t, _, _ in call] for call in pipe.calls] == [["lead", "one"], ["new"]]


def test_ready_names_the_riders_of_the_running_call_and_a_cancelled_waiting_rider_reports_cancelled(ctx) -> None:
    pipe = Pipeline()
    with serving(ctx, pipe, node_id="ready", batch=3) as r:
        r.job("lead", "r0", [rider("one", 1, "r1"), rider("two", 2, "r2")])
        r.job("next", "r3", [rider("three", 3, "r4")])
        wait_until(lambda: pipe.calls and r.node.slot.waiting() == ["next"], 10, 0.01)
        r.send(w.Cancel("three"))
        wait_until(lambda: "three" in r.node._cancelled, 10, 0.01)
        threading.Event().wait(0.3)  # (a node re-registers at most once per heartbeat interval)
        r.send(w.Disconnect("not registered"))  # a restarted broker asks it to register again
        ready = r.next(w.READY)[1].header
        assert (ready.busy_task, ready.busy_riders) == ("lead", ["one", "two"])
        assert {"next", "three"} <= set(ready.reports)  # the waiting JOB is given back
        given = sorted(reports(r, 2))
        assert given == [("ERROR", "next", e.RECALLED), ("ERROR", "three", e.CANCELLED)]
        assert "three" not in r.node._cancelled and not r.node._groups.get("next")


def test_a_node_that_registers_again_mid_call_after_giving_it_up_says_which_reports_free_it(ctx) -> None:
    pipe = Pipeline()
    pipe.deaf = True
    with serving(ctx, pipe, node_id="unwinds", batch=2, heartbeat_interval=0.5, liveness=2, reconnect_max=0.5) as r:
        r.job("lead", "r0", [rider("one", 1, "r1")])
        wait_until(lambda: pipe.calls, 10, 0.01, "the call to start")
        ready = r.next(w.READY)[1].header  # it gave the call up, which still runs (a long step)
        assert (ready.busy, ready.busy_task, ready.busy_riders) == (True, None, [])
        assert ready.unwinding == ["lead", "one"]  # their reports, and no other, say it is free
        pipe.release.set()
        assert sorted(reports(r, 2)) == [("RESULT", "lead", "r0"), ("RESULT", "one", "r1")]  # finished work is sent


def test_a_job_that_waits_after_the_call_before_it_ended_is_not_given_back_by_a_recall(ctx) -> None:
    encoding, go_on = threading.Event(), threading.Event()

    def runner(job: Any, _on_step: Any, _should_stop: Any) -> Any:
        def encode() -> Any:
            if job.task_id == "first":
                encoding.set()
                go_on.wait(10)  # nothing waited when its call ended: the worker encodes it itself
            return png_bytes(), META
        return encode

    pipe = Pipeline()
    pipe.single = runner  # type: ignore[method-assign]
    with serving(ctx, pipe, node_id="late-recall", plain=True) as r:
        r.job("first", "r1")
        assert encoding.wait(10)
        r.job("second", "r2")  # it waits, though no call runs: the worker takes it once it has encoded
        wait_until(lambda: r.node.slot.waiting() == ["second"], 10, 0.01)
        before = r.node._last_recv
        r.send(w.Recall("second"))  # the broker counts it as started once "first" reports
        wait_until(lambda: r.node._last_recv > before, 5, 0.01, "the node to read the recall")
        go_on.set()
        assert sorted(reports(r, 2)) == [("RESULT", "first", "r1"), ("RESULT", "second", "r2")]
