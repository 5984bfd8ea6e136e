"""The GenServe wire protocol: the one contract between fronts, broker and nodes.

A message is the frame list ``[VERSION, COMMAND, header, *blobs]``; ROUTER sockets prepend
the peer identity. Each command has one declared header type (a msgspec Struct, encoded as
msgpack); `encode` and `decode` here are the only places headers are built from or read
into bytes, and decoding validates the header against its type. Images travel as raw
bytes in blob frames, never inside the header and never base64. Nothing is ever pickled.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Sequence, Union

import msgspec

from genserve.catalog import MAX_WEIGHT, MIN_WEIGHT
from genserve.spec import GenerationParams, TaskSpec
from genserve.views import (  # noqa: F401  (re-exported: the views are part of this contract)
    LoraInfo,
    NodeStats,
    NodeView,
    Progress,
    QueueView,
    ResultMeta,
    ServedModel,
    TaskView,
)

MAX_BATCH = 16  # most tasks a node may run in one pipeline call
VERSION = b"GS2"  # GS1 carried free-form msgpack maps

# Node -> broker
READY = b"\x01"
HEARTBEAT = b"\x02"  # both ways; from the broker it is empty
PROGRESS = b"\x03"
RESULT = b"\x04"
ERROR = b"\x05"
DISCONNECT = b"\x06"  # both ways
# Broker -> node
JOB = b"\x10"
CANCEL = b"\x11"
RESULT_ACK = b"\x12"  # the broker has stored a RESULT/ERROR: the node may forget it
RECALL = b"\x13"  # give back a job that waits behind the running one, unless it has started
# Front -> broker
SUBMIT = b"\x20"
STATUS = b"\x21"
FETCH = b"\x22"
CANCEL_TASK = b"\x23"
INFO = b"\x24"
ADMIN = b"\x25"
LEASE = b"\x26"  # rate-limit tokens for one key, granted in batches
LIST = b"\x27"  # one page of tasks, newest first
WATCH = b"\x28"  # (un)subscribe to tasks' events; the reply is their current views
METRICS = b"\x29"  # the broker's and nodes' figures in Prometheus text format (a blob)
# Broker -> front
ACK = b"\x30"
REPLY = b"\x31"
FAIL = b"\x32"
DONE = b"\x33"  # pushed to the submitting front when a watched task ends
EVENT = b"\x34"  # pushed to subscribed fronts when a task changes (event streams)

# Task states, in lifecycle order.
QUEUED = "queued"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
FINAL_STATES = frozenset({COMPLETED, FAILED, CANCELLED})
STATES = (QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED)


class _Header(msgspec.Struct, omit_defaults=True):
    """Base of every header: omitted defaults keep messages small."""


# ---- front <-> broker -----------------------------------------------------------------------

class Submit(_Header, forbid_unknown_fields=True):
    """Queue a task; `images` names the blob frames in order."""

    req: int
    task: TaskSpec
    owner: str
    images: list[str] = []
    watch: bool = False  # push DONE to this front when the task ends
    deadline: float | None = None  # broker clock; refused after it (its client was told it failed)
    idempotency_key: str | None = None
    weight: Annotated[float, msgspec.Meta(ge=MIN_WEIGHT, le=MAX_WEIGHT)] = 1.0  # the key's fair-share weight


class Status(_Header, forbid_unknown_fields=True):
    """A task's state; `watch` also asks for DONE when it ends."""

    req: int
    task_id: str
    watch: bool = False


class Fetch(_Header, forbid_unknown_fields=True):
    """A task's state and, once completed, its image as a blob."""

    req: int
    task_id: str


class CancelTask(_Header, forbid_unknown_fields=True):
    """Cancel a task; `orphaned`: its client was told the submit failed."""

    req: int
    task_id: str
    orphaned: bool = False


class InfoRequest(_Header, forbid_unknown_fields=True):
    """Nodes, served models, queue and task counts."""

    req: int


class Admin(_Header, forbid_unknown_fields=True):
    """Operator actions on one node."""

    req: int
    action: Literal["drain", "undrain"]
    node: str


