"""Task event streams: the broker's subscriptions (units, then real sockets with a fake node),
the front's stream through the Falcon TestClient, and two real waitress fronts for hang-ups and
Last-Event-ID resumes on another front."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from broker.events import MAX_PER_PEER, Subscriptions
from genserve import wire as w
from genserve.spec import TaskSpec
from http_front.broker_client import BrokerClient
from http_front.events import StreamSlots, TaskState, event_data, sse
from http_front.keys import KeyStore
from tests.conftest import Front, Stack, wait_until
from tests.fakes import FakeNode, params

KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdefgh",
        "root": "root-key-0123456789abcdefg"}


def as_(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def parse(text: str) -> list[dict[str, Any]]:
    """SSE text -> [{"id", "event", "data"}], comments and retry lines skipped."""
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            if name in ("id", "event", "data"):
                fields[name] = json.loads(value) if name == "data" else value
        if "event" in fields:
            events.append(fields)
    return events


def view(status: str = w.QUEUED, position: int | None = 0, step: int | None = None,
         node: str | None = None) -> w.TaskView:
    return w.TaskView(task_id="t1", status=status, model_id="flux1-dev", mode="text2img", priority=0,
                      owner="o", params=params(), created_at=1.0, node_id=node, queue_position=position,
                      progress=w.Progress(step, 8) if step is not None else None)


# ---- units ------------------------------------------------------------------------------


def test_subscriptions_count_per_front_and_forget_on_end() -> None:
    subs = Subscriptions(start_ms=100)
    assert subs.add("t1", b"A") and subs.add("t1", b"B") and subs.add("t2", b"A")
    assert set(subs.peers("t1")) == {b"A", b"B"} and len(subs) == 2
    subs.remove("t1", b"B")
    assert subs.peers("t1") == (b"A",)
    subs.drop_peer(b"A")  # that front is gone: all its subscriptions go
    assert len(subs) == 0 and subs.peers("t2") == ()
    assert subs.next_id() == 101 and subs.last_id == 101
    assert subs.position_changed("t3", 4) and not subs.position_changed("t3", 4) and subs.position_changed("t3", 3)


def test_one_front_cannot_hold_unbounded_subscriptions() -> None:
    subs = Subscriptions()
    for i in range(MAX_PER_PEER):
        assert subs.add(f"t{i}", b"A")
    assert not subs.add("one-more", b"A") and subs.peers("one-more") == ()
    assert subs.add("one-more", b"B")  # other fronts are not affected


def test_task_state_turns_views_into_the_events_a_client_missed() -> None:
    state = TaskState.of(view(position=3))
    assert list(state.changes(view(position=3))) == []
    assert list(state.changes(view(position=1))) == ["position"]
    assert list(state.changes(view(w.RUNNING, None, 2, "n1"))) == ["running", "progress"]
    assert list(state.changes(view(w.RUNNING, None, 5, "n1"))) == ["progress"]
    assert list(state.changes(view(w.QUEUED, 0))) == ["position"]  # re-queued after its node died
    assert list(state.changes(view(w.RUNNING, None, 0, "n2"))) == ["running", "progress"]
    assert list(state.changes(view(w.COMPLETED, None, 8, "n2"))) == ["completed"]


def test_event_payloads_and_the_wire_format() -> None:
    assert event_data("progress", view(w.RUNNING, None, 3, "n1")) == {
        "task_id": "t1", "status": "running", "step": 3, "total": 8, "node_id": "n1"}
    assert event_data("position", view(position=2))["queue_position"] == 2
    text = sse("progress", {"prompt": "line one\nline two 猫"}, 7).decode()
    assert text.endswith("\n\n") and text.count("\n") == 4  # the newline inside data is escaped
    assert parse(text) == [{"id": "7", "event": "progress", "data": {"prompt": "line one\nline two 猫"}}]


def test_stream_slots_cap_globally_and_per_key() -> None:
    slots = StreamSlots(limit=3, per_key=2)
    assert slots.acquire("a") is None and slots.acquire("a") is None
    assert "this API key" in (slots.acquire("a") or "")
    assert slots.acquire("b") is None
    assert "limit 3" in (slots.acquire("c") or "")
    slots.release("a")
    assert slots.acquire("c") is None


# ---- the broker on real sockets, with a fake node -----------------------------------------



@pytest.fixture
def wired(broker_factory, ctx) -> Iterator[tuple[Any, BrokerClient, FakeNode]]:
    bt = broker_factory(heartbeat_interval=2.0)  # position checks every 0.5 s; the fake node never expires
    client = BrokerClient(bt.frontend, timeout=3.0, context=ctx).start()
    node = FakeNode(ctx, bt.backend, "n1").ready()
    wait_until(lambda: len(bt.broker.nodes) == 1, 5, what="registration")
    yield bt, client, node
    node.close()
    client.close()
    bt.close()


def submit(client: BrokerClient, steps: int = 2) -> str:
    spec = TaskSpec("flux1-dev", "text2img", 0, params(num_inference_steps=steps))
    return client.request(w.Submit(0, spec, "owner")).header.task_id


def collect(client: BrokerClient) -> list[w.Event]:
    events: list[w.Event] = []
    client.event_listeners.append(events.append)
    return events


def test_broker_pushes_position_running_progress_and_the_final_event(wired) -> None:
    bt, client, node = wired
    events = collect(client)
    first = submit(client)
    job = node.recv_job()
    assert job is not None and job.header.task_id == first
    second, third = submit(client), submit(client)
    body = client.request(w.Watch(0, [third, "no-such-task"])).header.body
    assert [v.task_id for v in body.tasks] == [third] and body.tasks[0].queue_position == 1
    node.send(w.ProgressReport(first, 1, 2))  # not subscribed to `first`: no event
    node.finish(first)
    wait_until(lambda: any(e.kind == "position" for e in events), 5, what="the position event")
    job = node.recv_job()
    assert job.header.task_id == second
    node.send(w.ProgressReport(second, 1, 2))
    node.finish(second)
    job = node.recv_job()
    assert job.header.task_id == third
    node.send(w.ProgressReport(third, 1, 2))
    node.finish(third)
    wait_until(lambda: any(e.kind == "completed" for e in events), 5, what="the final event")
    assert {e.task.task_id for e in events} == {third}
    kinds = [e.kind for e in events]
    assert kinds == ["position", "running", "progress", "completed"], kinds
    assert events[0].task.queue_position == 0
    ids = [e.event_id for e in events]
    assert ids == sorted(ids) and ids[0] > body.event_id
    assert bt.broker.subs.peers(third) == ()  # a final event ends the subscription


def test_unsubscribed_or_unreachable_fronts_get_no_more_events(wired, ctx) -> None:
    bt, client, node = wired
    events = collect(client)
    task_id = submit(client, steps=4)
    node.recv_job()
    client.request(w.Watch(0, [task_id]))
    node.send(w.ProgressReport(task_id, 1, 4))
    wait_until(lambda: events, 5, what="a progress event")
    client.request(w.Watch(0, [task_id], subscribe=False))
    node.send(w.ProgressReport(task_id, 2, 4))
    other = BrokerClient(bt.frontend, timeout=3.0, context=ctx).start()
    other.request(w.Watch(0, [task_id]))
    wait_until(lambda: len(bt.broker.subs.peers(task_id)) == 1, 5, what="the second front's subscription")
    other.close()  # gone without unsubscribing

    def dropped() -> bool:  # (the broker learns of the disconnect asynchronously: events until then)
        node.send(w.ProgressReport(task_id, 3, 4))
        return bt.broker.subs.peers(task_id) == ()
    wait_until(dropped, 5, 0.1, "the unreachable front to be dropped")
    node.finish(task_id)
    wait_until(lambda: bt.broker.tasks[task_id].final, 5, what="the task to end")
    assert [e.task.progress.step for e in events] == [1]


def test_watch_refuses_oversized_requests(wired) -> None:
    _, client, _ = wired
    from http_front.broker_client import BrokerError

    with pytest.raises(BrokerError):
        client.request(w.Watch(0, ["x"] * 5001))


# ---- the front's stream through the Falcon TestClient, on a real tiny-model node ----------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Stack]:
    keys = KeyStore.from_env([(KEYS["alice"], "alice", ("generation",)), (KEYS["bob"], "bob", ("generation",)),
                              (KEYS["root"], "root", ("admin",))], None)
    # Every step reported: tiny models run a step in milliseconds.
    s = Stack(tmp_path_factory.mktemp("events"), tiny_models, ("flux1-dev",), keys=keys,
              node_overrides={"progress_interval": 0.0}, front_overrides={"rate_limit": 1_000_000})
    yield s
    s.close()


SLOW = {"prompt": "a slow one", "width": 512, "height": 512, "num_inference_steps": 24, "async": True}


def start(stack: Stack, who: str = "alice", body: dict | None = None) -> dict:
    r = stack.http.simulate_post("/generate", json=body or SLOW, headers=as_(who))
    assert r.status_code == 202, r.text
    return r.json


def test_a_stream_follows_a_task_to_its_end(stack: Stack) -> None:
    task_id = start(stack)["task_id"]
    r = stack.http.simulate_get(f"/task/{task_id}/events", headers=as_("alice"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.startswith("retry: ")
    events = parse(r.text)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "snapshot" and kinds[-1] == "completed" and kinds.count("completed") == 1
    assert "progress" in kinds, r.text
    steps = [e["data"]["step"] for e in events if e["event"] == "progress"]
    assert steps == sorted(steps) and steps[-1] <= 24
    ids = [int(e["id"]) for e in events if "id" in e]
    assert ids == sorted(ids)
    final = events[-1]["data"]
    assert final["status"] == "completed" and "image" not in final and "image_base64" not in final
    path, _, query = final["image_url"].partition("?")
    image = stack.http.simulate_get(path, query_string=query, headers={"Authorization": ""})
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    again = parse(stack.http.simulate_get(f"/task/{task_id}/events", headers=as_("alice")).text)
    assert [e["event"] for e in again] == ["completed"]  # an ended task: just its final event


def test_queue_positions_are_streamed_while_waiting(stack: Stack) -> None:
    blocker = start(stack)["task_id"]
    wait_until(lambda: stack.http.simulate_get(f"/task/{blocker}", headers=as_("alice")).json["status"]
               == "running", 30, 0.02, "the blocker to run")
    # All bob's: a task of alice's would come after bob's first, alice having had her turn (fair share).
    # The first waits on the node behind the blocker (prefetch), the second is first in the queue.
    ahead = [start(stack, "bob", {**SLOW, "num_inference_steps": 4})["task_id"] for _ in range(2)]
    # (Another step count than theirs: it must not ride in a pipeline call with the second.)
    mine = start(stack, "bob", {**SLOW, "num_inference_steps": 3})["task_id"]
    events = parse(stack.http.simulate_get(f"/task/{mine}/events", headers=as_("bob")).text)
    kinds = [e["event"] for e in events]
    assert events[0]["event"] == "snapshot" and events[0]["data"]["queue_position"] == 1
    positions = [e["data"]["queue_position"] for e in events if e["event"] == "position"]
    assert positions == [0], kinds
    assert kinds.index("position") < kinds.index("running") < kinds.index("completed")
    assert mine not in ahead


def test_streams_are_private_and_bad_inputs_get_clear_errors(stack: Stack) -> None:
    task = start(stack, body={**SLOW, "num_inference_steps": 2})
    task_id = task["task_id"]
    assert stack.http.simulate_get(f"/task/{task_id}/events", headers=as_("bob")).status_code == 404
    assert stack.http.simulate_get("/task/no-such-task/events", headers=as_("alice")).status_code == 404
    assert stack.http.simulate_get(f"/task/{task_id}/events", headers={"Authorization": ""}).status_code == 401
    bad = stack.http.simulate_get(f"/task/{task_id}/events", headers={**as_("alice"), "Last-Event-ID": "1; DROP"})
    assert bad.status_code == 400 and bad.json["error"] == "invalid Last-Event-ID"
    path, _, query = task["events_url"].partition("?")
    assert stack.http.simulate_get(path, query_string=query.replace("sig=", "sig=x"),
                                   headers={"Authorization": ""}).status_code == 403
    other = stack.http.simulate_get(f"/task/{start(stack, 'bob', {**SLOW, 'num_inference_steps': 2})['task_id']}"
                                    "/events", query_string=query, headers={"Authorization": ""})
    assert other.status_code == 403  # a signature is for one task's path only
    signed = stack.http.simulate_get(path, query_string=query, headers={"Authorization": ""})
    assert signed.status_code == 200 and parse(signed.text)[-1]["event"] == "completed"
    assert parse(stack.http.simulate_get(f"/task/{task_id}/events", headers=as_("root")).text)[-1]["data"][
        "status"] == "completed"  # admins see every key's tasks


def test_past_the_stream_cap_a_client_is_told_to_poll(stack: Stack) -> None:
    from falcon import testing

    from http_front.app import create_app
    from http_front.config import FrontConfig

    capped = testing.TestClient(create_app(stack.client, stack.keys, FrontConfig(max_streams=0, rate_limit=1_000_000)))
    task_id = start(stack)["task_id"]
    r = capped.simulate_get(f"/task/{task_id}/events", headers=as_("alice"))
    assert r.status_code == 429 and r.headers["retry-after"] == "5" and "poll" in r.json["detail"]
    wait_until(lambda: stack.http.simulate_get(f"/task/{task_id}", headers=as_("alice")).json["status"]
               == "completed", 60, 0.05, "the task to end")
    done = capped.simulate_get(f"/task/{task_id}/events", headers=as_("alice"))
    assert done.status_code == 429  # refused before asking the broker anything, whatever the task's state


# ---- two real waitress fronts on one broker -------------------------------------------------




@pytest.fixture
def fronts(stack: Stack) -> Iterator[tuple[Front, Front]]:
    pair = (Front(stack, stream_keepalive=1.0), Front(stack))
    yield pair
    for front in pair:
        front.close()


def read_events(response: requests.Response, until: Any) -> list[dict[str, Any]]:
    """Events from a streaming response until `until(events)` is true (or the stream ends)."""
    events: list[dict[str, Any]] = []
    block: list[str] = []
    for line in response.iter_lines(decode_unicode=True):
        if line:
            block.append(line)
            continue
        events.extend(parse("\n".join(block)))
        block = []
        if until(events):
            break
    return events


def test_a_client_that_leaves_mid_task_frees_its_stream(stack: Stack, fronts) -> None:
    a, _ = fronts
    task_id = start(stack, body={**SLOW, "num_inference_steps": 100, "width": 512, "height": 512})["task_id"]
    sock, data = raw_stream(a.url, task_id)
    read_until(sock, data, b"event: progress")
    assert a.hub().open_streams == 1 and a.server.pump.open_streams == 1
    sock.close()  # hang up mid-task
    wait_until(lambda: a.hub().open_streams == 0, 15, 0.05, "the front to notice the hang-up")
    wait_until(lambda: stack.broker.broker.subs.peers(task_id) == (), 10, 0.05, "the broker subscription to end")
    assert a.server.pump.open_streams == 0
    body = requests.get(f"{a.url}/task/{task_id}", headers=as_("alice"), timeout=10).json()
    assert body["status"] == "running"  # leaving the stream does not cancel the task
    stack.http.simulate_delete(f"/task/{task_id}", headers=as_("alice"))


def test_last_event_id_resumes_on_another_front(stack: Stack, fronts) -> None:
    a, b = fronts
    task_id = start(stack, body={**SLOW, "num_inference_steps": 100})["task_id"]
    r = requests.get(f"{a.url}/task/{task_id}/events", headers=as_("alice"), stream=True, timeout=30)
    first = read_events(r, lambda ev: sum(e["event"] == "progress" for e in ev) >= 2)
    r.close()
    last_id = max(int(e["id"]) for e in first)
    last_step = max(e["data"]["step"] for e in first if e["event"] == "progress")
    r = requests.get(f"{b.url}/task/{task_id}/events", headers={**as_("alice"), "Last-Event-ID": str(last_id)},
                     stream=True, timeout=60)
    rest = read_events(r, lambda ev: ev and ev[-1]["event"] in ("completed", "failed", "cancelled"))
    r.close()
    assert rest[0]["event"] == "snapshot"  # the state now, whatever was missed
    assert int(rest[0]["id"]) >= last_id and rest[-1]["event"] == "completed"
    later = [int(e["id"]) for e in rest[1:] if "id" in e]
    assert later == sorted(later) and all(i > last_id for i in later)
    snapshot_step = (rest[0]["data"].get("progress") or {}).get("step", 0)
    assert snapshot_step >= last_step or rest[0]["data"]["status"] == "completed"


def raw_stream(url: str, task_id: str) -> tuple[socket.socket, bytes]:
    """A stream opened on a plain socket (kept open until closed), and what it read up to its snapshot."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"GET /task/{task_id}/events HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEYS['alice']}"
                 "\r\n\r\n".encode())
    data = b""
    while b"event: snapshot" not in data:
        data += sock.recv(65536)
    return sock, data


