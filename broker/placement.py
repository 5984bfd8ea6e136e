"""Placing tasks on nodes: dispatch, prefetch and recall. A mixin of `broker.server.Broker`.

The decision of which idle node starts which task is `broker.dispatch.plan` (no sockets);
this part applies it and keeps the priority order when jobs wait on nodes (prefetch):

- Idle nodes are served first; what is left may wait on a busy node behind its running job.
- A waiting job that has not started is still in line. An idle node that would otherwise
  get something less urgent (or nothing) recalls it, and waits for it; more urgent work for
  its node recalls it too. A job less urgent than one that waits elsewhere does not go to
  wait on a node, since whichever node frees first would start it out of order. Tasks
  therefore start in priority order, as without prefetch; what a recall costs is one round
  trip of an idle node.
"""

from __future__ import annotations

import logging
import uuid
from functools import partial
from typing import TYPE_CHECKING

from broker.dispatch import plan
from broker.nodes import BUSY, Node
from broker.queue import Entry
from broker.tasks import Task
from genserve import wire as w
from genserve.logs import ids, key_ref
from genserve.spec import batch_key

if TYPE_CHECKING:
    from broker.server import Broker

log = logging.getLogger(__name__)


def _serves(node: Node, task: Task) -> bool:
    return task.mode in node.models.get(task.model, ())


def _order(task: Task) -> tuple[int, float, int]:
    return task.priority, task.tag if task.tag is not None else 0.0, task.seq


