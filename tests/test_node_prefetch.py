"""A real tiny-model node with prefetch, against a real broker: the device does not wait for the encoder.

The worker hands a finished pipeline call to the encoder thread and takes the next job,
which already waits on the node. A waiting job can be cancelled or given back without
ever reaching the pipeline.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from genserve import wire as w
from genserve.spec import TaskSpec
from http_front.broker_client import BrokerClient
from tests.conftest import wait_until
from tests.fakes import params
from tests.test_node import LONG, running_node

SMALL = params(prompt="small", width=32, height=32, num_inference_steps=2)


def watch_runner(node: Any, on_call: Callable[[str], None], wrap_encode: Callable[[str, Any], Any]) -> list[str]:
    """Wrap the node's pipeline runner: `on_call(task_id)` before each call, `wrap_encode` on its encoder."""
    calls: list[str] = []
    real = node.runner

    def runner(job: Any, on_step: Any, should_stop: Any) -> Any:
        calls.append(job.task_id)
        on_call(job.task_id)
        return wrap_encode(job.task_id, real(job, on_step, should_stop))

    node.runner = runner
    return calls


def test_the_next_pipeline_call_starts_while_the_previous_image_is_still_being_encoded(
        broker_factory, tiny_models: Path) -> None:
    bt = broker_factory()
    node, thread = running_node(bt.backend, tiny_models, "prefetching", liveness=1000)
    second_started = threading.Event()
    overlapped: list[bool] = []

    def slow_encode(task_id: str, encode: Any) -> Any:
        def held() -> Any:
            if not overlapped:  # the first image: encode only once the next call has begun (or 30 s passed)
                overlapped.append(second_started.wait(30))
            return encode()
        return held

    calls = watch_runner(node, lambda _task_id: len(calls) > 1 and second_started.set(), slow_encode)
    client = BrokerClient(bt.frontend, context=bt.context).start()
    try:
        wait_until(lambda: len(bt.broker.nodes) == 1, 30)
        ids = [client.request(w.Submit(0, TaskSpec("flux1-dev", "text2img", 0, SMALL), "k")).header.task_id
               for _ in range(2)]
        wait_until(lambda: all(bt.broker.tasks[t].state == w.COMPLETED for t in ids), 60, what="both tasks")
        assert overlapped == [True], "the second job did not start while the first image was being encoded"
        assert calls == ids and all(bt.broker.journal.result(t)[:8] == b"\x89PNG\r\n\x1a\n" for t in ids)
        assert [bt.broker.tasks[t].attempts for t in ids] == [1, 1]
    finally:
        client.close()
        node.stop()
        thread.join(timeout=30)


def test_a_waiting_job_is_cancelled_or_given_back_on_stop_without_reaching_the_pipeline(
        broker_factory, tiny_models: Path) -> None:
    bt = broker_factory()
    node, thread = running_node(bt.backend, tiny_models, "holding", liveness=1000)
    calls = watch_runner(node, lambda _task_id: None, lambda _task_id, encode: encode)
    client = BrokerClient(bt.frontend, context=bt.context).start()
    try:
        wait_until(lambda: len(bt.broker.nodes) == 1, 30)
        long, cancelled, kept = (client.request(w.Submit(0, TaskSpec("flux1-dev", "text2img", 0, p), "k"))
                                 .header.task_id for p in (LONG, SMALL, SMALL))
        wait_until(lambda: node.slot.waiting() == [cancelled], 30, 0.01, "a job to wait behind the long one")
        assert bt.broker.tasks[cancelled].status == w.QUEUED and bt.broker.tasks[cancelled].node is not None
        assert client.request(w.CancelTask(0, cancelled)).header.body.task.status == w.CANCELLED
        wait_until(lambda: node.slot.waiting() == [kept], 30, 0.01, "the freed place to take the next job")
        node.stop()  # the long job stops at its next step; the waiting one is given back unstarted
        thread.join(timeout=30)
        assert not thread.is_alive()
        wait_until(lambda: bt.broker.tasks[kept].state == w.QUEUED and bt.broker.tasks[long].state == w.QUEUED,
                   10, what="both to be back in line")
        assert calls == [long]  # neither the cancelled nor the given-back job ran a step
        assert (bt.broker.tasks[kept].attempts, bt.broker.tasks[long].attempts) == (0, 0)
    finally:
        client.close()
        node.stop()
        thread.join(timeout=30)


class RouterNode:
    """A real Node (threads, slot, sockets) with a fake runner, registered to a bare ROUTER the test drives."""

    def __init__(self, ctx: Any, runner: Callable[..., Any], batch_runner: Callable[..., Any] | None = None,
                 **config: Any) -> None:
        import zmq

        import gpu_node.generate  # noqa: F401  (imported now, so that the worker runs a job at once)
        from gpu_node.config import NodeConfig
        from gpu_node.node import Capabilities, Node

        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        caps = Capabilities(models={"flux1-dev": ["text2img"]}, memory_total=1, memory_free=1, loaded=[])
        self.node = Node(NodeConfig(broker=f"tcp://127.0.0.1:{port}", prefetch=1, **config), runner,
                         lambda _full: caps, context=ctx, batch_runner=batch_runner)
        self.thread = threading.Thread(target=self.node.run, daemon=True)
        self.thread.start()
        self.identity, self.ready = self.next(w.READY)

    def next(self, *commands: bytes) -> tuple[bytes, w.Message]:
        """The node's next message of one of these commands (others skipped)."""
        while self.router.poll(10_000):
            identity, msg = w.split_routed(self.router.recv_multipart())
            if msg.command in commands:
                return identity, msg
        raise AssertionError(f"no {[w.COMMAND_NAMES[c] for c in commands]} from the node")

    def job(self, task_id: str, run: str = "", riders: list[w.Rider] | tuple = ()) -> None:
        """Send it a JOB (with `riders` to run in the same pipeline call)."""
        self.router.send_multipart(w.routed(self.identity, w.Job(task_id, "flux1-dev", "text2img", SMALL, run=run,
                                                                 riders=list(riders))))

    def send(self, header: Any) -> None:
        """Send it any broker message."""
        self.router.send_multipart(w.routed(self.identity, header))

    def close(self) -> None:
        """Stop the node (joined with a timeout) and close the router."""
        self.node.stop()
        self.thread.join(timeout=10)
        self.router.close(linger=0)


