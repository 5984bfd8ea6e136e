"""Task records and the broker's task table (no sockets), with the disk budget's accounting."""

from __future__ import annotations

import bisect
import heapq
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from broker.queue import TaskQueue
from genserve.errors import EXPIRED
from genserve.logs import ids
from genserve.spec import GenerationParams, WebhookSpec, lora_set_key
from genserve.wire import FINAL_STATES, QUEUED, RUNNING, Job, Progress, ResultMeta, Rider, TaskView

if TYPE_CHECKING:
    from broker.journal import Journal

log = logging.getLogger(__name__)


@dataclass
class Task:
    """One accepted generation task and its lifecycle state."""

    task_id: str
    model: str
    mode: str
    priority: int
    seq: int
    params: GenerationParams
    owner: str = ""
    image_names: list[str] = field(default_factory=list)
    inputs: list[bytes] = field(default_factory=list)
    state: str = QUEUED
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    deadline: float = 0.0
    attempts: int = 0
    node: bytes | None = None
    node_id: str | None = None
    step: int = 0
    total: int = 0
    error_code: str | None = None
    error: str | None = None
    meta: ResultMeta | None = None
    result_expired: bool = False  # completed, but its image was evicted to respect the disk budget
    idem_key: str | None = None  # the client's Idempotency-Key, unique per owner
    idem_hash: str | None = None  # fingerprint of the request that first used it
    replayed: bool = False  # a retry under its Idempotency-Key was answered with it
    waited: bool = False  # its queue wait (acceptance to first start) is in the metrics
    webhook: WebhookSpec | None = None
    weight: float = 1.0  # its key's fair-share weight when it was accepted
    tag: float | None = None  # its fair-share place in the queue (broker.queue), kept across re-queues
    # Sent to a node as the job after its running one, not started there yet: journaled as running on
    # that node (a restart holds it for the node), shown as queued (first in line).
    prefetched: bool = False
    run: str = ""  # names its current assignment to a node (not journaled: "" after a restart)
    riders: list[str] = field(default_factory=list)  # tasks sent in this task's JOB, to share its call
    watchers: set[bytes] = field(default_factory=set)

    @property
    def final(self) -> bool:
        """True once the task is completed, failed or cancelled."""
        return self.state in FINAL_STATES

    @property
    def status(self) -> str:
        """The state clients see: a prefetched task that has not started is still queued."""
        return QUEUED if self.prefetched and self.state == RUNNING else self.state

    def stale(self, run: str) -> bool:
        """Whether a node's report names another assignment of this task than its current one."""
        return bool(run and self.run and run != self.run)

    def job(self) -> Job:
        """The JOB a node receives for this task."""
        return Job(self.task_id, self.model, self.mode, self.params, self.image_names, self.attempts, self.run)

    def rider(self) -> Rider:
        """This task as it rides in another task's JOB."""
        return Rider(self.task_id, self.params, self.attempts, self.run)

    def view(self, position: int | None = None) -> TaskView:
        """The task as STATUS, FETCH, CANCEL_TASK and DONE report it."""
        return TaskView(
            task_id=self.task_id, status=self.status, model_id=self.model, mode=self.mode,
            priority=self.priority, owner=self.owner, params=self.params, created_at=self.created,
            attempts=self.attempts, started_at=self.started, finished_at=self.finished,
            node_id=self.node_id, queue_position=0 if self.prefetched else position,
            progress=Progress(self.step, self.total) if self.total else None,
            error_code=self.error_code, error=self.error if self.error_code else None, meta=self.meta,
            result_expired=self.result_expired)


ANY = "*"  # the listing index's wildcard for "every owner" and "every state"


