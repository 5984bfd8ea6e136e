"""The dispatch decision, apart from any socket: which idle node starts which queued task now.

`Broker._dispatch` calls `plan` and sends the JOBs; `bench/scheduler_sim.py` calls the same
`plan` on a simulated clock to compare policies. Today's policy (`affinity=True`):

1. Among all (idle node, task it may run) pairs, the best task goes first: lower priority
   number, then a task whose model the node has loaded (within the queue's affinity
   bounds), then the fair-share tag (broker.queue), then acceptance order.
2. Each pick takes its node and its task out of the running, and the next pick follows.

With `affinity=False` the loaded models are ignored: first come, first served on any idle
node that serves the model (the baseline the simulator compares against).
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol, Sequence

from broker.queue import Entry, TaskQueue


class Worker(Protocol):
    """What the decision reads of a node."""

    models: dict[str, list[str]]
    loaded: list[str]


def plan(queue: TaskQueue, idle: Sequence[Worker], now: float, affinity: bool = True, load_cost: float = 0.0,
         allow: Callable[[Worker, Entry], bool] | None = None,
         take: Callable[[Worker, Entry], None] | None = None) -> list[tuple[Worker, Entry]]:
    """Pairs to start now; each chosen task is taken out of `queue`.

    A task that makes its node load another model bills its key `load_cost` (standard jobs) on top,
    so that fair share counts the GPU time loads take. `allow(node, task)`: whether the node may
    have the best task it could get; one refused gets nothing in this plan (a later task is no
    more urgent, unless a send that fails in `take` puts tasks back: the next dispatch places
    those). `take(node, task)` is called at each pick, before the next one is made.
    """
    free = list(idle)
    chosen: list[tuple[Worker, Entry]] = []
    while free and len(queue):
        best: tuple[tuple[int, bool, float, int], Worker, Entry] | None = None
        for node in list(free):
            loaded: Iterable[str] = node.loaded if affinity else ()
            sets = getattr(node, "lora_sets", None) if affinity else None  # model -> resident LoRA set
            entry = queue.peek_for(node.models, loaded, now, sets)
            if entry is None:
                continue
            if allow is not None and not allow(node, entry):
                free.remove(node)
                continue
            key = (entry.priority, affinity and entry.model not in node.loaded, entry.tag, entry.seq)
            if best is None or key < best[0]:
                best = (key, node, entry)
        if best is None:
            break
        _, node, entry = best
        queue.take(entry.task_id)
        if load_cost and entry.model not in node.loaded:
            queue.charge(entry.owner, entry.priority, load_cost, entry.weight)
        free.remove(node)
        chosen.append((node, entry))
        if take is not None:
            take(node, entry)
    return chosen