def test_a_node_whose_broker_falls_silent_gives_back_its_waiting_job_at_once(ctx) -> None:
    from gpu_node.errors import Cancelled

    ran: list[str] = []

    def runner(job: Any, _on_step: Any, should_stop: Any) -> Any:
        ran.append(job.task_id)
        while not should_stop():  # runs until the node gives it up
            threading.Event().wait(0.01)
        raise Cancelled(job.task_id)

    # It re-registers one heartbeat interval after it gives up: time enough to start a waiting job.
    r = RouterNode(ctx, runner, node_id="quiet", heartbeat_interval=0.5, liveness=2, reconnect_max=0.5)
    try:
        r.job("one")
        r.job("two")
        wait_until(lambda: r.node.slot.running == "one" and r.node.slot.waiting() == ["two"], 10, 0.01)
        # From here the broker says nothing: the node gives up both jobs and re-registers.
        ready = r.next(w.READY)[1]
        assert "two" in ready.header.reports and ready.header.busy_task is None
        reports = {}
        while set(reports) != {"one", "two"}:
            msg = r.next(w.ERROR)[1]
            reports[msg.header.task_id] = msg.header.code
        assert reports == {"one": "abandoned", "two": "recalled"}
        assert ran == ["one"], "the waiting job started after the broker fell silent"
    finally:
        r.close()


def test_a_job_sent_again_is_not_run_twice_and_reports_as_its_latest_assignment(ctx) -> None:
    from gpu_node.errors import Cancelled
    from tests.fakes import META, png_bytes

    release = threading.Event()
    ran: list[str] = []

    def runner(job: Any, _on_step: Any, should_stop: Any) -> Any:
        ran.append(job.task_id)
        while not release.wait(0.01):
            if should_stop():
                raise Cancelled(job.task_id)
        return lambda: (png_bytes(), META)

    r = RouterNode(ctx, runner, node_id="again", heartbeat_interval=0.2, liveness=50)
    try:
        r.job("one", "run-1")
        r.job("two", "run-2")
        wait_until(lambda: r.node.slot.running == "one" and r.node.slot.waiting() == ["two"], 10, 0.01)
        r.job("one", "run-3")  # sent again while it runs: no NODE_BUSY, no second run
        r.job("two", "run-4")  # and while it waits
        release.set()
        reports = {}
        for _ in range(2):
            msg = r.next(w.RESULT, w.ERROR)[1]
            reports[msg.header.task_id] = (w.COMMAND_NAMES[msg.command], msg.header.run)
        assert reports == {"one": ("RESULT", "run-3"), "two": ("RESULT", "run-4")}
        r.router.send_multipart(w.routed(r.identity, w.ResultAck("two")))  # one's acknowledgement is lost
        r.job("one", "run-5")  # so it is sent again: the node answers with the image it kept, and runs nothing
        msg = r.next(w.RESULT, w.ERROR)[1]
        assert (msg.command, msg.header.task_id, msg.header.run) == (w.RESULT, "one", "run-5") and msg.blobs
        assert ran == ["one", "two"], "a job sent again ran again"
    finally:
        r.close()


def test_a_job_that_comes_while_the_last_image_is_encoded_says_when_it_starts(ctx) -> None:
    from tests.fakes import META, png_bytes

    encoding = threading.Event()
    go_on = threading.Event()

    def runner(job: Any, _on_step: Any, _should_stop: Any) -> Any:
        def encode() -> Any:
            if job.task_id == "first":
                encoding.set()
                go_on.wait(10)
            return png_bytes(), META
        return encode

    r = RouterNode(ctx, runner, node_id="order", heartbeat_interval=0.2, liveness=50)
    messages: list[tuple[str, str, int | None]] = []
    try:
        r.job("first", "r1")
        assert encoding.wait(10)  # nothing waited behind it: the worker encodes it itself
        r.job("second", "r2")
        wait_until(lambda: r.node.slot.waiting() == ["second"], 10, 0.01)
        go_on.set()
        while ("RESULT", "second", None) not in messages:
            msg = r.next(w.PROGRESS, w.RESULT)[1]
            messages.append((w.COMMAND_NAMES[msg.command], msg.header.task_id, getattr(msg.header, "step", None)))
        assert ("PROGRESS", "first", 0) not in messages  # it came to an idle node: no start notice
        assert messages.index(("PROGRESS", "second", 0)) < messages.index(("RESULT", "second", None))
    finally:
        r.close()