class Placement:
    """Dispatch, prefetch and recall."""

    def _dispatch(self: Broker) -> None:
        """Start what the dispatch plan pairs on idle nodes, then fill the waiting places of busy ones."""
        now, cost = self.clock(), self.config.load_cost
        idle = self.nodes.available()
        waiting = self._waiting_jobs()
        if waiting and idle:
            idle = self._reclaim(idle, waiting, now)
        pairs = plan(self.queue, idle, now, load_cost=cost)
        keys = [self._batch_key(node, entry) for node, entry in pairs]
        for i, (node, entry) in enumerate(pairs):
            # Riders are shared with the later calls of this round that take the same batch key, by their
            # room: 5 such tasks on two idle nodes of --batch 4 run as 3 and 2, not 4 and 1.
            others = sum(later.batch - 1 for (later, _), k in zip(pairs[i + 1:], keys[i + 1:])
                         if k is not None and k == keys[i])
            self._start(self._placed(entry), node, riders=self._riders(node, entry, others))
        roomy = self.nodes.prefetchable() if len(self.queue) else []
        # Whichever node frees first starts its own waiting job, so each job placed to wait counts against
        # the next pick: a node's floor is the most urgent job waiting elsewhere that it could run, and it
        # may only take one as urgent as that or less.
        floors = {node.identity: min((t.priority for t in waiting if _serves(node, t)), default=None)
                  for node in roomy}

        def allow(node: Node, entry: Entry) -> bool:
            floor = floors[node.identity]
            return floor is None or entry.priority <= floor

        def take(node: Node, entry: Entry) -> None:
            lead = self._placed(entry)
            key = self._batch_key(node, entry)
            others = 0 if key is None else sum(  # the room of other waiting places that could take such tasks
                other.batch - 1 for other in roomy if other is not node and other.can_prefetch
                and _serves(other, lead) and allow(other, entry) and self._batch_key(other, entry) == key)
            self._start(lead, node, prefetch=True, riders=self._riders(node, entry, others))
            for other in roomy:
                floor = floors[other.identity]
                if other is not node and _serves(other, lead) and (floor is None or lead.priority < floor):
                    floors[other.identity] = lead.priority

        placed = bool(roomy) and bool(plan(self.queue, roomy, now, load_cost=cost, allow=allow, take=take))
        if waiting or placed:  # only an unstarted waiting job can be overtaken
            self._recall_overtaken(now)

    def _batch_key(self: Broker, node: Node, lead: Entry) -> tuple | None:
        """The lead's batch key (genserve.spec.batch_key) if it may take riders on this node, else None."""
        task = self.tasks[lead.task_id]
        if node.batch <= 1 or 0 < node.batch_pixels < task.params.width * task.params.height:
            return None
        return batch_key(task.model, task.mode, task.params, bool(task.image_names))

    def _riders(self: Broker, node: Node, lead: Entry, others: int = 0) -> list[Task]:
        """Queued tasks that share the lead's pipeline call on a node that batches (taken out of the queue):
        the same batch key and priority, next in the queue's order. `others`: how many such tasks other
        calls starting now have room for; this call takes its part of what is found, by its own room."""
        key = self._batch_key(node, lead)
        if key is None:
            return []
        room = node.batch - 1
        found = []
        for entry in self.queue.companions(lead, node.models, limit=max(64, room + others)):
            other = self.tasks[entry.task_id]
            if other.mode in node.models.get(other.model, ()) and \
                    batch_key(other.model, other.mode, other.params, bool(other.image_names)) == key:
                found.append(entry)
                if len(found) >= room + others:
                    break
        riders = []
        for entry in found[:min(room, -(-len(found) * room // (room + others)))]:
            self.queue.take(entry.task_id)
            riders.append(self._placed(entry))
        return riders

    def _placed(self: Broker, entry: Entry) -> Task:
        task = self.tasks[entry.task_id]
        task.tag = entry.tag  # its place, with any load bills, should it come back to the queue
        return task

    def _waiting_jobs(self: Broker) -> list[Task]:
        """Per node, its most urgent job waiting there unstarted, most urgent first. A waiting call whose lead
        was cancelled or came back first is there as one of its riders until they come back too."""
        out = []
        for node in self.nodes:
            if node.next_id is None and not node.riders:
                continue
            unstarted = [one for one in map(self.tasks.get, (node.next_id or "", *node.riders))
                         if one is not None and one.prefetched and one.state == w.RUNNING
                         and one.node == node.identity]
            if unstarted:
                out.append(min(unstarted, key=_order))
        return sorted(out, key=_order)

    def _reclaim(self: Broker, idle: list[Node], waiting: list[Task], now: float) -> list[Node]:
        """Idle nodes that may take queued work now.

        An idle node that would get something less urgent than a job waiting unstarted on another
        node (or nothing) recalls that job and waits for it; once every such job is being
        recalled, further idle nodes wait too rather than start less urgent work before it.
        """
        free, wanted = [], set()
        for node in idle:
            # What it would start: the best queued task, or, once other idle nodes are freed to take the first
            # ones, the next (two idle nodes must not both count on one urgent task and start a lesser one).
            taking = sum(1 for other in free if set(other.models) & set(node.models))
            if not len(self.queue):
                best = None
            elif taking:
                best = self.queue.nth_for(node.models, taking)
            else:
                best = self.queue.peek_for(node.models, node.loaded, now)
            passed = [t for t in waiting if _serves(node, t) and (best is None or t.priority < best.priority)]
            task = next((t for t in passed if t.task_id not in wanted), None)
            if task is not None:
                wanted.add(task.task_id)  # it starts where it is if the recall comes too late
                # (A rider standing in for a cancelled lead is not recalled: its node gives it back itself.)
                self._recall(task, "an idle node can run it")
            elif not passed or best is None:
                free.append(node)
        return free

    def _recall_overtaken(self: Broker, now: float) -> None:
        """Recall waiting jobs of draining nodes, and those that more urgent work for their node passes:
        queued, or waiting unstarted on another node (whichever node frees first starts its own)."""
        waiting = self._waiting_jobs()
        for node in self.nodes.prefetched():
            task = self.tasks.get(node.next_id or "")
            if task is None or not task.prefetched or node.recalling == task.task_id:
                continue
            best = self.queue.peek_for(node.models, node.loaded, now) if len(self.queue) else None
            if node.draining:
                self._recall(task, "its node is draining")
            elif best is not None and best.priority < task.priority:
                self._recall(task, "more urgent work arrived")
            elif any(t.priority < task.priority and t.node != node.identity and _serves(node, t) for t in waiting):
                self._recall(task, "more urgent work waits on another node")

    def _recall(self: Broker, task: Task, why: str) -> None:
        node = self.nodes.get(task.node or b"")
        if node is None or node.next_id != task.task_id or node.recalling == task.task_id:
            return
        log.info("recalling task %s from node %s: %s", task.task_id, node.node_id, why,
                 extra=ids(task.task_id, node.node_id))
        node.recalling = task.task_id
        self._to_node(node, w.Recall(task.task_id))

    def _start(self: Broker, task: Task, node: Node, resumed: bool = False, prefetch: bool = False,
               riders: list[Task] | tuple = ()) -> None:
        """Run `task` on `node`; `resumed`: the node already runs it (no JOB, same attempt); `prefetch`:
        it waits on the node behind the running job until the node says it started; `riders`: taken from
        the queue to share its pipeline call (each reports on its own)."""
        for one in (task, *riders):
            one.state, one.node, one.node_id = w.RUNNING, node.identity, node.node_id
            one.prefetched = prefetch
            one.started = None if prefetch else self.clock()
            one.attempts += 0 if resumed else 1
            # A resumed task keeps the run of the node's own JOB, which this broker may not know: any report of
            # that node on it is taken (the node identity still guards it).
            one.run = "" if resumed else uuid.uuid4().hex[:16]
            one.step, one.total = 0, one.params.num_inference_steps
            one.riders = []
        task.riders = [one.task_id for one in riders]
        node.riders.update(task.riders)
        if prefetch:
            node.next_id = task.task_id
        else:
            node.state, node.task_id = BUSY, task.task_id
        log.info("task %s %s on node %s (attempt %d)%s", task.task_id,
                 "resumed" if resumed else "sent to wait" if prefetch else "started", node.node_id, task.attempts,
                 f" with riders {', '.join(task.riders)}" if riders else "",
                 extra=ids(task.task_id, node.node_id, key_ref(task.owner)))
        for one in (task, *riders):
            self.table.update(one)
        if resumed:
            for one in (task, *riders):
                self._publish(one, "running")
        else:
            job = task.job()
            job.riders = [one.rider() for one in riders]
            self._to_node(node, job, task.inputs, partial(self._job_undelivered, task, node),
                          partial(self._job_sent, task, node))

    def _job_sent(self: Broker, task: Task, node: Node) -> None:
        """The JOB left (after its commit): the tasks that run at once have now started for the world."""
        for one in (task, *(self.tasks.get(r) for r in task.riders)):
            if one is not None and one.state == w.RUNNING and one.node == node.identity and not one.prefetched:
                self._began(one)

    def _began(self: Broker, task: Task) -> None:
        self._publish(task, "running")
        self.webhooks.started(task, task.started)
        self.metrics.started(task)

    def _node_began(self: Broker, task: Task, node: Node) -> None:
        """The node started a job that waited behind its previous one (its riders with it)."""
        for one in (task, *(self.tasks.get(r) for r in task.riders)):
            if one is not None and one.prefetched and one.state == w.RUNNING and one.node == node.identity:
                one.prefetched, one.started = False, self.clock()
                self.table.update(one)
                self._began(one)
        if node.recalling == task.task_id:
            node.recalling = None  # too late: it runs here, and an idle node waiting for it takes other work
            self._dispatch()
