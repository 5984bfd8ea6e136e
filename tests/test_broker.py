"""The broker on real tcp://127.0.0.1 sockets, with protocol-speaking fake nodes."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import zmq

from genserve import errors as e
from genserve import wire as w
from genserve.spec import GenerationParams, TaskSpec
from http_front.broker_client import BrokerClient, BrokerError
from http_front.waits import wait_for_task
from tests.conftest import wait_until
from tests.fakes import FakeNode, png_bytes


def spec(model: str = "flux1-dev", mode: str = "text2img", priority: int = 0, **params: Any) -> TaskSpec:
    fields = {"prompt": "x", "width": 16, "height": 16, "num_inference_steps": 4, "seed": 1, "cfg": 3.5,
              "strength": 0.8, **params}
    return TaskSpec(model, mode, priority, GenerationParams(**fields))



def submit(client: BrokerClient, task: TaskSpec, watch: bool = False, owner: str = "k") -> str:
    return client.request(w.Submit(0, task, owner, watch=watch)).header.task_id


def test_no_node_is_refused_at_once_and_unknown_model_names_served(parts) -> None:
    bt, client, node = parts
    with pytest.raises(BrokerError) as err:
        submit(client, spec())
    assert err.value.code == e.NO_NODE
    node("n1").ready()
    wait_until(lambda: len(bt.broker.nodes) == 1, 5)
    with pytest.raises(BrokerError) as err:
        submit(client, spec(model="sdxl"))
    assert err.value.code == e.UNKNOWN_MODEL and err.value.extra["served"] == ["flux1-dev"]
    with pytest.raises(BrokerError) as err:
        submit(client, spec(mode="fill"))
    assert err.value.code == e.UNSUPPORTED_MODE
    assert len(bt.broker.tasks) == 0  # nothing was accepted


def test_priority_order_when_a_node_becomes_free(parts) -> None:
    bt, client, node = parts
    n = node("n1").ready()
    wait_until(lambda: len(bt.broker.nodes) == 1, 5)
    blocker = submit(client, spec())
    assert n.recv_job().header.task_id == blocker
    ids = {prio: submit(client, spec(priority=prio)) for prio in (5, 0, 9, -3)}
    same = submit(client, spec(priority=0))
    n.finish(blocker)
    order = []
    for _ in range(5):
        job = n.recv_job()
        order.append(job.header.task_id)
        n.finish(job.header.task_id)
    assert order == [ids[-3], ids[0], same, ids[5], ids[9]]


def test_only_capable_nodes_receive_a_task(parts) -> None:
    bt, client, node = parts
    dev = node("dev", models={"flux1-dev": ["text2img"]}).ready()
    fill = node("fill", models={"flux1-fill-dev": ["text2img", "img2img", "fill"]}).ready()
    wait_until(lambda: len(bt.broker.nodes) == 2, 5)
    t_fill = submit(client, spec(model="flux1-fill-dev", mode="fill"))
    t_dev = submit(client, spec())
    assert fill.recv_job().header.task_id == t_fill
    assert dev.recv_job().header.task_id == t_dev
    assert dev.recv_job(timeout=0.3) is None and fill.recv_job(timeout=0.3) is None


def test_result_is_pushed_to_the_watching_front_and_fetchable(parts) -> None:
    bt, client, node = parts
    n = node("n1").ready()
    wait_until(lambda: len(bt.broker.nodes) == 1, 5)
    png = png_bytes((1, 2, 3))
    task_id = submit(client, spec(), watch=True)
    future = client.watch(task_id)
    job = n.recv_job()
    n.send(w.ProgressReport(task_id, 2, 4))
    wait_until(lambda: client.request(w.Status(0, task_id)).header.body.task.progress
               == w.Progress(2, 4), 5)
    n.finish(job.header.task_id, png)
    done = wait_for_task(client, task_id, future, timeout=5)
    assert done.header.task.status == w.COMPLETED and done.blobs == [png]
    fetched = client.request(w.Fetch(0, task_id))
    assert fetched.header.body.task.status == w.COMPLETED and fetched.blobs == [png]


def test_images_travel_as_blobs_to_the_node(parts) -> None:
    bt, client, node = parts
    n = node("n1").ready()
    wait_until(lambda: len(bt.broker.nodes) == 1, 5)
    img = png_bytes((9, 9, 9))
    client.request(w.Submit(0, spec(mode="img2img"), "k", ["input_image"]), [img])
    job = n.recv_job()
    assert job.header.images == ["input_image"] and job.blobs == [img]
    with pytest.raises(BrokerError):  # names and blobs must agree
        client.request(w.Submit(0, spec(mode="img2img"), "k", ["input_image", "mask_image"]), [img])


def test_malformed_front_message_gets_an_error_and_broker_keeps_serving(parts, ctx) -> None:
    bt, client, node = parts
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(bt.frontend)
    try:
        raw.send_multipart([b"junk"])
        assert raw.poll(2000)
        assert w.decode(raw.recv_multipart()).command == w.FAIL
        raw.send_multipart([w.VERSION, w.SUBMIT, msgspec.msgpack.encode({"req": 1, "task": "not a map"})])
        assert raw.poll(2000)
        refused = w.decode(raw.recv_multipart()).header
        assert refused.code == e.PROTOCOL and refused.req == 1 and "SUBMIT" in refused.message
        raw.send_multipart([b"GS1", w.SUBMIT, msgspec.msgpack.encode({"req": 2})])  # another version
        assert raw.poll(2000)
        old = w.decode(raw.recv_multipart()).header
        assert old.code == e.PROTOCOL and "GS1" in old.message and old.req == 2
    finally:
        raw.close(linger=0)
    assert isinstance(client.request(w.InfoRequest(0)).header.body, w.InfoBody)


def test_silent_node_expires_and_its_task_goes_to_another(parts) -> None:
    bt, client, node = parts
    a = node("a").ready()
    wait_until(lambda: len(bt.broker.nodes) == 1, 5)
    task_id = submit(client, spec())
    assert a.recv_job().header.task_id == task_id
    b = node("b").ready()  # a now falls silent
    job = None
    for _ in range(40):
        b.heartbeat()
        job = b.recv_job(timeout=0.1)
        if job:
            break
    assert job is not None and job.header.task_id == task_id and job.header.attempt == 2
    a.finish(task_id, png_bytes((255, 0, 0)))  # late result from the expired node: discarded
    b.finish(task_id, png_bytes((0, 255, 0)))
    wait_until(lambda: client.request(w.Status(0, task_id)).header.body.task.status == w.COMPLETED, 5)
    assert client.request(w.Fetch(0, task_id)).blobs == [png_bytes((0, 255, 0))]


def test_queued_and_completed_tasks_survive_a_broker_restart(broker_factory, ctx, tmp_path) -> None:
    bt = broker_factory()
    client = BrokerClient(bt.frontend, context=ctx).start()
    n = FakeNode(ctx, bt.backend, "n1").ready()
    try:
        wait_until(lambda: len(bt.broker.nodes) == 1, 5)
        first = submit(client, spec())
        n.finish(n.recv_job().header.task_id)
        wait_until(lambda: bt.broker.tasks[first].state == w.COMPLETED, 5)
        running = submit(client, spec())
        assert n.recv_job().header.task_id == running
        queued = submit(client, spec(priority=3))
    finally:
        n.close()
        client.close()
    bt.close()  # the journal is all that remains

    bt2 = broker_factory()
    client = BrokerClient(bt2.frontend, context=ctx).start()
    n2 = FakeNode(ctx, bt2.backend, "n2").ready()
    try:
        assert client.request(w.Status(0, first)).header.body.task.status == w.COMPLETED
        assert client.request(w.Fetch(0, first)).blobs == [png_bytes()]
        seen = []
        for _ in range(40):
            n2.heartbeat()
            job = n2.recv_job(timeout=0.1)
            if job is not None:
                seen.append(job.header.task_id)
                n2.finish(job.header.task_id)
            if len(seen) == 2:
                break
        # The running task is held for the recovery grace (its node may still be computing it).
        assert seen == [queued, running]
    finally:
        n2.close()
        client.close()


def test_a_node_with_the_model_loaded_is_preferred(parts) -> None:
    bt, client, node = parts
    cold = node("cold", loaded=[]).ready()
    warm = node("warm", loaded=["flux1-dev"]).ready()
    wait_until(lambda: len(bt.broker.nodes) == 2, 5)
    task_id = submit(client, spec())
    assert warm.recv_job().header.task_id == task_id
    assert cold.recv_job(timeout=0.3) is None


def test_drained_node_gets_no_new_task(parts) -> None:
    bt, client, node = parts
    a = node("a").ready()
    wait_until(lambda: len(bt.broker.nodes) == 1, 5)
    client.request(w.Admin(0, "drain", "a"))
    task_id = submit(client, spec())
    assert a.recv_job(timeout=0.3) is None
    a.heartbeat()  # stay alive like a real node
    assert bt.broker.tasks[task_id].state == w.QUEUED
    client.request(w.Admin(0, "undrain", "a"))
    assert a.recv_job().header.task_id == task_id
    with pytest.raises(BrokerError):
        client.request(w.Admin(0, "drain", "nobody"))


def test_after_a_broker_restart_the_node_still_running_a_task_keeps_it(broker_factory, ctx) -> None:
    bt = broker_factory()
    client = BrokerClient(bt.frontend, context=ctx).start()
    a = FakeNode(ctx, bt.backend, "a").ready()
    try:
        wait_until(lambda: len(bt.broker.nodes) == 1, 5)
        task_id = submit(client, spec())
        assert a.recv_job().header.task_id == task_id
    finally:
        client.close()
    bt.close()
    bt2 = broker_factory()
    client = BrokerClient(bt2.frontend, context=ctx).start()
    b = FakeNode(ctx, bt2.backend, "b").ready()  # an idle node that must not get the task
    a.close()
    a = FakeNode(ctx, bt2.backend, "a").ready(busy_task=task_id)
    try:
        wait_until(lambda: bt2.broker.tasks[task_id].node_id == "a", 5)
        for _ in range(10):
            a.heartbeat()
            b.heartbeat()
            assert b.recv_job(timeout=0.1) is None
        a.finish(task_id)
        wait_until(lambda: bt2.broker.tasks[task_id].state == w.COMPLETED, 5)
        assert bt2.broker.tasks[task_id].attempts == 1
    finally:
        a.close()
        b.close()
        client.close()


def test_retries_are_bounded_then_the_task_fails_clearly(broker_factory, ctx) -> None:
    bt = broker_factory(max_retries=2)
    client = BrokerClient(bt.frontend, context=ctx).start()
    try:
        task_id = None
        for attempt in range(3):
            n = FakeNode(ctx, bt.backend, f"n{attempt}").ready()
            wait_until(lambda: bt.broker.nodes.find(f"n{attempt}") is not None, 5)
            if task_id is None:
                task_id = submit(client, spec())
            job = n.recv_job(timeout=5)
            assert job.header.task_id == task_id and job.header.attempt == attempt + 1
            n.close()  # dies silently
            wait_until(lambda: bt.broker.nodes.find(f"n{attempt}") is None, 5)
        task = client.request(w.Status(0, task_id)).header.body.task
        assert task.status == w.FAILED and task.error_code == e.NODE_LOST and "3 attempts" in task.error
    finally:
        client.close()


def test_an_abandoned_job_goes_back_to_the_queue(parts) -> None:
    bt, client, node = parts
    a = node("a").ready()
    wait_until(lambda: len(bt.broker.nodes) == 1, 5)
    task_id = submit(client, spec())
    assert a.recv_job().header.task_id == task_id
    a.send(w.Error(task_id, e.ABANDONED, "lost the broker"))
    job = a.recv_job()
    assert job.header.task_id == task_id and job.header.attempt == 2


def test_results_are_deleted_after_the_retention_time(broker_factory, ctx) -> None:
    bt = broker_factory(result_ttl=0.5)
    client = BrokerClient(bt.frontend, context=ctx).start()
    n = FakeNode(ctx, bt.backend, "n").ready()
    try:
        wait_until(lambda: len(bt.broker.nodes) == 1, 5)
        task_id = submit(client, spec())
        n.finish(n.recv_job().header.task_id)
        assert wait_until(lambda: client.request(w.Fetch(0, task_id)).blobs, 5)
        def purged() -> bool:
            n.heartbeat()
            try:
                client.request(w.Status(0, task_id))
            except BrokerError as exc:
                return exc.code == e.NOT_FOUND
            return False
        wait_until(purged, 10, 0.1, "the result to be purged")
        assert bt.broker.journal.result(task_id) is None
    finally:
        n.close()
        client.close()


def test_a_node_still_unwinding_gets_no_job_until_it_reports_idle(parts) -> None:
    bt, client, node = parts
    a = node("a").ready(busy=True)  # re-registered while stopping an abandoned job
    wait_until(lambda: len(bt.broker.nodes) == 1, 5)
    task_id = submit(client, spec())
    for _ in range(3):
        a.heartbeat(idle=False)
        assert a.recv_job(timeout=0.1) is None
    a.heartbeat(idle=True)
    assert a.recv_job().header.task_id == task_id


def test_heartbeats_refresh_the_lora_list(parts) -> None:
    bt, client, node = parts
    a = node("a").ready()
    wait_until(lambda: len(bt.broker.nodes) == 1, 5)
    lora = w.LoraInfo("new.safetensors", 1.0, "root")
    a.heartbeat(loras=[lora])
    wait_until(lambda: client.request(w.InfoRequest(0)).header.body.nodes[0].loras == [lora], 5)
    a.heartbeat(loras=None)  # a light heartbeat leaves the list alone
    a.heartbeat()
    # Heartbeats are handled in order: once this marker shows, the two above were handled too.
    a.heartbeat(memory_free=12345)
    wait_until(lambda: client.request(w.InfoRequest(0)).header.body.nodes[0].memory_free == 12345, 5)
    assert client.request(w.InfoRequest(0)).header.body.nodes[0].loras == [lora]


def test_disk_budget_evicts_old_results_then_refuses_with_disk_full(broker_factory, ctx) -> None:
    from broker.tasks import result_reserve

    small = {"width": 16, "height": 16}
    bt = broker_factory(disk_budget_bytes=2 * result_reserve(spec(**small).params) + 50)  # < 2 reservations + a result
    client = BrokerClient(bt.frontend, context=ctx).start()
    n = FakeNode(ctx, bt.backend, "n").ready()
    try:
        wait_until(lambda: len(bt.broker.nodes) == 1, 5)
        old = submit(client, spec(**small))
        n.finish(n.recv_job().header.task_id)
        wait_until(lambda: client.request(w.Fetch(0, old)).blobs == [png_bytes()], 5)
        running = submit(client, spec(**small))
        assert n.recv_job().header.task_id == running
        submit(client, spec(**small))  # fits once the old result is evicted
        fetched = client.request(w.Fetch(0, old))
        assert fetched.blobs == [] and fetched.header.body.task.status == w.COMPLETED
        assert fetched.header.body.task.result_expired is True
        with pytest.raises(BrokerError) as err:
            submit(client, spec(**small))  # only unfinished tasks hold the disk now
        assert err.value.code == e.DISK_FULL
        n.finish(running)
        wait_until(lambda: bt.broker.tasks[running].state == w.COMPLETED, 5)
        submit(client, spec(**small))  # the finished result can make room again
    finally:
        n.close()
        client.close()


def test_a_result_finished_while_the_broker_was_down_is_adopted_once(broker_factory, ctx) -> None:
    bt = broker_factory()
    clients = [BrokerClient(bt.frontend, timeout=2.0, context=ctx).start()]
    a = FakeNode(ctx, bt.backend, "a").ready()
    b = None
    try:
        wait_until(lambda: len(bt.broker.nodes) == 1, 5)
        task_id = submit(clients[0], spec())
        assert a.recv_job().header.task_id == task_id
        bt.close()  # the broker dies while node a computes
        bt = broker_factory(frontend=bt.frontend, backend=bt.backend, recovery_grace=30.0)  # held for a
        b = FakeNode(ctx, bt.backend, "b").ready()
        a.ready(reports=[task_id])  # a re-registers idle (it finished meanwhile), then re-sends the report it kept
        a.finish(task_id)
        ack = a.recv()
        assert ack is not None and ack.command == w.RESULT_ACK and ack.header.task_id == task_id
        wait_until(lambda: bt.broker.tasks[task_id].state == w.COMPLETED, 5)
        clients.append(BrokerClient(bt.frontend, timeout=2.0, context=ctx).start())
        assert clients[-1].request(w.Fetch(0, task_id)).blobs == [png_bytes()]
        a.finish(task_id)  # a duplicate report changes nothing, and is acknowledged again
        again = a.recv()
        assert again is not None and again.command == w.RESULT_ACK and bt.broker.tasks[task_id].attempts == 1
        assert b.recv_job(timeout=0.3) is None  # nobody runs it again
    finally:
        for sock in (a, b):
            if sock is not None:
                sock.close()
        for client in clients:
            client.close()


def test_a_stopping_nodes_abandoned_task_costs_no_attempt(parts) -> None:
    bt, client, node = parts
    a = node("a").ready()
    wait_until(lambda: len(bt.broker.nodes) == 1, 5)
    task_id = submit(client, spec())
    assert a.recv_job().header.attempt == 1
    a.heartbeat(idle=False, leaving=True)
    a.send(w.Error(task_id, e.ABANDONED, "stopping"))
    b = node("b").ready()
    job = b.recv_job()
    assert job.header.task_id == task_id and job.header.attempt == 1
    assert a.recv_job(timeout=0.5) is None  # a leaving node gets no new work


def test_a_front_that_stops_reading_never_blocks_the_broker(parts, ctx) -> None:
    bt, client, node = parts
    bt.broker.frontend.setsockopt(zmq.SNDHWM, 4)  # for connections made from now on
    stuck = ctx.socket(zmq.DEALER)
    stuck.setsockopt(zmq.LINGER, 0)
    stuck.setsockopt(zmq.RCVHWM, 4)
    stuck.connect(bt.frontend)
    try:
        for req in range(200):  # asks and never reads a reply
            stuck.send_multipart(w.encode(w.InfoRequest(req)))
        for _ in range(3):  # the broker still answers everyone else
            assert isinstance(client.request(w.InfoRequest(0)).header.body, w.InfoBody)
    finally:
        stuck.close(linger=0)


def test_a_result_whose_header_claims_a_giant_image_fails_the_task_cleanly(parts) -> None:
    import struct
    import zlib

    bt, client, node = parts
    a = node("a").ready()
    wait_until(lambda: len(bt.broker.nodes) == 1, 5)
    task_id = submit(client, spec())
    assert a.recv_job().header.task_id == task_id

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")
    a.send(w.Result(task_id, w.ResultMeta(0.1, 40000, 40000, 1, 2, "fake")), [bomb])
    ack = a.recv()
    assert ack.command == w.RESULT_ACK
    task = client.request(w.Status(0, task_id)).header.body.task
    assert task.status == "failed" and "invalid result" in task.error


def test_a_node_unwinding_a_cancelled_task_is_freed_by_that_tasks_report_not_another(patient_parts) -> None:
    bt, client, node = patient_parts
    a = node("a").ready()
    wait_until(lambda: len(bt.broker.nodes) == 1, 5)
    done = submit(client, spec())
    done_run = a.recv_job().header.run
    a.finish(done, run=done_run)
    wait_until(lambda: bt.broker.tasks[done].state == w.COMPLETED, 5)
    running = submit(client, spec(seed=2))
    run = a.recv_job().header.run
    client.request(w.CancelTask(0, running))  # the node stops it at its next step
    more = submit(client, spec(seed=3))
    a.finish(done, run=done_run)  # a report sent again (its acknowledgement was lost) ends nothing
    assert a.recv_job(timeout=0.3) is None, "a stray report freed a node still unwinding its cancelled task"
    a.error(running, e.CANCELLED, run=run)
    assert a.recv_job().header.task_id == more
    # The same after it registers again while still stopping a task it gave up: only that task's report frees it.
    other = submit(client, spec(seed=4))
    a.ready(busy=True, reports=[more, done], unwinding=[more])
    a.finish(done, run=done_run)
    assert a.recv_job(timeout=0.3) is None, "a stray report freed a node still unwinding what it gave up"
    a.error(more, e.ABANDONED)
    assert a.recv_job().header.task_id in (more, other)
