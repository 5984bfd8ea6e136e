"""LoRA affinity: a node whose slots hold a task's LoRA set gets it first, within a slack.

The node reports the set resident per loaded model (in RESULT and HEARTBEAT); the broker keys
each queued task by its set (genserve.spec.lora_set_key) and the dispatch plan asks the queue
for that node's set first. Pure dispatch tests, then the broker on real sockets with fake nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.dispatch import plan
from broker.queue import TaskQueue
from genserve import wire as w
from genserve.spec import LoraRef, lora_set_key
from http_front.broker_client import BrokerClient
from tests.conftest import wait_until
from tests.fakes import META, FakeNode, png_bytes
from tests.test_broker import spec, submit

CAT = [LoraRef("cat.safetensors", 0.8)]
INK = [LoraRef("ink.safetensors", 1.0)]


@dataclass(eq=False)
class N:
    name: str
    loaded: list[str]
    lora_sets: dict[str, str] = field(default_factory=dict)
    models: dict[str, list[str]] = field(default_factory=lambda: {"m": ["text2img"]})


def test_the_set_key_names_loras_and_weights_in_order() -> None:
    assert lora_set_key([]) == ""
    assert lora_set_key(CAT + INK) == '[["cat.safetensors",0.8],["ink.safetensors",1.0]]'
    assert lora_set_key(CAT + INK) != lora_set_key(INK + CAT) != lora_set_key([LoraRef("cat.safetensors", 0.9)])
    tricky = [LoraRef('a",1.0],["b', 2.0)]  # a name that spells out two LoRAs must not equal them
    assert lora_set_key(tricky) != lora_set_key([LoraRef("a", 1.0), LoraRef("b", 2.0)])


def queue(lora_slack: float | None) -> TaskQueue:
    q = TaskQueue(affinity_window=3600.0, affinity_slack=10.0, lora_slack=lora_slack)
    q.push("ink-first", "m", 0, 1, now=0.0, lora=lora_set_key(INK))
    q.push("cat-second", "m", 0, 2, now=0.0, lora=lora_set_key(CAT))
    return q


def test_a_node_holding_a_set_takes_the_task_with_that_set_within_the_slack() -> None:
    holds_cat, empty = N("holds-cat", ["m"], {"m": lora_set_key(CAT)}), N("empty", ["m"])
    picks = {n.name: e.task_id for n, e in plan(queue(1.0), [holds_cat, empty], now=1.0)}
    assert picks == {"holds-cat": "cat-second", "empty": "ink-first"}
    picks = {n.name: e.task_id for n, e in plan(queue(None), [holds_cat], now=1.0)}
    assert picks == {"holds-cat": "ink-first"}  # off: fair-share order alone


def test_the_slack_bounds_how_far_the_set_may_jump_ahead() -> None:
    q = TaskQueue(affinity_window=3600.0, affinity_slack=10.0, lora_slack=1.0)
    for i in range(3):  # three standard jobs of one key before the cat task of the same key
        q.push(f"ink-{i}", "m", 0, i + 1, now=0.0, owner="k", lora=lora_set_key(INK))
    q.push("cat", "m", 0, 9, now=0.0, owner="k", lora=lora_set_key(CAT))
    holds_cat = N("holds-cat", ["m"], {"m": lora_set_key(CAT)})
    assert [e.task_id for _, e in plan(q, [holds_cat], now=1.0)] == ["ink-0"]  # 3 jobs later: too far


def test_the_broker_gives_a_node_the_task_whose_set_its_result_said_it_holds(broker_factory, ctx) -> None:
    bt = broker_factory(liveness=100)  # the fake nodes do not heartbeat
    client = BrokerClient(bt.frontend, timeout=2.0, context=ctx).start()
    x, y = FakeNode(ctx, bt.backend, "x", loaded=["flux1-dev"]), FakeNode(ctx, bt.backend, "y", loaded=["flux1-dev"])
    try:
        x.ready(), y.ready()
        wait_until(lambda: len(bt.broker.nodes) == 2, 5)
        first = {submit(client, spec()), submit(client, spec())}  # both nodes busy
        running = {node.name: node.recv_job().header.task_id for node in (x, y)}
        assert set(running.values()) == first
        ink = submit(client, spec(loras=INK))
        cat = submit(client, spec(loras=CAT))  # later, but x will hold its set
        x.send(w.Result(running["x"], META, loaded=["flux1-dev"], lora_sets={"flux1-dev": lora_set_key(CAT)}),
               [png_bytes()])
        assert x.recv_job().header.task_id == cat
        assert bt.broker.nodes.find("x").lora_sets == {"flux1-dev": lora_set_key(CAT)}
        y.heartbeat(idle=False, lora_sets={})
        y.finish(running["y"])
        assert y.recv_job().header.task_id == ink
    finally:
        x.close()
        y.close()
        client.close()


def test_the_per_set_queues_go_when_their_tasks_do() -> None:
    q = TaskQueue(affinity_window=3600.0, affinity_slack=10.0, lora_slack=1.0)
    for i in range(500):  # every task its own set, as distinct weights make them
        key = lora_set_key([LoraRef("cat.safetensors", 1.0 + i / 1000)])
        q.push(f"t{i}", "m", 0, i + 1, now=0.0, owner=f"k{i % 3}", lora=key)
        if i % 2:
            q.take(f"t{i}")
        elif i % 4 == 0:
            q.charge(f"k{i % 3}", 0, 10.0)  # leaves stale entries behind
    for i in range(0, 500, 2):
        q.remove(f"t{i}")
    assert len(q) == 0 and q._lora_heaps == {} and q._per_lora == {}
