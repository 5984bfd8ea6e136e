"""The node's worker and encoder threads: a mixin of `gpu_node.node.Node`.

The worker thread takes jobs from the node's `JobSlot` and runs their pipeline calls one at a
time; the encoder thread turns finished images into RESULT frames while the next call runs.
Each reports to the socket thread over its own inproc PUSH socket.
"""

from __future__ import annotations

import logging
import queue
import time
from typing import TYPE_CHECKING, Callable

import zmq

from genserve import errors as e
from genserve import wire as w
from genserve.logs import ids

if TYPE_CHECKING:
    from gpu_node.node import Node

log = logging.getLogger(__name__)

PUSH_SEND_TIMEOUT_MS = 1000  # a send to a thread that has gone must not hang the process
Encode = Callable[[], "tuple[bytes, w.ResultMeta]"]  # turns a finished pipeline call into the result's bytes


class WorkerSide:
    """Worker and encoder threads of a node."""

    def _push_socket(self: Node) -> zmq.Socket:
        push = self.context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDTIMEO, PUSH_SEND_TIMEOUT_MS)
        push.connect(self._endpoint)
        return push

    def _work(self: Node) -> None:
        push = self._push_socket()
        taken: tuple[str, tuple[w.Message, bool]] | None = None
        try:
            while taken is not None or not self._stop.is_set():  # a job already taken is run (or given up)
                taken = taken or self.slot.take(0.1)
                if taken is None:
                    continue
                task_id, (msg, behind) = taken
                self._step, self._cancel_step = 0, None
                outcomes = self._run_job(msg.header, msg.blobs, push, behind)
                riders = tuple(r.task_id for r in msg.header.riders)
                taken = self.slot.finished(task_id, riders)  # the next job starts now, while this one is encoded
                # Every report of the call goes out after it ended, so their order does not matter to the
                # broker (the lead's frees the node's place); errors go at once, images through the encoder.
                for one, outcome in outcomes:
                    if not callable(outcome):
                        self._hand_back(push, one, outcome)
                    elif taken is not None:
                        self._encodes.put((one, outcome))  # encoded on the encoder thread while the next runs
                    else:
                        # Nothing waits: encoding here saves a thread hop on the way to an idle broker's client.
                        self._hand_back(push, one, self._encoded(one, outcome))
        finally:
            self._encodes.put(None)  # the encoder finishes what is queued, then ends
            push.close(linger=0)

    def _hand_back(self: Node, push: zmq.Socket, task_id: str, frames: list[bytes]) -> None:
        try:
            push.send_multipart(frames, copy=False)
        except zmq.Again:
            log.warning("could not hand the report of task %s back; the broker re-queues it", task_id,
                        extra=ids(task_id, self.node_id))

    def _encode_results(self: Node) -> None:
        push = self._push_socket()
        try:
            while True:
                try:
                    item = self._encodes.get(timeout=0.1)
                except queue.Empty:
                    if not self._worker.is_alive():
                        return
                    continue
                if item is None:
                    return
                task_id, encode = item
                self._hand_back(push, task_id, self._encoded(task_id, encode))
        finally:
            push.close(linger=0)

    def _encoded(self: Node, task_id: str, encode: Encode) -> list[bytes]:
        """The RESULT (or ERROR) frames of a finished pipeline call (encoder thread; worker when nothing waits)."""
        from gpu_node.errors import JobError

        tagged = ids(task_id, self.node_id)
        try:
            data, meta = encode()
        except JobError as exc:
            return w.encode(w.Error(task_id, exc.code, str(exc)))
        except Exception as exc:  # a failed encode fails this job only
            log.exception("task %s failed while encoding", task_id, extra=tagged)
            return w.encode(w.Error(task_id, e.GENERATION, f"{type(exc).__name__}: {exc}"))
        log.info("task %s done in %.3fs (seed %s)", task_id, meta.generation_time, meta.seed, extra=tagged)
        return w.encode(w.Result(task_id, meta), [data])

    def _run_job(self: Node, h: w.Job, blobs: list[bytes], push: zmq.Socket,
                 behind: bool = False) -> list[tuple[str, Encode | list[bytes]]]:
        """Run one JOB's pipeline call (its riders too) on the worker thread; per task, its encoder or ERROR frames.

        `behind`: it came while the node held another job, so the broker may count it as waiting behind
        that one and learns from a step-0 PROGRESS that it started. Every report is handed back after
        the call, so that a READY sent meanwhile still lists the call's tasks as running here.
        """
        from gpu_node.generate import Job

        lead = h.task_id
        log.info("task %s: %s %s %dx%d, %d steps (attempt %d)%s", lead, h.model_id, h.mode, h.params.width,
                 h.params.height, h.params.num_inference_steps, h.attempt,
                 f" with riders {', '.join(r.task_id for r in h.riders)}" if h.riders else "",
                 extra=ids(lead, self.node_id))
        outcomes: list[tuple[str, Encode | list[bytes]]] = []
        jobs = []
        for task_id, params in ((lead, h.params), *((r.task_id, r.params) for r in h.riders)):
            if self._stopped(task_id):  # cancelled or given up while it waited: not one step
                code = e.CANCELLED if task_id in self._cancelled else e.RECALLED  # unstarted: no attempt spent
                log.info("task %s given up before its first step (%s)", task_id, code, extra=ids(task_id, self.node_id))
                outcomes.append((task_id, w.encode(w.Error(task_id, code, "stopped before its first step"))))
            else:
                jobs.append(Job(task_id, h.model_id, h.mode, params, dict(zip(h.images, blobs))))
        for job in jobs if behind else ():
            steps = job.params.num_inference_steps
            self._hand_back(push, job.task_id, w.encode(w.ProgressReport(job.task_id, 0, steps)))
        if len(jobs) > 1:
            together = self._call(jobs, push)
            if together is not None:
                return outcomes + together
            # A shared call failed (too big for the device, one bad job): each runs alone, so that one
            # task's failure is its own, and the others are not failed for it.
            log.warning("the shared call of %s failed; running its %d tasks one by one", lead, len(jobs),
                        extra=ids(lead, self.node_id))
        for job in jobs:
            if self._stopped(job.task_id):  # cancelled or given up during the failed call: no second start
                code = e.CANCELLED if job.task_id in self._cancelled else e.ABANDONED
                outcomes.append((job.task_id, w.encode(w.Error(job.task_id, code, "stopped after its shared call"))))
            else:
                outcomes += self._call([job], push, alone=True)
        return outcomes

    def _stopped(self: Node, task_id: str) -> bool:
        return task_id in self._cancelled or task_id in self._abandoned or self._stop.is_set()

    def _call(self: Node, jobs: list, push: zmq.Socket,
              alone: bool = False) -> list[tuple[str, Encode | list[bytes]]] | None:
        """One pipeline call for `jobs`; per task its encoder or ERROR frames. None: a shared call failed
        (`alone`: none will be tried after this one, so a failure is each job's own)."""
        from gpu_node.errors import Cancelled, JobError

        lead = jobs[0].task_id
        tagged = ids(lead, self.node_id)
        last_progress = time.monotonic()

        def on_step(step: int, total: int) -> None:
            nonlocal last_progress
            self._step = step
            # Rate-limited: on a loaded CPU or a fast GPU, a message per step
            # wakes two other threads per step and slows the denoising loop.
            now = time.monotonic()
            if now - last_progress >= self.config.progress_interval:
                last_progress = now
                for job in jobs:
                    try:
                        push.send_multipart(w.encode(w.ProgressReport(job.task_id, step, total)), zmq.NOBLOCK)
                    except zmq.Again:
                        pass  # progress is advisory; the next one will do

        def should_stop() -> bool:  # a call stops once none of its tasks wants it
            return all(self._stopped(job.task_id) for job in jobs)

        def each(code: str, message: str) -> list[tuple[str, Encode | list[bytes]]]:
            return [(job.task_id, w.encode(w.Error(job.task_id, code, message))) for job in jobs]

        shared = len(jobs) > 1 and not alone
        started = time.perf_counter()
        try:
            try:
                if len(jobs) == 1:
                    encoders = [self.runner(jobs[0], on_step, should_stop)]
                else:
                    assert self.batch_runner is not None  # a JOB with riders is refused without one
                    encoders = self.batch_runner(jobs, on_step, should_stop)
            finally:
                self.busy_seconds += time.perf_counter() - started
        except Cancelled:
            self.jobs += len(jobs)
            at = self._cancel_step if self._cancel_step is not None else self._step
            log.info("task %s stopped at step %d (cancel arrived at step %d)", lead, self._step, at, extra=tagged)
            # Only the broker's own CANCEL ends a task; stopping or losing the broker re-queues it.
            return [(job.task_id, w.encode(w.Error(job.task_id, e.CANCELLED if job.task_id in self._cancelled
                                                   else e.ABANDONED, f"stopped at step {self._step}")))
                    for job in jobs]
        except JobError as exc:
            if shared:
                return None  # its jobs run again alone, and are counted then
            self.jobs += len(jobs)
            return each(exc.code, str(exc))
        except Exception as exc:  # any failure fails this job only; the node keeps serving
            log.exception("task %s failed", lead, extra=tagged)
            if shared:
                return None
            self.jobs += len(jobs)
            return each(e.GENERATION, f"{type(exc).__name__}: {exc}")
        self.jobs += len(jobs)
        outcomes: list[tuple[str, Encode | list[bytes]]] = []
        for job, encode in zip(jobs, encoders):
            # Cancelled while a shared call ran on for the others: its image is not wanted. A finished image
            # of a task alone, or of one given up (node stopping, broker silent), is still sent: the broker
            # may adopt it, and finished work is never redone.
            if len(jobs) > 1 and job.task_id in self._cancelled:
                outcomes.append((job.task_id, w.encode(w.Error(job.task_id, e.CANCELLED, "cancelled during its call"))))
            else:
                outcomes.append((job.task_id, encode))
        return outcomes
