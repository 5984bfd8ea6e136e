"""A GPU node: a DEALER to the broker on one thread, generation on another.

The socket thread owns the DEALER: it registers (READY), heartbeats, forwards
JOBs to the worker and the worker's PROGRESS/RESULT/ERROR to the broker, and
reconnects with exponential backoff when the broker falls silent. The worker
thread owns the pipelines and runs one job at a time. The two talk over an
inproc PAIR, each end owned by one thread.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable

import zmq

from broker import protocol as p
from broker.curve import setup_client
from gpu_node.config import NodeConfig

log = logging.getLogger(__name__)

WORKER_ENDPOINT = "inproc://genserve-worker-{}"
FULL_EVERY = 10
PAIR_SEND_TIMEOUT_MS = 1000  # a send to a thread that has gone must not hang the process
FINAL_LINGER_MS = 500  # lets the last RESULT/ERROR/DISCONNECT leave before the process exits
MAX_UNACKED = 16  # finished reports kept for the broker; beyond this the oldest is dropped


class Node:
    """Socket side of a node; `runner(job, on_step, should_stop)` does the work.

    `capabilities(full)` describes the node: everything for READY when `full`,
    only the cheap live fields (loaded models, free memory) for heartbeats.
    """

    def __init__(self, config: NodeConfig, runner: Callable[..., tuple[bytes, dict]],
                 capabilities: Callable[[bool], dict[str, Any]], context: zmq.Context | None = None) -> None:
        self.config = config
        self.runner = runner
        self.capabilities = capabilities
        self.context = context or zmq.Context.instance()
        self.node_id = config.node_id or f"{socket.gethostname()}-{config.device}-{os.getpid()}"
        self._stop = threading.Event()
        self._cancelled: set[str] = set()  # cancelled by the broker: reported as cancelled
        self._abandoned: set[str] = set()  # given up by this node: reported so the broker re-queues
        # Final reports (RESULT/ERROR frames) the broker has not acknowledged yet: re-sent after
        # every registration, so work finished while the broker was away is never redone.
        self._unacked: OrderedDict[str, list[bytes]] = OrderedDict()
        self.current: str | None = None
        self.step = 0  # last denoising step of the current job (written by the worker)
        self.cancel_step: dict[str, int] = {}  # task -> step at which its CANCEL arrived
        self.stopped: dict[str, tuple[int, int]] = {}  # task -> (cancel step, step it stopped at)
        self._endpoint = WORKER_ENDPOINT.format(uuid.uuid4().hex)
        self._pair = self.context.socket(zmq.PAIR)
        self._pair.setsockopt(zmq.LINGER, 0)
        self._pair.setsockopt(zmq.SNDTIMEO, PAIR_SEND_TIMEOUT_MS)
        self._pair.bind(self._endpoint)
        self._worker = threading.Thread(target=self._work, name="genserve-worker", daemon=True)
        self.dealer: zmq.Socket | None = None
        self._last_recv = self._last_sent = self._registered_at = 0.0
        self._beats = 0

    # ---- socket thread ---------------------------------------------------

    def _connect(self) -> None:
        if self.dealer is not None:
            self.dealer.close(linger=0)
        self.dealer = self.context.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.setsockopt(zmq.IDENTITY, f"{self.node_id}/{uuid.uuid4().hex[:8]}".encode())
        setup_client(self.dealer, self.config.curve_secret_file, self.config.curve_server_public_file)
        self.dealer.connect(self.config.broker)
        self._last_recv = time.monotonic()
        self._register()

    def _register(self) -> None:
        self._registered_at = time.monotonic()
        keeps = self.current if self.current not in self._abandoned else None
        self._send(p.READY, {**self.capabilities(True), "node_id": self.node_id, "device": self.config.device,
                             "host": socket.gethostname(), "pid": os.getpid(), "busy_task": keeps,
                             "busy": self.current is not None})
        for task_id, frames in self._unacked.items():
            log.info("re-sending the unacknowledged report of task %s", task_id)
            self._send_frames(frames)

    def _send(self, command: bytes, header: dict[str, Any] | None = None, blobs: list[bytes] | tuple = ()) -> None:
        self._send_frames(p.encode(command, header, blobs))

    def _send_frames(self, frames: list[bytes]) -> None:
        assert self.dealer is not None
        try:
            self.dealer.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:  # the broker is unreachable and the pipe is full: heartbeats will tell
            log.warning("broker pipe full; dropped one message")
        self._last_sent = time.monotonic()

    def stop(self) -> None:
        """Ask the node to leave (thread-safe); the running step finishes first."""
        self._stop.set()

    def run(self) -> None:
        """Serve until stop(): register, then relay between broker and worker."""
        self._worker.start()
        self._connect()
        backoff = self.config.heartbeat_interval
        poller = zmq.Poller()
        poller.register(self._pair, zmq.POLLIN)
        poller.register(self.dealer, zmq.POLLIN)
        interval = self.config.heartbeat_interval
        while not self._stop.is_set():
            events = dict(poller.poll(timeout=int(interval * 250)))
            if self.dealer in events:
                self._drain_broker()
                backoff = interval
            if self._pair in events:
                self._drain_worker()
            now = time.monotonic()
            if now - self._last_recv > interval * self.config.liveness:
                log.warning("broker silent for %.1fs; reconnecting in %.1fs", now - self._last_recv, backoff)
                if self.current is not None and self.current not in self._abandoned:
                    # The broker has expired us by now and may give the task to another node:
                    # stop at the next step so that it never runs twice at once.
                    log.warning("abandoning task %s", self.current)
                    self._abandoned.add(self.current)
                poller.unregister(self.dealer)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.reconnect_max)
                self._connect()
                poller.register(self.dealer, zmq.POLLIN)
            elif now - self._last_sent >= interval:
                self._send(p.HEARTBEAT, self._heartbeat())
        self._shutdown()

    def _heartbeat(self) -> dict[str, Any]:
        self._beats += 1
        # Every FULL_EVERY-th heartbeat re-reports LoRAs, so files added later become visible.
        live = self.capabilities(self._beats % FULL_EVERY == 0)
        return {"loaded": live["loaded"], "memory_free": live["memory_free"], "loras": live.get("loras"),
                "idle": self.current is None, "task_id": self.current}

    def _drain_broker(self) -> None:
        assert self.dealer is not None
        while True:
            try:
                frames = self.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_recv = time.monotonic()
            try:
                msg = p.decode(frames)
            except p.ProtocolError as exc:
                log.warning("bad broker message: %s", exc)
                continue
            if msg.command == p.JOB:
                self._on_job(msg)
            elif msg.command == p.RESULT_ACK:
                self._unacked.pop(str(msg.header.get("task_id")), None)
            elif msg.command == p.CANCEL:
                task_id = str(msg.header.get("task_id"))
                self._cancelled.add(task_id)  # first, so the worker stops at most one step later
                if task_id == self.current:
                    self.cancel_step[task_id] = self.step
                log.info("cancel %s (%s) at step %d", task_id, msg.header.get("reason"), self.step)
            elif msg.command == p.DISCONNECT:
                # After a broker restart every message we sent meanwhile earns one of these:
                # register once, not once per message.
                if time.monotonic() - self._registered_at >= self.config.heartbeat_interval:
                    log.info("broker asked to re-register: %s", msg.header.get("reason"))
                    self._register()

    def _on_job(self, msg: p.Message) -> None:
        task_id = str(msg.header["task_id"])
        if self.current is not None or self._stop.is_set():
            self._send(p.ERROR, {"task_id": task_id, "code": p.E_NODE_BUSY,
                                 "message": "node is busy" if self.current else "node is stopping"})
            return
        self.current = task_id
        self._cancelled.discard(task_id)
        try:
            self._pair.send_multipart(p.encode(p.JOB, msg.header, msg.blobs), copy=False)
        except zmq.Again:  # the worker is gone (stopping): let the broker place the task elsewhere
            self.current = None
            self._send(p.ERROR, {"task_id": task_id, "code": p.E_NODE_BUSY, "message": "worker unavailable"})

    def _drain_worker(self) -> None:
        while True:
            try:
                frames = self._pair.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = p.decode(frames)
            if msg.command in (p.RESULT, p.ERROR):
                self.current = None
                # The job may have loaded a model: tell the broker now, not at the next heartbeat.
                msg.header["loaded"] = self.capabilities(False)["loaded"]
                frames = p.encode(msg.command, msg.header, msg.blobs)
                self._keep(str(msg.header["task_id"]), frames)
                self._send_frames(frames)
            else:
                self._send(msg.command, msg.header, msg.blobs)

    def _keep(self, task_id: str, frames: list[bytes]) -> None:
        self._unacked[task_id] = frames
        while len(self._unacked) > MAX_UNACKED:
            dropped, _ = self._unacked.popitem(last=False)
            log.warning("dropping the unacknowledged report of task %s (more than %d kept)", dropped, MAX_UNACKED)

    def _shutdown(self) -> None:
        """Let the running job stop at its next step, report it, leave the broker; every wait bounded."""
        deadline = time.monotonic() + self.config.shutdown_grace
        if self.dealer is not None:
            self._send(p.HEARTBEAT, {**self._heartbeat(), "leaving": True})  # no new JOB, please
        if self.current is not None:
            log.info("stopping: task %s will be re-queued after its current step", self.current)
        while self._worker.is_alive() and time.monotonic() < deadline:
            if self._pair.poll(50):
                self._drain_worker()
            if self.dealer is not None and self.dealer.poll(0):
                self._drain_broker()
        self._drain_worker()
        if self._worker.is_alive():
            log.warning("the worker did not stop within %.1fs; leaving anyway", self.config.shutdown_grace)
        if self.dealer is not None:
            # DISCONNECT makes the broker re-queue at once whatever it still thinks we run.
            self._send(p.DISCONNECT, {"reason": "shutting down"})
            self.dealer.close(linger=FINAL_LINGER_MS)
            self.dealer = None
        self._pair.close(linger=0)

    # ---- worker thread ---------------------------------------------------

    def _work(self) -> None:
        pair = self.context.socket(zmq.PAIR)
        pair.setsockopt(zmq.LINGER, 0)
        pair.setsockopt(zmq.SNDTIMEO, PAIR_SEND_TIMEOUT_MS)
        pair.connect(self._endpoint)
        try:
            while not self._stop.is_set():
                if not pair.poll(100):
                    continue
                msg = p.decode(pair.recv_multipart())
                try:
                    pair.send_multipart(self._run_job(msg, pair), copy=False)
                except zmq.Again:
                    log.warning("could not hand the report of task %s back; the broker re-queues it",
                                msg.header.get("task_id"))
        finally:
            pair.close(linger=0)

    def _run_job(self, msg: p.Message, pair: zmq.Socket) -> list[bytes]:
        """Run one JOB on the worker thread; returns the RESULT or ERROR frames for the broker."""
        from gpu_node.errors import Cancelled, JobError
        from gpu_node.generate import Job

        h = msg.header
        task_id = h["task_id"]
        job = Job(task_id, h["model_id"], h["mode"], h["params"], dict(zip(h.get("images", []), msg.blobs)))
        self.step = 0
        last_progress = time.monotonic()

        def on_step(step: int, total: int) -> None:
            nonlocal last_progress
            self.step = step
            # Rate-limited: on a loaded CPU or a fast GPU, a message per step
            # wakes two other threads per step and slows the denoising loop.
            now = time.monotonic()
            if now - last_progress >= self.config.progress_interval:
                last_progress = now
                try:
                    pair.send_multipart(p.encode(p.PROGRESS, {"task_id": task_id, "step": step, "total": total}),
                                        zmq.NOBLOCK)
                except zmq.Again:
                    pass  # progress is advisory; the next one will do

        def should_stop() -> bool:
            return task_id in self._cancelled or task_id in self._abandoned or self._stop.is_set()

        try:
            png, meta = self.runner(job, on_step, should_stop)
        except Cancelled:
            at = self.cancel_step.pop(task_id, self.step)
            self.stopped[task_id] = (at, self.step)
            log.info("task %s stopped at step %d (cancel arrived at step %d)", task_id, self.step, at)
            # Only the broker's own CANCEL ends a task; stopping or losing the broker re-queues it.
            code = p.E_CANCELLED if task_id in self._cancelled else p.E_ABANDONED
            return p.encode(p.ERROR, {"task_id": task_id, "code": code, "message": f"stopped at step {self.step}"})
        except JobError as exc:
            return p.encode(p.ERROR, {"task_id": task_id, "code": exc.code, "message": str(exc)})
        except Exception as exc:  # any failure fails this job only; the node keeps serving
            log.exception("task %s failed", task_id)
            return p.encode(p.ERROR, {"task_id": task_id, "code": p.E_GENERATION,
                                      "message": f"{type(exc).__name__}: {exc}"})
        log.info("task %s done in %.3fs (seed %s)", task_id, meta.get("generation_time", 0.0), meta.get("seed"))
        return p.encode(p.RESULT, {"task_id": task_id, "meta": meta}, [png])
