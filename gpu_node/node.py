"""A GPU node: a DEALER to the broker on one thread, generation on another, encoding on a third.

The socket thread owns the DEALER: it registers (READY), heartbeats, hands JOBs to the
worker through the `JobSlot`, relays reports to the broker, and reconnects with
exponential backoff when the broker falls silent. The worker thread owns the pipelines
and runs one job at a time; as soon as a pipeline call returns it hands the image to
the encoder thread and takes the next job, which may already wait on the node
(prefetch), so the device does not idle while an image is encoded and sent. Worker and
encoder report to the socket thread over inproc PUSH sockets into one PULL, each
socket owned by one thread.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import msgspec
import zmq

from genserve import errors as e
from genserve import wire as w
from genserve.curve import setup_client
from genserve.logs import ids
from gpu_node.config import NodeConfig
from gpu_node.slot import Holding, JobSlot
from gpu_node.worker import Encode, WorkerSide

log = logging.getLogger(__name__)

REPORTS_ENDPOINT = "inproc://genserve-reports-{}"
FULL_EVERY = 10
FINAL_LINGER_MS = 500  # lets the last RESULT/ERROR/DISCONNECT leave before the process exits
MAX_UNACKED = 16  # finished reports kept for the broker; beyond this the oldest is dropped


@dataclass
class Capabilities:
    """What a node reports about itself; `loras` is None when not rescanned this time."""

    models: dict[str, list[str]]
    memory_total: int
    memory_free: int
    loaded: list[str]
    loras: list[w.LoraInfo] | None = None
    lora_sets: dict[str, str] | None = None  # loaded model -> the LoRA set its slots hold
    model_loads: int = 0
    load_seconds: float = 0.0
    evictions: int = 0


class Node(WorkerSide):
    """Socket side of a node; `runner(job, on_step, should_stop)` runs the pipeline and returns
    a callable that encodes its image (run on the encoder thread).

    `capabilities(full)` describes the node; `full` also rescans the LoRA folder. With
    `batch_runner(jobs, on_step, should_stop)` (one encoder per job) and `config.batch` > 1 the
    node offers to run a JOB's riders in the same pipeline call.
    """

    def __init__(self, config: NodeConfig, runner: Callable[..., Encode],
                 capabilities: Callable[[bool], Capabilities], context: zmq.Context | None = None,
                 batch_runner: Callable[..., list[Encode]] | None = None) -> None:
        self.config = config
        self.runner = runner
        self.batch_runner = batch_runner
        self.batch = config.batch if batch_runner is not None else 1
        self.capabilities = capabilities
        self.context = context or zmq.Context.instance()
        self.node_id = config.node_id or f"{socket.gethostname()}-{config.device}-{os.getpid()}"
        self._stop = threading.Event()
        self._cancelled: set[str] = set()  # cancelled by the broker: reported as cancelled
        self._abandoned: set[str] = set()  # given up by this node: reported so the broker re-queues
        # Final reports (RESULT/ERROR frames) the broker has not acknowledged yet: re-sent after
        # every registration, so work finished while the broker was away is never redone.
        self._unacked: OrderedDict[str, list[bytes]] = OrderedDict()
        # Room for every report of the calls it can hold (running, finishing, waiting) beyond the base.
        self._max_unacked = MAX_UNACKED + (2 + config.prefetch) * config.batch
        self._runs: dict[str, str] = {}  # task id -> the run of the JOB that assigned it (socket thread only)
        # Riders of the JOBs held here (socket thread only): lead -> its riders, rider -> its lead.
        self._groups: dict[str, tuple[str, ...]] = {}
        self._rider_of: dict[str, str] = {}
        self.slot = JobSlot(config.prefetch)
        self._encodes: queue.Queue[tuple[str, Encode] | None] = queue.Queue()
        self.busy_seconds = 0.0  # inside the runner, written by the worker thread only
        self.jobs = 0
        self._step = 0  # last denoising step of the current job (written by the worker)
        self._cancel_step: int | None = None  # the step at which the current job's CANCEL arrived
        self._endpoint = REPORTS_ENDPOINT.format(uuid.uuid4().hex)
        self._reports = self.context.socket(zmq.PULL)
        self._reports.setsockopt(zmq.LINGER, 0)
        self._reports.bind(self._endpoint)
        self._worker = threading.Thread(target=self._work, name="genserve-worker", daemon=True)
        self._encoder = threading.Thread(target=self._encode_results, name="genserve-encoder", daemon=True)
        self.dealer: zmq.Socket | None = None
        self._last_recv = self._last_sent = self._registered_at = 0.0
        self._beats = 0

    @property
    def current(self) -> str | None:
        """The task the worker runs now, if any."""
        return self.slot.running

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
        held = self._give_back("given back at registration")  # the broker may have placed it elsewhere
        running = held.running
        keeps = running if running not in self._abandoned else None
        reports = [*self._unacked, *held.finishing]
        riders = list(self._groups.get(running, ())) if running is not None else []
        unwinding: list[str] = []
        if running is not None and keeps is None:
            # Abandoned: its RESULT or ERROR, and its riders', come when the worker stops.
            unwinding = [running, *riders]
            reports.extend(t for t in unwinding if t not in reports)
            riders = []
        caps = self.capabilities(True)
        self._send(w.Ready(node_id=self.node_id, device=self.config.device, host=socket.gethostname(),
                           pid=os.getpid(), models=caps.models, memory_total=caps.memory_total,
                           memory_free=caps.memory_free, loaded=caps.loaded, loras=caps.loras or [],
                           busy_task=keeps, busy_riders=riders, busy=running is not None, reports=reports,
                           unwinding=unwinding,
                           prefetch=self.slot.prefetch, batch=self.batch, batch_pixels=self.config.batch_pixels))
        for task_id, frames in self._unacked.items():
            log.info("re-sending the unacknowledged report of task %s", task_id, extra=ids(task_id, self.node_id))
            self._send_frames(frames)

    def _give_back(self, why: str) -> Holding:
        """Give back every waiting job (a RECALLED report each, CANCELLED if the broker cancelled it, kept until
        acknowledged); what runs and finishes."""
        held = self.slot.give_back()
        recalled = tuple(task_id for lead in held.recalled for task_id in self._ungroup(lead))
        for task_id in recalled:
            self._keep(task_id, w.encode(self._unstarted(task_id, why)))
        return dataclasses.replace(held, recalled=recalled)

    def _unstarted(self, task_id: str, why: str) -> w.Error:
        """The final report of a job given back before it started: CANCELLED if the broker cancelled it."""
        code = e.CANCELLED if task_id in self._cancelled else e.RECALLED  # no attempt spent either way
        self._cancelled.discard(task_id)
        self._abandoned.discard(task_id)
        return self._stamped(w.Error(task_id, code, why))

    def _members(self, lead: str) -> tuple[str, ...]:
        """The tasks of one JOB: the lead and its riders."""
        return (lead, *self._groups.get(lead, ()))

    def _ungroup(self, lead: str) -> tuple[str, ...]:
        """Forget a JOB's grouping (it was given back or ended); returns its tasks, riders first: reported in
        this order, the lead's report, which frees the node's place at the broker, comes last."""
        riders = self._groups.pop(lead, ())
        for rider in riders:
            self._rider_of.pop(rider, None)
        return (*riders, lead)

    def _send(self, header: Any, blobs: list[bytes] | tuple = ()) -> None:
        self._send_frames(w.encode(header, blobs))

    def _send_frames(self, frames: list[bytes]) -> None:
        assert self.dealer is not None
        try:
            self.dealer.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:  # the broker is unreachable and the pipe is full: heartbeats will tell
            log.warning("broker pipe full; dropped one message")
        self._last_sent = time.monotonic()

    def stop(self) -> None:
        """Ask the node to leave (thread-safe); the running step finishes first, no other job starts."""
        self._stop.set()
        self.slot.close()

    def run(self) -> None:
        """Serve until stop(): register, then relay between broker and worker."""
        self._worker.start()
        self._encoder.start()
        self._connect()
        backoff = self.config.heartbeat_interval
        poller = zmq.Poller()
        poller.register(self._reports, zmq.POLLIN)
        poller.register(self.dealer, zmq.POLLIN)
        interval = self.config.heartbeat_interval
        while not self._stop.is_set():
            events = dict(poller.poll(timeout=int(interval * 250)))
            if self.dealer in events:
                self._drain_broker()
                backoff = interval
            if self._reports in events:
                self._drain_reports()
            now = time.monotonic()
            if now - self._last_recv > interval * self.config.liveness:
                log.warning("broker silent for %.1fs; reconnecting in %.1fs", now - self._last_recv, backoff)
                # Waiting jobs go back too: the broker may place them elsewhere once it has expired us.
                running = self._give_back("given back: the broker fell silent").running
                if running is not None and running not in self._abandoned:
                    # The broker has expired us by now and may give the task to another node:
                    # stop at the next step so that it never runs twice at once.
                    log.warning("abandoning task %s", running, extra=ids(running, self.node_id))
                    self._abandoned.update(self._members(running))
                poller.unregister(self.dealer)
                if self._stop.wait(backoff):
                    poller.register(self.dealer, zmq.POLLIN)
                    break  # stopping: leave through _shutdown, do not register again
                backoff = min(backoff * 2, self.config.reconnect_max)
                self._connect()
                poller.register(self.dealer, zmq.POLLIN)
            elif now - self._last_sent >= interval:
                self._send(self._heartbeat())
        self._shutdown()

    def _heartbeat(self, leaving: bool = False) -> w.Heartbeat:
        self._beats += 1
        # Every FULL_EVERY-th heartbeat re-reports LoRAs, so files added later become visible.
        live = self.capabilities(self._beats % FULL_EVERY == 0)
        stats = w.NodeStats(busy_seconds=round(self.busy_seconds, 3), jobs=self.jobs, model_loads=live.model_loads,
                            load_seconds=round(live.load_seconds, 3), evictions=live.evictions)
        return w.Heartbeat(loaded=live.loaded, memory_free=live.memory_free, loras=live.loras,
                           idle=self.slot.idle, task_id=self.slot.running, leaving=leaving, stats=stats,
                           lora_sets=live.lora_sets)

    def _drain_broker(self) -> None:
        assert self.dealer is not None
        while True:
            try:
                frames = self.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_recv = time.monotonic()
            try:
                msg = w.decode(frames)
            except w.ProtocolError as exc:
                log.warning("bad broker message: %s", exc)
                continue
            if msg.command == w.JOB:
                self._on_job(msg)
            elif msg.command == w.RESULT_ACK:
                self._acknowledged(msg.header)
            elif msg.command == w.CANCEL:
                self._on_cancel(msg.header)
            # Only a job behind a running one is given back: once a call has ended, the broker counts the
            # job waiting behind it as started (the worker takes it next), whether or not it was taken yet.
            elif msg.command == w.RECALL and self.slot.running is not None and self.slot.recall(msg.header.task_id):
                for task_id in self._ungroup(msg.header.task_id):
                    self._report(self._unstarted(task_id, "recalled before it started"))
            elif msg.command == w.DISCONNECT:
                # After a broker restart every message we sent meanwhile earns one of these:
                # register once, not once per message.
                if not self._stop.is_set() and \
                        time.monotonic() - self._registered_at >= self.config.heartbeat_interval:
                    log.info("broker asked to re-register: %s", msg.header.reason)
                    self._register()

    def _on_cancel(self, h: w.Cancel) -> None:
        # Marked first, so that the worker stops at most one step later, or before the first step
        # if it takes the job from the slot meanwhile.
        self._cancelled.add(h.task_id)
        lead = self._rider_of.get(h.task_id)
        if lead is not None:
            # A rider stops with its call only if every task of that call has stopped; otherwise the call
            # runs on and the rider reports CANCELLED (a waiting one is dropped before the call starts).
            # The mark stays until its report: the call may start or end meanwhile.
            log.info("cancel %s (%s), a rider of %s", h.task_id, h.reason, lead, extra=ids(h.task_id, self.node_id))
        elif self.slot.recall(h.task_id):
            for task_id in self._ungroup(h.task_id):  # its riders never started: back in line, no attempt spent
                self._report(self._unstarted(task_id, "cancelled before it started" if task_id == h.task_id
                                             else "its lead was cancelled before it started"))
        elif h.task_id == self.slot.running:  # not waiting, so no later take can start it: this is final
            self._cancel_step = self._step
            log.info("cancel %s (%s) at step %d", h.task_id, h.reason, self._step, extra=ids(h.task_id, self.node_id))
        else:
            self._cancelled.discard(h.task_id)  # finished, or never here: nothing to stop

    def _on_job(self, msg: w.Message) -> None:
        h: w.Job = msg.header
        runs = {h.task_id: h.run, **{r.task_id: r.run for r in h.riders}}
        if len(h.riders) >= self.batch:  # more than it offered: it cannot tell what it would run
            self._refuse(runs, f"this node runs at most {self.batch} per call")
            return
        fresh = {}
        for task_id, run in runs.items():
            kept = self._unacked.get(task_id)
            if self._holds(task_id):
                # Held already (a JOB sent again, or riding in another JOB): it reports as this assignment.
                self._runs[task_id] = run
                self._abandoned.discard(task_id)  # the broker wants it here after all
            elif kept is not None and kept[1] == w.RESULT:
                # Already made, its report not acknowledged: the image, for this assignment, and no second run.
                report = w.decode(kept)
                self._report(msgspec.structs.replace(report.header, run=run), report.blobs)
            else:
                fresh[task_id] = run
        if not fresh:
            return
        if h.task_id not in fresh or self._stop.is_set():
            self._refuse(fresh, "node is stopping" if self._stop.is_set() else "its lead is held here already")
            return
        if len(fresh) < len(runs):
            msg = w.Message(msg.command, msgspec.structs.replace(h, riders=[r for r in h.riders if r.task_id in fresh]),
                            msg.blobs)
            h = msg.header
        # A job offered while the node holds another may be one the broker sent to wait behind it:
        # the worker then says when it starts (step-0 PROGRESS).
        if not self.slot.offer(h.task_id, (msg, self.slot.busy)):
            self._refuse(fresh, "node is busy")
            return
        for task_id, run in fresh.items():
            self._unacked.pop(task_id, None)  # a kept ERROR of an earlier assignment: this one supersedes it
            self._runs[task_id] = run
        if h.riders:
            self._groups[h.task_id] = tuple(r.task_id for r in h.riders)
            self._rider_of.update((r.task_id, h.task_id) for r in h.riders)

    def _holds(self, task_id: str) -> bool:
        """Whether the task runs, waits or finishes here, as a JOB's lead or one of its riders."""
        return task_id in self._rider_of or self.slot.holds(task_id)

    def _refuse(self, runs: dict[str, str], why: str) -> None:
        """NODE_BUSY for tasks that never started here (the broker puts them back in line)."""
        for task_id, run in runs.items():
            self._send(w.Error(task_id, e.NODE_BUSY, why, run=run))

    def _acknowledged(self, ack: w.ResultAck) -> None:
        """Forget a kept report the broker has stored; an ack of an earlier assignment's report keeps a later one."""
        kept = self._unacked.get(ack.task_id)
        if kept is not None and (not ack.run or w.decode(kept).header.run in ("", ack.run)):
            del self._unacked[ack.task_id]

    def _stamped(self, header: Any) -> Any:
        """A report on a task, naming the assignment it is about (the last JOB's run); final ones end it."""
        final = isinstance(header, (w.Result, w.Error))
        run = self._runs.pop(header.task_id, "") if final else self._runs.get(header.task_id, "")
        return msgspec.structs.replace(header, run=run)

    def _report(self, header: w.Result | w.Error, blobs: list[bytes] | tuple = ()) -> None:
        """Send a final report, kept until the broker acknowledges it."""
        frames = w.encode(header, blobs)
        self._keep(header.task_id, frames)
        self._send_frames(frames)

    def _drain_reports(self) -> None:
        while True:
            try:
                frames = self._reports.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = w.decode(frames)
            if msg.command in (w.RESULT, w.ERROR):
                task_id = msg.header.task_id
                self._cancelled.discard(task_id)
                self._abandoned.discard(task_id)
                # Every report of a call comes after it ended, when its riders count as finishing.
                self._ungroup(task_id)
                self._rider_of.pop(task_id, None)
                # The job may have loaded a model or LoRAs: tell the broker now, not at the next heartbeat.
                live = self.capabilities(False)
                sets = {"lora_sets": live.lora_sets} if isinstance(msg.header, w.Result) else {}
                self._report(self._stamped(msgspec.structs.replace(msg.header, loaded=live.loaded, **sets)),
                             msg.blobs)
                self.slot.reported(task_id)  # after _keep: a READY lists it either way
            else:
                self._send(self._stamped(msg.header))

    def _keep(self, task_id: str, frames: list[bytes]) -> None:
        self._unacked[task_id] = frames
        while len(self._unacked) > self._max_unacked:
            # A made image is the last to go: dropping it means running its task again. The report just
            # kept stays: the caller sends it, or lists it in READY.
            older = [t for t in self._unacked if t != task_id]
            dropped = next((t for t in older if self._unacked[t][1] != w.RESULT), older[0])
            del self._unacked[dropped]
            log.warning("dropping the unacknowledged report of task %s (more than %d kept)", dropped, self._max_unacked,
                        extra=ids(dropped, self.node_id))

    def _shutdown(self) -> None:
        """Give back waiting jobs, let the running one stop at its next step and the encoder finish,
        report them, leave the broker; every wait bounded."""
        deadline = time.monotonic() + self.config.shutdown_grace
        if self.dealer is not None:
            self._send(self._heartbeat(leaving=True))  # no new JOB, please
        for task_id in self._give_back("node is stopping").recalled:
            if task_id in self._unacked:
                self._send_frames(self._unacked[task_id])
        if self.slot.running is not None:
            log.info("stopping: task %s will be re-queued after its current step", self.slot.running,
                     extra=ids(self.slot.running, self.node_id))
        while (self._worker.is_alive() or self._encoder.is_alive()) and time.monotonic() < deadline:
            if self._reports.poll(50):
                self._drain_reports()
            if self.dealer is not None and self.dealer.poll(0):
                self._drain_broker()
            if self.dealer is not None and time.monotonic() - self._last_sent >= self.config.heartbeat_interval:
                self._send(self._heartbeat(leaving=True))  # a long last step must not look like death
        self._drain_reports()
        if self._worker.is_alive() or self._encoder.is_alive():
            log.warning("the worker did not stop within %.1fs; leaving anyway", self.config.shutdown_grace)
        if self.dealer is not None:
            # DISCONNECT makes the broker re-queue at once whatever it still thinks we run.
            self._send(w.Disconnect("shutting down"))
            self.dealer.close(linger=FINAL_LINGER_MS)
            self.dealer = None
        self._reports.close(linger=0)
