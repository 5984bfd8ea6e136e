"""Protocol-speaking fake GPU nodes, for broker and scheduler tests only."""

from __future__ import annotations

import io
import time
from typing import Any, Sequence

import zmq
from PIL import Image

from genserve import wire as w
from genserve.spec import GenerationParams

META = w.ResultMeta(generation_time=0.01, width=16, height=16, seed=1, steps=2, device="fake")


def png_bytes(color: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (16, 16)) -> bytes:
    """A small real PNG."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


class FakeNode:
    """A DEALER that registers like a node and is driven step by step by the test."""

    def __init__(self, context: zmq.Context, endpoint: str, name: str,
                 models: dict[str, list[str]] | None = None, loaded: list[str] | None = None,
                 identity: bytes | None = None) -> None:
        self.name = name
        self.models = models or {"flux1-dev": ["text2img", "img2img"]}
        self.loaded = loaded or []
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, identity or f"fake-{name}".encode())
        self.sock.connect(endpoint)

    def send(self, header: Any, blobs: list[bytes] | tuple = ()) -> None:
        """Send one typed message to the broker."""
        self.sock.send_multipart(w.encode(header, blobs))

    def ready(self, busy_task: str | None = None, busy: bool = False,
              reports: Sequence[str] | None = (), prefetch: int = 0, batch: int = 1,
              batch_pixels: int = 0, busy_riders: Sequence[str] = (),
              unwinding: Sequence[str] | None = None) -> "FakeNode":
        """Register (READY with capabilities); `busy` without a task: still unwinding an abandoned job;
        `reports`: tasks whose RESULT or ERROR follows (None: say nothing, as an older node);
        `prefetch`: jobs it takes beyond the running one; `batch`: most tasks per pipeline call."""
        self.send(w.Ready(node_id=self.name, device="fake", host="fakehost", pid=1, models=self.models,
                          loaded=self.loaded, memory_total=1 << 30, memory_free=1 << 29, busy_task=busy_task,
                          busy=busy or busy_task is not None, reports=None if reports is None else list(reports),
                          busy_riders=list(busy_riders), unwinding=None if unwinding is None else list(unwinding),
                          prefetch=prefetch, batch=batch, batch_pixels=batch_pixels))
        return self

    def recv(self, timeout: float = 2.0, skip_heartbeats: bool = True) -> w.Message | None:
        """Next message from the broker (heartbeats skipped), or None on timeout."""
        deadline = time.monotonic() + timeout
        while self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            msg = w.decode(self.sock.recv_multipart())
            if skip_heartbeats and msg.command == w.HEARTBEAT:
                continue
            return msg
        return None

    def recv_job(self, timeout: float = 2.0) -> w.Message | None:
        """Next JOB, or None."""
        msg = self.recv(timeout)
        while msg is not None and msg.command != w.JOB:
            msg = self.recv(timeout)
        return msg

    def heartbeat(self, idle: bool = True, **extra: Any) -> None:
        """Tell the broker we are alive (idle unless told otherwise)."""
        self.send(w.Heartbeat(loaded=self.loaded, idle=idle, **extra))

    def started(self, task_id: str, total: int = 4, run: str = "") -> None:
        """Say a job has started (PROGRESS step 0), as a node does when it takes a waiting job."""
        self.send(w.ProgressReport(task_id, 0, total, run=run))

    def error(self, task_id: str, code: str, message: str = "", run: str = "") -> None:
        """Report a job that ended without an image (`run`: the JOB's, as a node stamps it)."""
        self.send(w.Error(task_id, code, message or code, run=run))

    def finish(self, task_id: str, png: bytes | None = None, run: str = "") -> None:
        """Report a successful result."""
        self.send(w.Result(task_id, META, run=run), [png or png_bytes()])

    def close(self) -> None:
        """Close the socket (linger 0)."""
        self.sock.close(linger=0)


def params(**fields: Any) -> GenerationParams:
    """Generation parameters with small defaults, for tests that build tasks by hand."""
    base = {"prompt": "x", "width": 16, "height": 16, "num_inference_steps": 2, "seed": 1, "cfg": 3.5,
            "strength": 0.8}
    return GenerationParams(**{**base, **fields})
