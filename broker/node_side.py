"""The broker's handlers for node messages (READY, HEARTBEAT, PROGRESS, RESULT, ERROR, DISCONNECT).

A mixin of `broker.server.Broker` (see broker/front_side.py). Every handler gets the typed header.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from broker.nodes import BUSY, IDLE, Node
from broker.results import check_image
from broker.tasks import Task
from genserve import errors as e
from genserve import wire as w
from genserve.logs import ids, key_ref

if TYPE_CHECKING:
    from broker.server import Broker

log = logging.getLogger(__name__)
MAX_WARNED_PEERS = 1024


def _unwinding(h: w.Ready) -> set[str] | None:
    """The tasks whose final report means a re-registered busy node is free (None: an older node, any)."""
    if h.unwinding is None:
        return None
    return {*h.unwinding, *h.busy_riders, *([h.busy_task] if h.busy_task else [])}


class NodeSide:
    """Handlers for the backend ROUTER."""

    def _handle_node(self: Broker, frames: list[bytes]) -> None:
        try:
            identity, msg = w.split_routed(frames)
        except w.ProtocolError as exc:
            peer = bytes(frames[0]) if frames else b""
            if peer not in self._warned_peers and len(self._warned_peers) < MAX_WARNED_PEERS:
                self._warned_peers.add(peer)  # once per peer: an old node keeps knocking
                log.warning("ignoring node %r: %s", peer, exc)
            return
        node = self.nodes.touch(identity, self.clock())
        if node is None and msg.command not in (w.READY, w.DISCONNECT):
            # Unknown node (e.g. the broker restarted): ask it to register again.
            self._send(self.backend, identity, w.Disconnect("not registered"))
            return
        try:
            self._node_handlers[msg.command](identity, node, msg)
        except Exception:  # one message must never take the broker down
            log.exception("error handling %s from node %r", msg.name, identity)

    def _on_ready(self: Broker, identity: bytes, _node: Node | None, msg: w.Message) -> None:
        h: w.Ready = msg.header
        old = self.nodes.get(identity) or self._same_process(identity, h)
        running, waiting, riders = self._kept(old, identity, h) if old is not None else (None, None, [])
        if old is not None and old.identity != identity:
            self.nodes.remove(old.identity)
        node = self.nodes.register(identity, h, self.clock())
        self._release_held(node, h)
        if running or waiting or riders:
            self._keep_on(node, h, running, waiting, riders)
        elif h.busy_task or h.busy_riders:
            self._resume_call(node, h)
        elif h.busy:
            node.unwind(_unwinding(h))  # until it reports idle, or on what it gave up
        log.info("node %s registered: %s serving %s", node.node_id, node.device, sorted(node.models))
        self._dispatch()

    def _keep_on(self: Broker, node: Node, h: w.Ready, running: Task | None, waiting: Task | None,
                 riders: list[Task]) -> None:
        """Put back on a re-registered node what it kept of its previous entry."""
        if running is None and waiting is not None and (waiting.task_id == h.busy_task or not h.busy):
            running, waiting = waiting, None  # it took the waiting job, or runs nothing and starts it at once
        elif running is None and h.busy:
            # What it runs has no kept lead (cancelled while its call runs on): a kept rider of that call
            # holds the node's place until the call reports; without one it is busy until it says it is idle.
            running = next((one for one in riders if one.task_id in h.busy_riders), None)
            riders = [one for one in riders if one is not running]
        # Only riders kept, and nothing running: their call has ended (their reports are on the way).
        node.state = BUSY if running or waiting or h.busy else IDLE
        node.task_id = running.task_id if running else None
        node.unwinding = _unwinding(h) if running is None and h.busy else None
        node.next_id = waiting.task_id if waiting else None
        node.riders = {one.task_id for one in riders}
        for one in (running, waiting, *riders):
            if one is not None:
                one.node = node.identity
                self.table.update(one)
        started = next((one for one in (running, waiting) if one and one.task_id == h.busy_task and one.prefetched),
                       None)
        if started is not None:
            self._node_began(started, node)  # it took the waiting job while it was away

    def _resume_call(self: Broker, node: Node, h: w.Ready) -> None:
        """After a broker restart, or once it expired the node, the node still runs this call: it keeps the
        call's tasks that are still in line. If one runs elsewhere now, the whole call stops, since a
        shared call runs on for as long as any of its tasks wants it."""
        members = [t for t in (h.busy_task, *h.busy_riders) if t]
        elsewhere = any((task := self.tasks.get(t)) is not None and not task.final and task.state != w.QUEUED
                        for t in members)
        claimed = [] if elsewhere else [one for t in members if (one := self.table.claim(t)) is not None]
        kept = {one.task_id for one in claimed}
        for task_id in members:
            if task_id not in kept:
                self._to_node(node, w.Cancel(task_id, "task unknown or reassigned"))
                # One held for this node goes back in line now: the broker stopped it, the node did not fail it.
                if elsewhere and task_id in self.table.held_for(node.node_id):
                    self.table.release(task_id, self.clock())
        if claimed:
            self._start(claimed[0], node, resumed=True, riders=claimed[1:])
        else:
            node.unwind(_unwinding(h))  # until it reports idle, or on the call it was told to stop

    def _kept(self: Broker, old: Node, identity: bytes, h: w.Ready) -> tuple[Task | None, Task | None, list[Task]]:
        """Of what the node's previous entry ran, held waiting or carried as riders, the tasks it keeps;
        the others go back in line.

        It keeps a task it runs or will report on; on the same connection also one whose JOB is
        still on the way (sent after this READY left, and that connection keeps order).
        """
        claims = {h.busy_task, *h.busy_riders, *(h.reports or ())}

        def keep(task_id: str | None, waiting: bool) -> Task | None:
            task = self.tasks.get(task_id or "")
            if task is None or task.final:
                return None
            if task_id in claims or (old.identity == identity and (waiting or h.busy_task is None)):
                return task
            self._requeue(task, "node re-registered", refund=task.prefetched)  # a waiting job never started
            return None

        running, waiting = keep(old.task_id, False), keep(old.next_id, True)
        riders = [one for task_id in sorted(old.riders)
                  if (one := keep(task_id, self.tasks[task_id].prefetched if task_id in self.tasks else False))]
        old.task_id = old.next_id = None
        old.riders = set()
        return running, waiting, riders

    def _release_held(self: Broker, node: Node, h: w.Ready) -> None:
        """Tasks held since a restart for this node go back in line if it neither runs nor reports them."""
        if h.reports is None:
            return  # an older node does not say what it will report: the recovery grace decides
        for task_id in self.table.held_for(node.node_id):
            if task_id != h.busy_task and task_id not in h.reports and task_id not in h.busy_riders:
                log.info("node %s came back without task %s: it goes back in line", node.node_id, task_id,
                         extra=ids(task_id, node.node_id))
                self.table.release(task_id, self.clock())

    def _same_process(self: Broker, identity: bytes, h: w.Ready) -> Node | None:
        """The entry of this node's previous connection (same id, host and pid), if still registered."""
        old = self.nodes.find(h.node_id)
        if old is not None and old.identity != identity and old.host == h.host and old.pid == h.pid:
            return old
        return None

    def _on_heartbeat(self: Broker, identity: bytes, node: Node, msg: w.Message) -> None:
        h: w.Heartbeat = msg.header
        if h.loaded is not None:
            node.loaded = list(h.loaded)
        if h.memory_free is not None:
            node.memory_free = h.memory_free
        if h.loras is not None:
            node.loras = list(h.loras)
        if h.lora_sets is not None:
            node.lora_sets = dict(h.lora_sets)
        if h.stats is not None:
            node.stats = h.stats
        if h.leaving and not node.leaving:
            node.draining = node.leaving = True  # a stopping node: no new work while its job winds down
            log.info("node %s is stopping", node.node_id)
        if h.idle and node.state == BUSY and node.task_id is None:
            node.free_running()  # a cancelled task has finished unwinding
            self._dispatch()

    def _on_progress(self: Broker, identity: bytes, node: Node, msg: w.Message) -> None:
        h: w.ProgressReport = msg.header
        task = self.tasks.get(h.task_id)
        if task is not None and task.node == identity and task.state == w.RUNNING and not task.stale(h.run):
            began = task.prefetched
            recalled = began and node.recalling == task.task_id  # then _node_began dispatches itself
            if began:
                self._node_began(task, node)
            task.step, task.total = h.step, h.total
            self._publish(task, "progress")
            if began and not recalled and len(self.queue) and self.nodes.prefetchable():
                self._dispatch()  # its place is free again, and what it held back may now wait on a node

    def _on_result(self: Broker, identity: bytes, node: Node, msg: w.Message) -> None:
        h: w.Result = msg.header
        current = self.tasks.get(h.task_id)
        # A result kept from an earlier assignment is adopted below, but frees no slot of the current one.
        task = None if current is not None and current.stale(h.run) else self._release(node, h.task_id, h.loaded)
        if task is not None and h.lora_sets is not None:
            node.lora_sets = dict(h.lora_sets)  # a late or re-sent report may describe older slots
        adopted = task is None
        if adopted:
            # A report kept by a node across a broker restart or a reconnect: finished work is
            # never thrown away while its task is still waiting or running elsewhere.
            task = self._adoptable(h.task_id)
        result = msg.blobs[0] if msg.blobs else b""
        expected = task.params if task is not None else h.meta
        wrong = check_image(result, h.meta.format, expected.width, expected.height)
        if task is not None and wrong and adopted:
            log.warning("node %s sent an invalid late result for task %s (%s): discarded", node.node_id, h.task_id,
                        wrong, extra=ids(h.task_id, node.node_id))  # the task may be healthy elsewhere
        elif task is not None and wrong:
            log.warning("node %s returned %s for task %s: failing it", node.node_id, wrong, h.task_id,
                        extra=ids(h.task_id, node.node_id, key_ref(task.owner)))
            self._fail(task, w.FAILED, e.GENERATION, f"the node returned an invalid result: {wrong}")
        elif task is not None:
            if task.prefetched and task.node == identity:
                self._node_began(task, node)  # it ran while the broker still counted it as waiting
            self._detach(task)
            task.node_id = node.node_id  # an adopted result: the node that made the image
            task.state = w.COMPLETED
            task.finished = self.clock()
            task.meta = h.meta
            task.step = task.total
            self.table.finish(task, result)
            node.jobs_done += 1
            self._notify(task, [result])
        self._to_node(node, w.ResultAck(h.task_id, h.run))
        self._dispatch()

    def _on_error(self: Broker, identity: bytes, node: Node, msg: w.Message) -> None:
        h: w.Error = msg.header
        current = self.tasks.get(h.task_id)
        if current is not None and current.stale(h.run):
            log.info("discarding a report on an earlier assignment of task %s from %s", h.task_id, node.node_id,
                     extra=ids(h.task_id, node.node_id))
            self._to_node(node, w.ResultAck(h.task_id, h.run))
            return
        if h.task_id in node.riders:
            task = self._release(node, h.task_id, h.loaded)  # the node's place follows its lead, not a rider
        elif h.code == e.NODE_BUSY and h.task_id == node.task_id:
            # A job to run now was refused: busy with work we do not know of, idle when it says so.
            # A job sent to wait behind it keeps its place (it has not started, and may still run there).
            node.unwind(set())  # only its idle heartbeat says it is free
            task = self._owned(node, h.task_id)
        else:
            prefetched = h.task_id == node.next_id
            task = self._release(node, h.task_id, h.loaded) or self._held_report(node, h.task_id)
            if h.code == e.NODE_BUSY and prefetched:
                node.prefetch_refused = True  # it still unwinds something: no more waiting jobs until it reports
            elif h.code == e.NODE_BUSY:
                node.unwind(set())  # busy with work we do not know of: idle when it says so
        if task is not None and h.code in (e.NODE_BUSY, e.RECALLED):
            why = "its node could not take it" if h.code == e.NODE_BUSY else "recalled unstarted"
            self._requeue(task, why, refund=True)  # it never started
        elif task is not None and h.code in (e.ABANDONED, e.CANCELLED):
            # CANCELLED for a task that is not final: the broker cancelled it, then died before
            # journaling why. Stopped, not failed: it runs again. An operator stopping the node is
            # not the task's failure either.
            self._requeue(task, "its node stopped it without failing it", refund=node.leaving)
        elif task is not None:
            self._fail(task, w.FAILED, h.code, h.message)
        self._to_node(node, w.ResultAck(h.task_id, h.run))
        self._dispatch()

    def _held_report(self: Broker, node: Node, task_id: str) -> Task | None:
        """A task held since a restart, reported on by the node that ran it: as if it had run there."""
        task = self.table.take_held(task_id, node.node_id)
        if task is not None:
            task.state, task.node, task.node_id = w.RUNNING, node.identity, node.node_id
        return task

    def _adoptable(self: Broker, task_id: str) -> Task | None:
        task = self.tasks.get(task_id)
        if task is None or task.final:
            return None
        log.info("adopting the late result of task %s (it was %s)", task_id, task.state,
                 extra=ids(task_id, key_id=key_ref(task.owner)))
        return task

    def _on_disconnect(self: Broker, identity: bytes, node: Node | None, msg: w.Message) -> None:
        node = self.nodes.remove(identity)
        if node is not None:
            log.info("node %s disconnected", node.node_id)
            if node.task_id or node.next_id or node.riders:
                self._requeue_node_task(node, "node disconnected")
                self._dispatch()

    def _release(self: Broker, node: Node, task_id: str, loaded: list[str] | None = None) -> Task | None:
        """Free the node's slot for this task; return the task only if this node legitimately owns it."""
        if loaded is not None:
            node.loaded = list(loaded)
        if task_id in node.riders:
            node.riders.discard(task_id)  # its call's lead holds the node's place
        elif node.next_id == task_id:
            node.next_id = None  # a waiting job came back (recalled, refused or cancelled)
            node.recalling = None
        elif node.task_id == task_id or (node.state == BUSY and node.task_id is None
                                         and (node.unwinding is None or task_id in node.unwinding)):
            node.free_running()  # also ends a cancelled task's unwinding; a waiting job runs now
            node.prefetch_refused = False
            promoted = self.tasks.get(node.task_id or "")
            if promoted is not None:
                # The node's worker takes its waiting job as soon as a pipeline call ends, before
                # that job's report goes out: it has started (its step-0 PROGRESS may come later).
                # (Its riders too, even if it was itself cancelled while it waited.)
                self._node_began(promoted, node)
        return self._owned(node, task_id)

    def _owned(self: Broker, node: Node, task_id: str) -> Task | None:
        """The task, if this node legitimately runs or holds it; a late report of anything else is logged."""
        task = self.tasks.get(task_id)
        if task is not None and task.final:
            return None
        if task is None or task.node != node.identity or task.state != w.RUNNING:
            log.info("discarding late message for task %s from %s", task_id, node.node_id,
                     extra=ids(task_id, node.node_id))
            return None
        return task