class ListingIndex:
    """Sequence numbers of tasks by (owner, state), each list sorted, for newest-first pages.

    Each task is in four lists: (owner, state), (owner, ANY), (ANY, state) and (ANY, ANY).
    A page is a binary search and a slice, whatever the filter and however many tasks
    other keys hold or other states contain.
    """

    def __init__(self) -> None:
        self._lists: dict[tuple[str, str], list[int]] = {}
        self._state: dict[int, tuple[str, str]] = {}  # seq -> (owner, state) as indexed

    def put(self, seq: int, owner: str, state: str) -> None:
        """Index a task, or move it to its new state."""
        old = self._state.get(seq)
        if old == (owner, state):
            return
        if old is not None:
            self.remove(seq)
        self._state[seq] = (owner, state)
        for key in ((owner, state), (owner, ANY), (ANY, state), (ANY, ANY)):
            seqs = self._lists.setdefault(key, [])
            if not seqs or seqs[-1] < seq:
                seqs.append(seq)  # the common case: a new task is the newest
            else:
                bisect.insort(seqs, seq)

    def remove(self, seq: int) -> None:
        """Forget a task."""
        old = self._state.pop(seq, None)
        if old is None:
            return
        owner, state = old
        for key in ((owner, state), (owner, ANY), (ANY, state), (ANY, ANY)):
            seqs = self._lists[key]
            del seqs[bisect.bisect_left(seqs, seq)]
            if not seqs:
                del self._lists[key]

    def page(self, owner: str | None, state: str | None, limit: int, before: int | None) -> tuple[list[int], bool]:
        """Up to `limit` seqs below `before`, newest first; and whether older ones remain."""
        seqs = self._lists.get((owner if owner is not None else ANY, state if state is not None else ANY), [])
        end = len(seqs) if before is None else bisect.bisect_left(seqs, before)
        start = max(0, end - limit)
        return seqs[start:end][::-1], start > 0


JOB_OVERHEAD = 0.02  # per job, in standard jobs: text encoding, VAE decode, encoding the image, dispatch


def job_cost(params: GenerationParams) -> float:
    """Estimated GPU time in standard jobs (1024x1024, 28 steps = about 1): what fair share charges a key.

    Each step's transformer pass is charged for its tokens: the image's (one per 16x16 pixels)
    plus the 512 text tokens every pass carries, so a small image is not nearly free.
    """
    tokens = 512 + params.width * params.height / 256
    return JOB_OVERHEAD + params.num_inference_steps / 28 * tokens / (512 + 4096)


def result_reserve(params: GenerationParams) -> int:
    """Disk held for a task's future result: an upper bound of an 8-bit RGB PNG of its size.

    Raw rows with their filter bytes, deflate's worst-case growth (stored blocks) and
    the PNG chunks; real images compress well below it.
    """
    raw = max(params.height, 1) * (3 * max(params.width, 1) + 1)
    return raw + raw // 1000 + 1024