class Lease(_Header, forbid_unknown_fields=True):
    """Ask for up to `want` request tokens for `key` (limit per window), giving back `returned`."""

    req: int
    key: str
    want: int
    limit: int
    window: float
    returned: int = 0


class ListTasks(_Header, forbid_unknown_fields=True):
    """A page of tasks, newest first: one owner's (None: everyone's), optionally one status."""

    req: int
    owner: str | None = None
    status: str | None = None
    limit: int = 20
    before: int | None = None  # the cursor: only tasks accepted before this sequence number


class Watch(_Header, forbid_unknown_fields=True):
    """Subscribe this front to the events of these tasks (or unsubscribe); REPLY is a WatchBody."""

    req: int
    task_ids: list[str]
    subscribe: bool = True


class MetricsRequest(_Header, forbid_unknown_fields=True):
    """The cluster's figures: REPLY is a MetricsBody and one blob of Prometheus text."""

    req: int


class Ack(_Header):
    """A SUBMIT was accepted (or replayed under its Idempotency-Key)."""

    req: int
    now: float
    task_id: str
    queue_position: int | None = None
    replayed: bool = False


class TaskBody(msgspec.Struct, tag="task"):
    """REPLY body: one task."""

    task: TaskView


class InfoBody(msgspec.Struct, tag="info"):
    """REPLY body: the INFO snapshot."""

    nodes: list[NodeView]
    models: dict[str, ServedModel]
    queue: QueueView
    tasks: dict[str, int]
    time: float


class NodeBody(msgspec.Struct, tag="node"):
    """REPLY body: one node after an ADMIN action."""

    node: NodeView


class LeaseBody(msgspec.Struct, tag="lease"):
    """REPLY body: tokens granted, and seconds to wait when none were."""

    granted: int
    retry_after: float


class TaskListBody(msgspec.Struct, tag="list"):
    """REPLY body: a page of tasks, and the cursor of the next page (None at the end)."""

    tasks: list[TaskView]
    next_before: int | None


class WatchBody(msgspec.Struct, tag="watch"):
    """REPLY body: the watched tasks that exist, and the event counter now (later events are larger)."""

    tasks: list[TaskView]
    event_id: int


class MetricsBody(msgspec.Struct, tag="metrics"):
    """REPLY body: the media type of the Prometheus text in the blob."""

    content_type: str


class Reply(_Header):
    """The answer to STATUS, FETCH, CANCEL_TASK, INFO, ADMIN, LEASE, LIST, WATCH or METRICS."""

    req: int
    now: float
    body: Union[TaskBody, InfoBody, NodeBody, LeaseBody, TaskListBody, WatchBody, MetricsBody]


class Fail(_Header):
    """A refused request, with an error code from genserve.errors."""

    req: int
    now: float
    code: str
    message: str
    served: list[str] | None = None
    supported: list[str] | None = None


class Done(_Header):
    """A watched task ended; a completed one carries its image as a blob."""

    task: TaskView


# Event kinds: the queue position changed (also a re-queue), a node started it, a denoising step,
# then one of the final states.
EventKind = Literal["position", "running", "progress", "completed", "failed", "cancelled"]
# Messages the broker may queue for one front, and one front for the broker: bursts of events
# (one per streamed task when the queue moves) must fit.
FRONT_HWM = 100_000


class Event(_Header):
    """A subscribed task changed; `event_id` grows with every event the broker sends."""

    kind: EventKind
    event_id: int
    task: TaskView


# ---- node <-> broker ------------------------------------------------------------------------

