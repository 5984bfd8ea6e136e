"""Randomized runs of the real broker's handlers against simulated nodes: placement keeps priority order.

No socket carries anything: the broker's sends are captured (`Broker._emit`) and each node's
messages are delivered in order but at random moments, interleaved with calls that end, tasks
that are cancelled and nodes that leave or join, all chosen by a seeded random generator. A
simulated node behaves as gpu_node's does: it runs one call and holds one waiting job (prefetch
1; a third of the nodes have prefetch 0 and hold none), starts the waiting job as soon as a
call ends (its step-0 PROGRESS before the last call's reports), gives back a waiting job it is
asked to recall if it has not started it, and runs a JOB's riders in the lead's call.

Every run queues all its tasks while the nodes run blockers, with every message delivered
before any call ends, and then checks at the end that:
- tasks first started in priority order, as the broker counts a start (the `started_at` clients
  see: a JOB's send for a node that runs it at once, its step-0 PROGRESS for a waiting one);
- no task ran on two nodes at once;
- every task not cancelled completed, and none completed twice on nodes that stayed.
"""

from __future__ import annotations

import errno
import random
from collections import deque
from pathlib import Path
from typing import Any

import pytest
import zmq

from broker.config import BrokerConfig
from broker.server import Broker
from genserve import errors as e
from genserve import wire as w
from tests.fakes import META, png_bytes
from tests.test_broker import spec

PNG = png_bytes()