class TaskTable:
    """Every task the broker knows, with its deadlines, journal and queue placement (no sockets).

    Tasks recovered as *running* after a restart are held for the node that ran them
    until it claims, reports or disowns them, or the recovery grace ends; only then is
    any other node offered them.

    Disk budget: the journal counts the bytes of its image files, and each unfinished task
    also holds `result_reserve` bytes for its result, so the results of accepted tasks
    always fit. A task that does not fit first evicts the oldest finished results; when
    even evicting all of them would not make room, nothing is evicted and it is refused.
    """

    def __init__(self, journal: Journal, queue: TaskQueue) -> None:
        self.journal = journal
        self.queue = queue
        self.tasks: dict[str, Task] = {}
        self._seq = 0
        self._deadlines: list[tuple[float, str]] = []
        # Tasks that were running when the broker stopped: task id -> (release time, the node
        # that ran them). They wait for that node to claim them, report them or say it has not.
        self._held: dict[str, tuple[float, str | None]] = {}
        self._unfinished: dict[str, int] = {}  # owner -> tasks not yet final (the per-key cap)
        self._last_purge = 0.0
        self._reserved = 0  # bytes held for the results of unfinished tasks
        self._idem: dict[tuple[str, str], str] = {}  # (owner, Idempotency-Key) -> task id
        self._index = ListingIndex()
        self._by_seq: dict[int, str] = {}

    @property
    def disk_used(self) -> int:
        """Bytes counted against the disk budget: image files plus reserved results."""
        return self.journal.blob_bytes + self._reserved

    def __len__(self) -> int:
        return len(self.tasks)

    def get(self, task_id: str) -> Task | None:
        """The task with this id, if known."""
        return self.tasks.get(task_id)

    def next_seq(self) -> int:
        """Acceptance order for FIFO within a priority (continues after a restart)."""
        self._seq += 1
        return self._seq

    def make_room(self, task: Task, disk_budget: int) -> bool:
        """Evict the oldest finished results until `task` fits the budget (0: none); False if it cannot."""
        if disk_budget <= 0:
            return True
        over = self.disk_used + sum(map(len, task.inputs)) + result_reserve(task.params) - disk_budget
        if over <= 0:
            return True
        if over > self.journal.result_bytes:
            return False  # evicting every result would not be enough: keep them
        self._expire(self.journal.evict_results(over))
        return True

    def trim(self, disk_budget: int) -> None:
        """Evict the oldest finished results while over the budget (0: none), e.g. after it shrank."""
        if 0 < disk_budget < self.disk_used:
            self._expire(self.journal.evict_results(self.disk_used - disk_budget))

    def _expire(self, task_ids: list[str]) -> None:
        for task_id in task_ids:
            task = self.tasks.get(task_id)
            if task is not None:
                task.result_expired = True

    def accept(self, task: Task, now: float) -> None:
        """Journal a new task (durably, before any ACK) and queue it."""
        self.journal.add(task)
        self._reserved += result_reserve(task.params)
        self.tasks[task.task_id] = task
        self._indexed(task)
        if task.idem_key:
            self._idem[(task.owner, task.idem_key)] = task.task_id
        self._unfinished[task.owner] = self._unfinished.get(task.owner, 0) + 1
        self._push(task, now)
        heapq.heappush(self._deadlines, (task.deadline, task.task_id))

    def by_idempotency_key(self, owner: str, key: str) -> Task | None:
        """The task an owner already submitted under this Idempotency-Key, while it is kept."""
        task = self.tasks.get(self._idem.get((owner, key), ""))
        return task if task is not None and task.idem_key == key and task.owner == owner else None

    def forget_idempotency_key(self, task: Task) -> None:
        """Let the key be used again (the task was never acknowledged to its client)."""
        if task.idem_key and self._idem.get((task.owner, task.idem_key)) == task.task_id:
            del self._idem[(task.owner, task.idem_key)]

    def _indexed(self, task: Task) -> None:
        self._by_seq[task.seq] = task.task_id
        self._index.put(task.seq, task.owner, task.status)

    def update(self, task: Task) -> None:
        """Persist a change of a task that is not ending (e.g. it started)."""
        self.journal.update(task)
        self._index.put(task.seq, task.owner, task.status)

    def finish(self, task: Task, result: bytes | None) -> None:
        """Persist a final state (the caller has set it) and the result image, if any."""
        self.journal.finish(task, result)
        self._index.put(task.seq, task.owner, task.state)
        self._reserved = max(0, self._reserved - result_reserve(task.params))
        left = self._unfinished.get(task.owner, 1) - 1
        if left > 0:
            self._unfinished[task.owner] = left
        else:
            self._unfinished.pop(task.owner, None)

    def enqueue(self, task: Task, now: float) -> None:
        """Put an accepted task back in the queue at its original priority and place."""
        task.state, task.step, task.node, task.node_id, task.prefetched = QUEUED, 0, None, None, False
        self.update(task)
        self._push(task, now, task.tag if task.tag is not None else self.queue.front_tag(task.priority))

    def _push(self, task: Task, now: float, tag: float | None = None) -> None:
        task.tag = self.queue.push(task.task_id, task.model, task.priority, task.seq, now, task.owner,
                                   task.weight, job_cost(task.params), tag, lora_set_key(task.params.loras))

    def claim(self, task_id: str) -> Task | None:
        """Take a waiting (queued or held) task out of line, for a node that already runs it."""
        task = self.tasks.get(task_id)
        if task is None or task.final or task.state != QUEUED:
            return None
        held = self._held.pop(task_id, None) is not None
        return task if held or self.queue.take(task_id) is not None else None  # it runs: no refund

    def held_for(self, node_id: str) -> list[str]:
        """The held tasks that node `node_id` was running when the broker stopped."""
        return [task_id for task_id, (_, owner) in self._held.items() if owner == node_id]

    def take_held(self, task_id: str, node_id: str) -> Task | None:
        """Take a held task out of line for the node that ran it (its late report arrived)."""
        held = self._held.get(task_id)
        if held is None or held[1] != node_id:
            return None
        del self._held[task_id]
        return self.tasks[task_id]

    def release(self, task_id: str, now: float) -> None:
        """Put a held task back in line, first at its priority: its node will not finish it."""
        if self._held.pop(task_id, None) is not None:
            task = self.tasks[task_id]
            self._push(task, now, self.queue.front_tag(task.priority))

    def hold_until(self, until: float) -> None:
        """Start the recovery grace now (the broker serves from here on), not when the journal loaded."""
        self._held = {task_id: (until, node_id) for task_id, (_, node_id) in self._held.items()}

    def withdraw(self, task_id: str) -> None:
        """Remove a task from the queue or the held set (it is ending)."""
        self.queue.remove(task_id)
        self._held.pop(task_id, None)

    def unfinished_for(self, owner: str) -> int:
        """Tasks of one API key not yet completed, failed or cancelled."""
        return self._unfinished.get(owner, 0)

    def listing(self, owner: str | None, status: str | None, limit: int,
                before: int | None = None) -> tuple[list[Task], int | None]:
        """Newest first: up to `limit` tasks of `owner` (None: all) in `status` (None: any), accepted
        before sequence `before`; and the cursor of the next page, None when there is none."""
        seqs, more = self._index.page(owner, status, limit, before)
        page = [self.tasks[self._by_seq[seq]] for seq in seqs]
        return page, (page[-1].seq if more and page else None)

    def counts(self) -> dict[str, int]:
        """Number of tasks per state."""
        out: dict[str, int] = {}
        for task in self.tasks.values():
            out[task.status] = out.get(task.status, 0) + 1
        return out

    def overdue(self, now: float) -> Iterator[Task]:
        """Unfinished tasks past their deadline."""
        while self._deadlines and self._deadlines[0][0] < now:
            _, task_id = heapq.heappop(self._deadlines)
            task = self.tasks.get(task_id)
            if task is not None and not task.final:
                yield task

    def housekeeping(self, now: float, result_ttl: float) -> None:
        """Release held tasks whose grace is over; purge results past their retention."""
        for task_id, (until, node_id) in list(self._held.items()):
            if now >= until:
                log.warning("task %s: node %s did not come back for it; it goes back in line", task_id, node_id,
                            extra=ids(task_id, node_id))
                self.release(task_id, now)  # it was running: first in line
        if now - self._last_purge > min(60.0, result_ttl / 2):
            self._last_purge = now
            for task_id in self.journal.purge(now - result_ttl):
                task = self.tasks.pop(task_id, None)
                if task is not None:
                    self.forget_idempotency_key(task)
                    self._index.remove(task.seq)
                    self._by_seq.pop(task.seq, None)

    def recover(self, now: float, grace: float) -> None:
        """Reload the journal after a (re)start."""
        for task in self.journal.load():
            self.tasks[task.task_id] = task
            self._seq = max(self._seq, task.seq)
            self._indexed(task)
            if task.idem_key and task.error_code != EXPIRED:
                self._idem[(task.owner, task.idem_key)] = task.task_id
            if task.final:
                continue
            self._unfinished[task.owner] = self._unfinished.get(task.owner, 0) + 1
            self._reserved += result_reserve(task.params)
            ran_on, task.node, task.node_id = task.node_id, None, None
            heapq.heappush(self._deadlines, (task.deadline, task.task_id))
            if task.state == RUNNING:
                task.state = QUEUED
                self._index.put(task.seq, task.owner, QUEUED)
                self._held[task.task_id] = (now + grace, ran_on)
            else:
                self._push(task, now)
        if self.tasks:
            log.info("recovered %d tasks from the journal (%d queued, %d held for their nodes)",
                     len(self.tasks), len(self.queue), len(self._held))