class Ready(_Header):
    """A node registers: what it can serve and whether it is still running a task."""

    node_id: str
    device: str
    host: str
    pid: int
    models: dict[str, list[str]]
    memory_total: int = 0
    memory_free: int = 0
    loaded: list[str] = []
    loras: list[LoraInfo] = []
    busy_task: str | None = None
    busy_riders: list[str] = []  # the riders of busy_task's JOB, in the same pipeline call
    # Tasks it gave up but still runs (busy without busy_task): their final reports, not any other,
    # mean it is free. None: an older node that does not say.
    unwinding: list[str] | None = None
    busy: bool = False
    # Tasks whose final report (RESULT or ERROR) follows on this connection: reports kept while
    # the broker was away, and a task this node gave up but is still unwinding. None: an older
    # node that does not say, so the broker waits out its recovery grace for them.
    reports: list[str] | None = None
    # Jobs it takes beyond the running one (a credit of 1 + prefetch): the next job waits on the node
    # while the previous image is encoded and sent. 0: one job at a time, as older nodes.
    prefetch: Annotated[int, msgspec.Meta(ge=0, le=8)] = 0
    # Most tasks it runs in one pipeline call (genserve.spec.batch_key); 1: each job alone.
    batch: Annotated[int, msgspec.Meta(ge=1, le=MAX_BATCH)] = 1
    batch_pixels: Annotated[int, msgspec.Meta(ge=0)] = 0  # only images up to this many pixels batch; 0: any


class Heartbeat(_Header):
    """Liveness both ways; from a node it also refreshes what the broker knows of it."""

    loaded: list[str] | None = None
    memory_free: int | None = None
    loras: list[LoraInfo] | None = None  # None: unchanged (the full list is sent every few beats)
    idle: bool | None = None
    task_id: str | None = None
    leaving: bool = False  # the node is stopping: give it no new work
    stats: NodeStats | None = None
    lora_sets: dict[str, str] | None = None  # as in Result


class ProgressReport(_Header):
    """A running task's denoising step; step 0: the node has just started it (after a prefetch, too)."""

    task_id: str
    step: int
    total: int
    run: str = ""  # the JOB's run it reports on ("" from an older node)


class Result(_Header):
    """A finished image (one blob frame) and its metadata."""

    task_id: str
    meta: ResultMeta
    run: str = ""  # the JOB's run this image comes from ("" from an older node)
    loaded: list[str] | None = None
    lora_sets: dict[str, str] | None = None  # model -> LoRA set resident in its slots (genserve.spec.lora_set_key)


class Error(_Header):
    """A job that ended without an image."""

    task_id: str
    code: str
    message: str
    run: str = ""  # the JOB's run it reports on ("" from an older node)
    loaded: list[str] | None = None


class Disconnect(_Header):
    """Leaving (node), or please register again (broker)."""

    reason: str = ""


class Rider(msgspec.Struct, omit_defaults=True):
    """A task that runs in its lead JOB's pipeline call: the lead's model, mode and batch key, its own
    prompt, seed and output encoding. It reports like any task (its own RESULT or ERROR, stamped `run`)."""

    task_id: str
    params: GenerationParams
    attempt: int = 1
    run: str = ""


class Job(_Header):
    """Run one task, with any `riders` in the same pipeline call; `images` names the blob frames in order."""

    task_id: str
    model_id: str
    mode: str
    params: GenerationParams
    images: list[str] = []
    attempt: int = 1
    # Names this assignment of the task; the node stamps it on every report, so that a report kept
    # from an earlier assignment (a re-sent RECALLED, say) is never taken for one about this one.
    run: str = ""
    riders: list[Rider] = []


class Cancel(_Header):
    """Stop a task at its next step."""

    task_id: str
    reason: str = ""


class Recall(_Header):
    """Give back this waiting job (ERROR `recalled`) if it has not started; a started one runs on."""

    task_id: str


class ResultAck(_Header):
    """The broker has stored the node's report for this task (about run `run`; "": whichever it keeps)."""

    task_id: str
    run: str = ""