class SimNode:
    """A node's behaviour towards the broker, one message or event at a time."""

    def __init__(self, sim: "Sim", name: str, batch: int) -> None:
        self.sim, self.name, self.batch = sim, name, batch
        self.prefetch = sim.rng.choice((0, 1, 1))
        self.identity = f"sim-{name}".encode()
        self.inbox: deque[w.Message] = deque()
        self.running: list[tuple[str, str]] | None = None  # (task, run) of the call it runs
        self.waiting: list[tuple[str, str]] | None = None  # a JOB it holds, not started
        self.cancelled: set[str] = set()
        self.alive = True

    def send(self, header: Any, blobs: list[bytes] | tuple = ()) -> None:
        """A message to the broker, handled at once."""
        self.sim.broker._handle_node(w.routed(self.identity, header, blobs))

    def register(self) -> None:
        """READY, idle, with room for one waiting job unless it has prefetch 0."""
        self.send(w.Ready(node_id=self.name, device="sim", host="h", pid=1, models={"flux1-dev": ["text2img"]},
                          loaded=["flux1-dev"], memory_total=1 << 30, memory_free=1 << 29, reports=[],
                          prefetch=self.prefetch, batch=self.batch, batch_pixels=0))

    def deliver(self) -> None:
        """Act on the oldest message from the broker."""
        msg = self.inbox.popleft()
        h = msg.header
        if msg.command == w.JOB:
            call = [(h.task_id, h.run), *((r.task_id, r.run) for r in h.riders)]
            assert len(call) <= self.batch, f"{self.name} got {len(call)} tasks in one JOB, batch {self.batch}"
            if self.running is None:
                self.start(call)
            elif self.waiting is None:
                assert self.prefetch, f"{self.name} (prefetch 0) got a job while it runs one"
                self.waiting = call
            else:  # the broker counted on a place that a late JOB took (as gpu_node does: NODE_BUSY, unstarted)
                self.sim.refused += 1
                for task_id, run in call:
                    self.send(w.Error(task_id, e.NODE_BUSY, "busy", run=run))
        elif msg.command == w.RECALL:
            if self.waiting is not None and self.waiting[0][0] == h.task_id:
                call, self.waiting = self.waiting, None
                for task_id, run in self.reporting(call):  # not started: every task of it goes back
                    code = e.CANCELLED if task_id in self.cancelled else e.RECALLED
                    self.send(w.Error(task_id, code, "given back", run=run))
        elif msg.command == w.CANCEL:
            self.cancel(h.task_id)

    def cancel(self, task_id: str) -> None:
        """A waiting JOB whose lead is cancelled is given back at once (its riders with it); a cancelled rider
        stays in its call and is reported CANCELLED when the call ends, as is a task of the running call."""
        if self.waiting is not None and self.waiting[0][0] == task_id:
            call, self.waiting = self.waiting, None
            for other, run in self.reporting(call):
                code = e.CANCELLED if other == task_id or other in self.cancelled else e.RECALLED
                self.send(w.Error(other, code, "stopped", run=run))
        else:
            self.cancelled.add(task_id)

    def reporting(self, call: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The order a call's tasks are reported in: riders then the lead (as gpu_node gives a JOB back) or,
        at random, the lead first (as gpu_node refuses one, NODE_BUSY): the broker must not rely on either."""
        return call[::-1] if self.sim.rng.random() < 0.5 else call

    def start(self, call: list[tuple[str, str]]) -> None:
        """Begin a call: every task of it starts now."""
        for task_id, _ in call:
            holder = self.sim.running_on.get(task_id)
            assert holder is None, f"task {task_id} started on {self.name} while it runs on {holder}"
            self.sim.running_on[task_id] = self.name
        self.running = call

    def finish(self) -> None:
        """The running call ends: the waiting job starts at once, then the call's reports go out."""
        call, self.running = self.running or [], None
        for task_id, _ in call:
            self.sim.running_on.pop(task_id, None)
        if self.waiting is not None:
            waiting, self.waiting = self.waiting, None
            self.start(waiting)
            for task_id, run in waiting:
                if task_id not in self.cancelled:
                    self.send(w.ProgressReport(task_id, 0, 4, run=run))
        for task_id, run in self.reporting(call):
            if task_id in self.cancelled:
                self.send(w.Error(task_id, e.CANCELLED, "cancelled", run=run))
            else:
                self.sim.results[task_id] = self.sim.results.get(task_id, 0) + 1
                self.send(w.Result(task_id, META, run=run), [PNG])

    def leave(self) -> None:
        """Stop: say so and vanish with whatever it ran or held."""
        self.send(w.Disconnect("stopping"))
        self.alive = False
        for task_id, _ in self.running or []:
            self.sim.running_on.pop(task_id, None)
        self.running = self.waiting = None
        self.inbox.clear()


class Sim:
    """The broker with captured sends, its simulated nodes and what the run observed."""

    def __init__(self, data: Path, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = 1000.0
        self.ctx = zmq.Context()
        self.broker = Broker(BrokerConfig(data_dir=data, liveness=10**6, recovery_grace=0.0, task_timeout=10**6),
                             self.ctx, clock=lambda: self.now)
        self.broker._emit = self._emit  # type: ignore[method-assign]
        began = self.broker._began

        def first_began(task: Any) -> None:  # when the broker counts a task as started (its started_at)
            self.first_start.setdefault(task.task_id, (self.now, len(self.first_start)))
            began(task)

        self.broker._began = first_began  # type: ignore[method-assign]
        self.nodes: dict[bytes, SimNode] = {}
        self.running_on: dict[str, str] = {}
        self.first_start: dict[str, tuple[float, int]] = {}
        self.results: dict[str, int] = {}
        self.accepted: list[str] = []
        self.refused = 0

    def _emit(self, sock: zmq.Socket, frames: list[Any], failed: Any, sent: Any = None) -> None:
        identity, msg = w.split_routed(frames)
        if sock is self.broker.backend:
            node = self.nodes.get(identity)
            if node is None or not node.alive:
                failed(zmq.ZMQError(errno.EHOSTUNREACH))
                return
            if msg.command != w.HEARTBEAT:
                node.inbox.append(msg)
        elif msg.command == w.ACK:
            self.accepted.append(msg.header.task_id)
        if sent is not None:
            sent()

    def add_node(self, batch: int) -> SimNode:
        """A node joins."""
        node = SimNode(self, f"n{len(self.nodes)}", batch)
        self.nodes[node.identity] = node
        node.register()
        return node

    def submit(self, priority: int, i: int) -> str:
        """One task from a front; returns its id."""
        self.broker._handle_front(w.routed(b"front", w.Submit(i, spec(priority=priority, seed=i, prompt=f"t{i}"),
                                                              "k")))
        return self.accepted[-1]

    def drain(self) -> None:
        """Deliver every message in flight, calls running on."""
        while any(n.inbox for n in self.live()):
            for node in self.live():
                while node.inbox:
                    node.deliver()

    def live(self) -> list[SimNode]:
        """Nodes that have not left."""
        return [n for n in self.nodes.values() if n.alive]

    def close(self) -> None:
        """Close the broker's sockets and the context."""
        self.broker.close()
        self.ctx.term()


def run_once(data: Path, seed: int) -> None:
    sim = Sim(data, seed)
    rng = sim.rng
    try:
        for _ in range(rng.randint(2, 4)):
            sim.add_node(rng.choice((1, 1, 3)))
        blockers = [sim.submit(9, -1 - i) for i in range(len(sim.nodes))]
        sim.drain()
        assert all(n.running for n in sim.live()), "a blocker did not start"
        tasks = [sim.submit(rng.randint(0, 3), i) for i in range(rng.randint(10, 40))]
        sim.drain()  # every placement and recall settles before any call ends
        started_before = set(sim.first_start)
        assert started_before == set(blockers), "a task started while every node ran a blocker"
        cancelled: set[str] = set()
        left = False
        for _ in range(5000):
            sim.now += 0.01
            if all(sim.broker.tasks[t].final for t in tasks):
                break
            roll = rng.random()
            live = sim.live()
            with_mail = [n for n in live if n.inbox]
            if roll < 0.45 and with_mail:
                rng.choice(with_mail).deliver()
            elif roll < 0.8 and any(n.running for n in live):
                rng.choice([n for n in live if n.running]).finish()
            elif roll < 0.83:
                victim = rng.choice([t for t in tasks if not sim.broker.tasks[t].final])
                sim.broker._handle_front(w.routed(b"front", w.CancelTask(0, victim)))
                cancelled.add(victim)
            elif roll < 0.84 and not left and len(live) > 1:
                rng.choice(live).leave()
                left = True
            elif roll < 0.85 and len(sim.nodes) < 6:
                sim.add_node(rng.choice((1, 3)))
            elif roll < 0.87:
                sim.broker._timers(sim.now)
        else:
            pytest.fail(f"seed {seed}: tasks still not final: "
                        f"{[(t, sim.broker.tasks[t].state) for t in tasks if not sim.broker.tasks[t].final]}")
        # Starts in one simulated step (one event, which may send the broker several messages) share a
        # time: among them any order will do.
        order = sorted((t for t in tasks if t in sim.first_start),
                       key=lambda t: (sim.first_start[t][0], sim.broker.tasks[t].priority))
        priorities = [sim.broker.tasks[t].priority for t in order]
        assert priorities == sorted(priorities), f"seed {seed}: tasks first started out of priority order"
        for t in tasks:
            state = sim.broker.tasks[t].state
            assert state == w.COMPLETED or (t in cancelled and state == w.CANCELLED), f"seed {seed}: {t} {state}"
            assert sim.results.get(t, 0) <= 1, f"seed {seed}: task {t} completed twice"
    finally:
        sim.close()


@pytest.mark.parametrize("seed", range(150))
def test_random_runs_start_tasks_in_priority_order_and_complete_each_once(tmp_path: Path, seed: int) -> None:
    run_once(tmp_path, seed)
