"""The GenServe wire protocol: the one contract between front, broker and nodes.

A message is the frame list ``[VERSION, COMMAND, msgpack(header), *blobs]``;
ROUTER sockets prepend the peer identity. Commands are one byte. Headers are
small msgpack maps of plain types; images travel as raw bytes in blob frames,
never inside msgpack and never base64. Nothing is ever pickled.

This module imports only the standard library and msgpack (never torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack

PROTOCOL_VERSION = b"GS1"

# Node -> broker
READY = b"\x01"
HEARTBEAT = b"\x02"
PROGRESS = b"\x03"
RESULT = b"\x04"
ERROR = b"\x05"
DISCONNECT = b"\x06"
# Broker -> node (HEARTBEAT and DISCONNECT also flow this way)
JOB = b"\x10"
CANCEL = b"\x11"
RESULT_ACK = b"\x12"  # the broker has stored a RESULT/ERROR: the node may forget it
# Front -> broker
SUBMIT = b"\x20"
STATUS = b"\x21"
FETCH = b"\x22"
CANCEL_TASK = b"\x23"
INFO = b"\x24"
ADMIN = b"\x25"
LEASE = b"\x26"  # rate-limit tokens for one key, granted in batches
# Broker -> front
ACK = b"\x30"
REPLY = b"\x31"
FAIL = b"\x32"
DONE = b"\x33"  # pushed to the submitting front when a watched task ends

COMMAND_NAMES = {
    READY: "READY", HEARTBEAT: "HEARTBEAT", PROGRESS: "PROGRESS", RESULT: "RESULT",
    ERROR: "ERROR", DISCONNECT: "DISCONNECT", JOB: "JOB", CANCEL: "CANCEL", RESULT_ACK: "RESULT_ACK",
    SUBMIT: "SUBMIT", STATUS: "STATUS", FETCH: "FETCH", CANCEL_TASK: "CANCEL_TASK",
    INFO: "INFO", ADMIN: "ADMIN", LEASE: "LEASE", ACK: "ACK", REPLY: "REPLY", FAIL: "FAIL", DONE: "DONE",
}

# Task states, in lifecycle order.
QUEUED = "queued"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
FINAL_STATES = frozenset({COMPLETED, FAILED, CANCELLED})

# Error codes carried in FAIL / ERROR headers; the front maps them to HTTP.
E_BAD_REQUEST = "bad_request"
E_UNKNOWN_MODEL = "unknown_model"
E_UNSUPPORTED_MODE = "unsupported_mode"
E_NO_NODE = "no_node"
E_NOT_FOUND = "not_found"
E_QUEUE_FULL = "queue_full"
E_DISK_FULL = "disk_full"  # the disk budget cannot hold a new task's images: retry later
E_TIMEOUT = "timeout"
E_CANCELLED = "cancelled"
E_NODE_LOST = "node_lost"
E_ABANDONED = "abandoned"  # node lost the broker or is stopping: re-queue, not a failure
E_NODE_BUSY = "node_busy"  # a JOB reached a node that already runs one: re-queue
E_IDEMPOTENCY = "idempotency_mismatch"  # an Idempotency-Key reused for a different request
E_EXPIRED = "expired"  # a SUBMIT reached the broker after its deadline: the client was told it failed
E_GENERATION = "generation_failed"
E_PROTOCOL = "protocol"

# The six model ids and the modes each checkpoint supports (guide table 4.3).
MODEL_MODES: dict[str, tuple[str, ...]] = {
    "flux1-dev": ("text2img", "img2img"),
    "flux1-fill-dev": ("text2img", "img2img", "fill"),
    "flux1-depth-dev": ("controlnet",),
    "flux1-canny-dev": ("controlnet",),
    "flux1-openpose-dev": ("controlnet",),
    "flux1-redux-dev": ("redux",),
}
MODEL_IDS: tuple[str, ...] = tuple(MODEL_MODES)
CONTROL_TYPES: dict[str, str] = {
    "flux1-depth-dev": "depth",
    "flux1-canny-dev": "canny",
    "flux1-openpose-dev": "openpose",
}
MODES: tuple[str, ...] = ("text2img", "img2img", "fill", "controlnet", "redux")
IMAGE_FIELDS: tuple[str, ...] = ("input_image", "mask_image", "control_image")


class ProtocolError(ValueError):
    """A frame list that is not a valid GenServe message."""


@dataclass
class Message:
    """One decoded message: command byte, header map and raw blob frames."""

    command: bytes
    header: dict[str, Any] = field(default_factory=dict)
    blobs: list[bytes] = field(default_factory=list)

    @property
    def name(self) -> str:
        """Human-readable command name for logs."""
        return COMMAND_NAMES.get(self.command, repr(self.command))


def encode(command: bytes, header: dict[str, Any] | None = None,
           blobs: Sequence[bytes] = ()) -> list[bytes]:
    """Encode a message into frames (without any routing identity)."""
    if command not in COMMAND_NAMES:
        raise ProtocolError(f"unknown command {command!r}")
    packed = msgpack.packb(header or {}, use_bin_type=True)
    return [PROTOCOL_VERSION, command, packed, *blobs]


def decode(frames: Sequence[bytes]) -> Message:
    """Decode frames (identity already stripped) into a Message, or raise ProtocolError."""
    if len(frames) < 3:
        raise ProtocolError(f"expected at least 3 frames, got {len(frames)}")
    version, command, packed = bytes(frames[0]), bytes(frames[1]), frames[2]
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not {PROTOCOL_VERSION!r}")
    if command not in COMMAND_NAMES:
        raise ProtocolError(f"unknown command {command!r}")
    try:
        header = msgpack.unpackb(packed, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"header is not msgpack: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError("header must be a map")
    return Message(command, header, [bytes(b) for b in frames[3:]])


def split_routed(frames: Sequence[bytes]) -> tuple[bytes, Message]:
    """Split a ROUTER-received frame list into (peer identity, Message)."""
    if not frames:
        raise ProtocolError("empty message")
    return bytes(frames[0]), decode(frames[1:])


def routed(identity: bytes, command: bytes, header: dict[str, Any] | None = None,
           blobs: Sequence[bytes] = ()) -> list[bytes]:
    """Encode a message addressed to `identity` for sending on a ROUTER."""
    return [identity, *encode(command, header, blobs)]

