"""The broker's registry of GPU nodes (no sockets, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field

from genserve.wire import LoraInfo, NodeStats, NodeView, Ready, ServedModel

IDLE = "idle"
BUSY = "busy"


@dataclass
class Node:
    """What the broker knows about one registered node."""

    identity: bytes
    node_id: str
    device: str
    models: dict[str, list[str]]
    memory_total: int = 0
    memory_free: int = 0
    loaded: list[str] = field(default_factory=list)
    loras: list[LoraInfo] = field(default_factory=list)
    lora_sets: dict[str, str] = field(default_factory=dict)  # model -> LoRA set resident in its slots
    host: str = ""
    pid: int = 0
    state: str = IDLE
    task_id: str | None = None  # the job it runs (or will report on); None while BUSY: unwinding a cancel
    # While BUSY with no task_id: the tasks whose final report ends what it still runs (an idle heartbeat
    # does too); None: not known (an older node), so any final report does.
    unwinding: set[str] | None = None
    next_id: str | None = None  # a job waiting on the node behind task_id (prefetch)
    prefetch: int = 0  # jobs it takes beyond the running one (0 or 1 here)
    batch: int = 1  # most tasks it runs in one pipeline call
    batch_pixels: int = 0  # only images up to this many pixels batch on it; 0: any
    riders: set[str] = field(default_factory=set)  # tasks riding in its running or waiting JOB
    recalling: str | None = None  # next_id, once a RECALL for it has gone out
    prefetch_refused: bool = False  # it answered a prefetched JOB with NODE_BUSY: none until its next report
    draining: bool = False
    leaving: bool = False  # the node is shutting down (it said so in a heartbeat)
    last_seen: float = 0.0
    last_sent: float = 0.0
    jobs_done: int = 0
    stats: NodeStats | None = None  # the node's own totals, from its last heartbeat

    @property
    def available(self) -> bool:
        """True when the node may be given a new task."""
        return self.state == IDLE and not self.draining

    @property
    def can_prefetch(self) -> bool:
        """True when the node runs a job and has room for one more waiting behind it."""
        return (self.prefetch > 0 and self.state == BUSY and self.task_id is not None and self.next_id is None
                and not self.draining and not self.prefetch_refused)

    def free_running(self) -> None:
        """The running job ended: the waiting one, if any, runs now."""
        self.task_id, self.next_id = self.next_id, None
        self.state = BUSY if self.task_id else IDLE
        self.recalling = None
        self.unwinding = None

    def unwind(self, tasks: set[str] | list[str] | None) -> None:
        """It still runs what it gave up (or what the broker cancelled): busy until one of `tasks` reports."""
        self.state, self.task_id = BUSY, None
        self.unwinding = set(tasks) if tasks is not None else None

    def view(self, now: float) -> NodeView:
        """The node as INFO reports it (and `genservectl nodes` shows it)."""
        return NodeView(
            node_id=self.node_id, device=self.device, host=self.host, pid=self.pid,
            state="draining" if self.draining and self.state == IDLE else self.state,
            draining=self.draining, task_id=self.task_id, models=self.models, loaded=self.loaded,
            loras=self.loras, memory_total=self.memory_total, memory_free=self.memory_free,
            last_heartbeat_age_s=round(max(0.0, now - self.last_seen), 3), jobs_done=self.jobs_done,
            next_task_id=self.next_id)


class NodeRegistry:
    """Registered nodes by ZeroMQ identity, with liveness bookkeeping."""

    def __init__(self) -> None:
        self._nodes: dict[bytes, Node] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self):
        return iter(list(self._nodes.values()))

    def get(self, identity: bytes) -> Node | None:
        """The node with this identity, if registered."""
        return self._nodes.get(identity)

    def find(self, name: str) -> Node | None:
        """A node by its node_id (as operators name it)."""
        for node in self._nodes.values():
            if node.node_id == name:
                return node
        return None

    def register(self, identity: bytes, info: Ready, now: float) -> Node:
        """Add or replace a node from its READY header."""
        node = Node(
            identity=identity, node_id=info.node_id or identity.hex(), device=info.device,
            models={m: list(modes) for m, modes in info.models.items()},
            memory_total=info.memory_total, memory_free=info.memory_free, loaded=list(info.loaded),
            loras=list(info.loras), host=info.host, pid=info.pid, last_seen=now, last_sent=now,
            prefetch=min(info.prefetch, 1), batch=info.batch, batch_pixels=info.batch_pixels,
        )
        old = self._nodes.get(identity)
        if old is not None:
            node.draining = old.draining
        self._nodes[identity] = node
        return node

    def remove(self, identity: bytes) -> Node | None:
        """Forget a node; returns it so its task can be re-queued."""
        return self._nodes.pop(identity, None)

    def touch(self, identity: bytes, now: float) -> Node | None:
        """Record traffic from a node (any message counts as a heartbeat)."""
        node = self._nodes.get(identity)
        if node is not None:
            node.last_seen = now
        return node

    def expired(self, now: float, timeout: float) -> list[Node]:
        """Nodes silent for longer than `timeout` seconds."""
        return [n for n in self._nodes.values() if now - n.last_seen > timeout]

    def available(self) -> list[Node]:
        """Idle, non-draining nodes in registration order."""
        return [n for n in self._nodes.values() if n.available]

    def prefetchable(self) -> list[Node]:
        """Busy nodes with room for a job waiting behind the running one, in registration order."""
        return [n for n in self._nodes.values() if n.can_prefetch]

    def prefetched(self) -> list[Node]:
        """Nodes holding a job that waits behind their running one."""
        return [n for n in self._nodes.values() if n.next_id is not None]

    def serves(self, model: str, mode: str) -> bool:
        """Whether any registered node (draining ones too: they come back) serves model in mode."""
        return any(mode in node.models.get(model, ()) for node in self._nodes.values())

    def served_models(self) -> dict[str, ServedModel]:
        """Per model id: union of modes and which nodes serve / have it loaded."""
        out: dict[str, ServedModel] = {}
        for node in self._nodes.values():
            for model, modes in node.models.items():
                entry = out.setdefault(model, ServedModel([], [], []))
                entry.modes = sorted(set(entry.modes) | set(modes))
                entry.nodes.append(node.node_id)
                if model in node.loaded:
                    entry.loaded_on.append(node.node_id)
        return out