def read_until(sock: socket.socket, data: bytes, marker: bytes) -> bytes:
    while marker not in data:
        more = sock.recv(65536)
        assert more, data
        data += more
    return data


def test_streams_hold_no_server_thread(stack: Stack) -> None:
    """Ten streams on a front with four threads: each is handed to the pump after its snapshot."""
    front = Front(stack, max_streams=20)  # threads=4
    socks: list[socket.socket] = []
    stack.client.request(w.Admin(0, "drain", "test-node"))  # the tasks stay queued while streamed
    try:
        tasks = [start(stack)["task_id"] for _ in range(10)]
        opened = [raw_stream(front.url, task_id) for task_id in tasks]
        socks = [sock for sock, _ in opened]
        assert all(data.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked" in data for _, data in opened)
        wait_until(lambda: front.server.pump.open_streams == 10, 10, 0.05, "ten pumped streams")
        r = requests.get(f"{front.url}/task/{tasks[0]}", headers=as_("alice"), timeout=10)
        assert r.status_code == 200  # threads are free for other requests
        for task_id in tasks:
            stack.http.simulate_delete(f"/task/{task_id}", headers=as_("alice"))
        for sock, data in opened:
            text = read_until(sock, data, b"0\r\n\r\n")
            assert b"event: cancelled" in text and text.endswith(b"0\r\n\r\n")  # a well-formed chunked end
        wait_until(lambda: front.server.pump.open_streams == 0, 10, 0.05, "the pump to end them")
        wait_until(lambda: front.hub().open_streams == 0, 10, 0.05, "their clean-up")  # runs just after
    finally:
        stack.client.request(w.Admin(0, "undrain", "test-node"))
        for sock in socks:
            sock.close()
        front.close()


def test_the_pump_frames_chunks_keeps_alive_and_drops_slow_readers() -> None:
    from http_front.events import Closer, EventHub, EventWriter, Stream
    from http_front.pump import MAX_BUFFER, Pumped, StreamPump

    pump = StreamPump(keepalive=0.2, renew_every=60).start()
    ours, theirs = socket.socketpair()
    closed: list[str] = []
    try:
        hub = EventHub(None)  # type: ignore[arg-type]
        stream = Stream("t1")
        writer = EventWriter(view(position=3), 10, lambda v, i: b"FINAL")
        pump.adopt(Pumped(ours, True, stream, writer, hub, Closer(lambda: closed.append("closed"))))
        stream.put(w.Event("position", 11, view(position=2)))
        theirs.settimeout(5)
        data = b""
        while b": keep-alive" not in data:
            data += theirs.recv(65536)
        head, _, rest = data.partition(b"\r\n")
        size = int(head, 16)
        assert parse(rest[:size].decode())[0] == {"id": "11", "event": "position",
                                                   "data": {"task_id": "t1", "status": "queued",
                                                            "queue_position": 2, "attempts": 0}}
        stream.put(w.Event("completed", 12, view(w.COMPLETED, None)))
        while not data.endswith(b"0\r\n\r\n"):
            data += theirs.recv(65536)
        assert b"FINAL" in data and theirs.recv(10) == b""  # the final event, the last chunk, then the close
        wait_until(lambda: closed == ["closed"], 5, 0.01, "the stream's clean-up")
        # A client that never reads: ended once MAX_BUFFER bytes are waiting, its clean-up run.
        slow, slow_peer = socket.socketpair()
        slow_peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stream2 = Stream("t2")
        pump.adopt(Pumped(slow, True, stream2, EventWriter(view(position=0), 0, lambda v, i: b""), hub,
                          Closer(lambda: closed.append("slow"))))
        for i in range(1, 50_000):
            stream2.put(w.Event("position", i, view(position=i % 7 + 1)))
            if "slow" in closed:
                break
        wait_until(lambda: "slow" in closed, 10, 0.05, "the slow reader to be dropped")
        assert pump.open_streams == 0
        slow_peer.close()
        assert MAX_BUFFER > 0
    finally:
        pump.close()
        theirs.close()


def test_an_ended_tasks_stream_tells_a_reconnecting_browser_to_stop(stack: Stack) -> None:
    task_id = start(stack, body={**SLOW, "num_inference_steps": 2})["task_id"]
    wait_until(lambda: stack.http.simulate_get(f"/task/{task_id}", headers=as_("alice")).json["status"]
               == "completed", 30, 0.05, "the task to end")
    again = stack.http.simulate_get(f"/task/{task_id}/events", headers={**as_("alice"), "Last-Event-ID": "5"})
    assert again.status_code == 204 and again.text == ""  # EventSource stops reconnecting on a 204
    first = stack.http.simulate_get(f"/task/{task_id}/events", headers=as_("alice"))
    assert first.status_code == 200 and parse(first.text)[-1]["event"] == "completed"


def test_renewed_views_older_than_a_written_event_are_ignored() -> None:
    from http_front.events import EventWriter, Renewal

    writer = EventWriter(view(position=3), 100, lambda v, i: b"FINAL")
    assert b"position" in writer.feed(w.Event("position", 105, view(position=1)))
    assert writer.feed(Renewal(view(position=2), 103)) == b""  # taken before event 105
    assert b"position" in writer.feed(Renewal(view(position=0), 106))  # newer: what changed is sent
    assert writer.feed(w.Event("position", 104, view(position=2))) == b""  # an old push


def test_an_event_that_arrives_before_the_stream_is_registered_is_still_written() -> None:
    """The broker-I/O thread does not wait for the pump: a stream may be woken before the pump
    has registered it. Its events are written once it is, and the pump thread lives on."""
    from http_front.events import Closer, EventHub, EventWriter, Stream
    from http_front.pump import Pumped, StreamPump

    pump = StreamPump(keepalive=60, renew_every=60).start()
    ours, theirs = socket.socketpair()
    try:
        stream = Stream("t1")
        pumped = Pumped(ours, False, stream, EventWriter(view(position=5), 0, lambda v, e: b"END\n"),
                        EventHub(None), Closer(lambda: None))  # type: ignore[arg-type]
        stream.notify = lambda: pump._notify(pumped)  # woken before adopt() has handed it over
        stream.put(w.Event("position", 1, view(position=4)))
        time.sleep(0.2)  # the pump's pass sees it dirty and unregistered
        pump.adopt(pumped)
        stream.put(w.Event("completed", 2, view(w.COMPLETED, None)))
        theirs.settimeout(10)
        data = b""
        while not data.endswith(b"END\n"):
            more = theirs.recv(65536)
            assert more, data
            data += more
        assert b"event: position" in data and all(t.is_alive() for t in pump._threads)
    finally:
        pump.close()
        theirs.close()


def test_an_event_of_an_unknown_kind_is_refused_on_the_wire() -> None:
    good = w.encode(w.Event("progress", 3, view(w.RUNNING, None, 1, "n1")))
    assert w.decode(good).header.kind == "progress"
    forged = [good[0], good[1], good[2].replace(b"progress", b"exploded")]
    with pytest.raises(w.ProtocolError):
        w.decode(forged)