HEADERS: dict[bytes, type[Any]] = {
    READY: Ready, HEARTBEAT: Heartbeat, PROGRESS: ProgressReport, RESULT: Result, ERROR: Error,
    DISCONNECT: Disconnect, JOB: Job, CANCEL: Cancel, RESULT_ACK: ResultAck, RECALL: Recall,
    SUBMIT: Submit, STATUS: Status, FETCH: Fetch, CANCEL_TASK: CancelTask, INFO: InfoRequest,
    ADMIN: Admin, LEASE: Lease, LIST: ListTasks, WATCH: Watch, METRICS: MetricsRequest, ACK: Ack,
    REPLY: Reply, FAIL: Fail,
    DONE: Done, EVENT: Event,
}
COMMANDS: dict[type[Any], bytes] = {kind: command for command, kind in HEADERS.items()}
COMMAND_NAMES: dict[bytes, str] = {
    READY: "READY", HEARTBEAT: "HEARTBEAT", PROGRESS: "PROGRESS", RESULT: "RESULT", ERROR: "ERROR",
    DISCONNECT: "DISCONNECT", JOB: "JOB", CANCEL: "CANCEL", RESULT_ACK: "RESULT_ACK", RECALL: "RECALL",
    SUBMIT: "SUBMIT",
    STATUS: "STATUS", FETCH: "FETCH", CANCEL_TASK: "CANCEL_TASK", INFO: "INFO", ADMIN: "ADMIN",
    LEASE: "LEASE", LIST: "LIST", WATCH: "WATCH", METRICS: "METRICS", ACK: "ACK", REPLY: "REPLY", FAIL: "FAIL",
    DONE: "DONE",
    EVENT: "EVENT",
}
_ENCODER = msgspec.msgpack.Encoder()
_DECODERS = {command: msgspec.msgpack.Decoder(kind) for command, kind in HEADERS.items()}


class ProtocolError(ValueError):
    """A frame list that is not a valid GenServe message."""

    def __init__(self, message: str, version: bytes | None = None) -> None:
        super().__init__(message)
        self.version = version  # set when the peer speaks another protocol version


class Message(msgspec.Struct):
    """One decoded message: command byte, typed header and raw blob frames."""

    command: bytes
    header: Any
    blobs: list[bytes] = []

    @property
    def name(self) -> str:
        """Human-readable command name for logs."""
        return COMMAND_NAMES.get(self.command, repr(self.command))


def encode(header: Any, blobs: Sequence[bytes] = ()) -> list[bytes]:
    """Frames for one message (no routing identity); the command follows from the header's type."""
    command = COMMANDS.get(type(header))
    if command is None:
        raise ProtocolError(f"{type(header).__name__} is not a message header")
    return [VERSION, command, _ENCODER.encode(header), *blobs]


def decode(frames: Sequence[bytes]) -> Message:
    """Decode frames (identity already stripped) into a Message, or raise ProtocolError."""
    if len(frames) < 3:
        raise ProtocolError(f"expected at least 3 frames, got {len(frames)}")
    version, command = bytes(frames[0]), bytes(frames[1])
    if version != VERSION:
        raise ProtocolError(f"protocol version {version[:16]!r} is not {VERSION!r}", version=version[:16])
    decoder = _DECODERS.get(command)
    if decoder is None:
        raise ProtocolError(f"unknown command {command[:8]!r}")
    try:
        header = decoder.decode(frames[2])
    except msgspec.DecodeError as exc:  # ValidationError included
        raise ProtocolError(f"bad {COMMAND_NAMES[command]} header: {exc}") from exc
    return Message(command, header, [bytes(b) for b in frames[3:]])


def split_routed(frames: Sequence[bytes]) -> tuple[bytes, Message]:
    """Split a ROUTER-received frame list into (peer identity, Message)."""
    if not frames:
        raise ProtocolError("empty message")
    return bytes(frames[0]), decode(frames[1:])


def routed(identity: bytes, header: Any, blobs: Sequence[bytes] = ()) -> list[bytes]:
    """Frames addressed to `identity` for sending on a ROUTER."""
    return [identity, *encode(header, blobs)]


def request_id(frames: Sequence[bytes]) -> int | None:
    """Best-effort `req` of a front message that failed to decode, so its FAIL can be matched."""
    try:
        raw = msgspec.msgpack.decode(frames[2])
    except (msgspec.DecodeError, IndexError):
        return None
    req = raw.get("req") if isinstance(raw, dict) else None
    return req if isinstance(req, int) else None
