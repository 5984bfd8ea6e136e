"""Node duty cycle: with a backlog on one node, how long the device waits between pipeline calls.

    .venv/bin/python bench/node_duty.py [--tasks 24] [--rounds 3] [--size 256] [--steps 8] [--write F]

A real `genserve-broker` subprocess, and one real node (tiny flux1-dev, the node's own
threads) in this process, whose pipeline runner is wrapped to record when each call starts
and ends. Each round submits `--tasks` text2img tasks at once and waits for all of them, once
with `--prefetch 0` (the next JOB leaves the broker only after the last RESULT arrived) and
once with `--prefetch 1` (the next job already waits on the node; the worker starts it as soon
as the last pipeline call returns, while the image is encoded on the encoder thread). The
order alternates between rounds.

Reported per setting, pooled over rounds: the gap between one call's end and the next one's
start (median, p90), the node's busy share (time inside pipeline calls over the span from the
first call's start to the last one's end) and images/s (tasks over submit-to-last-result).
Issue 12's targets: median gap <= 2 ms, busy >= 99 %. On a 2-core machine the encoder thread
competes with torch for the cores, so images/s is reported beside the gap.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402
from genserve import wire as w  # noqa: E402
from genserve.spec import GenerationParams, TaskSpec  # noqa: E402

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Round:
    """One backlog run's figures."""

    gaps: list[float] = field(default_factory=list)  # seconds between a call's end and the next one's start
    calls: list[float] = field(default_factory=list)  # seconds inside each pipeline call
    busy: float = 0.0  # share of the span spent inside pipeline calls
    images_per_s: float = 0.0


def run_round(models: Path, prefetch: int, args: argparse.Namespace) -> Round:
    """Start a broker and a node, push the backlog through, return the figures; everything is closed."""
    import zmq

    from gpu_node.__main__ import build
    from gpu_node.catalog import resolve_model_paths
    from gpu_node.config import NodeConfig
    from http_front.broker_client import BrokerClient

    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    data = tempfile.mkdtemp(prefix="genserve-duty-")
    broker = subprocess.Popen([str(BIN / "genserve-broker"), "--frontend", front, "--backend", back,
                               "--data-dir", data, "--max-queued-per-key", "100000", "--log-level", "WARNING"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctx = zmq.Context()
    config = NodeConfig(broker=back, device="cpu", node_id=f"duty-{prefetch}", prefetch=prefetch, batch=1,
                        model_paths=resolve_model_paths(models, {}, "cpu", ("flux1-dev",)), max_sequence_length=32,
                        preload=("flux1-dev",))
    node, _ = build(config)  # (on the process's default context: its inproc sockets must share one)
    calls: list[tuple[float, float]] = []
    real = node.runner

    def timed(job: Any, on_step: Any, should_stop: Any) -> Any:
        started = time.perf_counter()
        try:
            return real(job, on_step, should_stop)
        finally:
            calls.append((started, time.perf_counter()))

    node.runner = timed
    thread = threading.Thread(target=node.run, daemon=True)
    client = None
    try:
        thread.start()
        client = BrokerClient(front, timeout=10.0, context=ctx).start()
        params = GenerationParams(prompt="duty", width=args.size, height=args.size, num_inference_steps=args.steps,
                                  seed=1, cfg=3.5, strength=0.8)
        until = time.monotonic() + 60
        while time.monotonic() < until:  # wait for the node to register
            info = client.request(w.InfoRequest(0)).header.body
            if info.nodes:
                break
            time.sleep(0.1)
        submitted = time.perf_counter()
        ids = [client.request(w.Submit(0, TaskSpec("flux1-dev", "text2img", 0, params), "bench")).header.task_id
               for _ in range(args.tasks)]
        # One node runs them in order: poll the last one only, so that the poller (in this process)
        # takes as little as possible from the node's threads.
        until = time.monotonic() + 600
        while time.monotonic() < until and client.request(w.Status(0, ids[-1])).header.body.task.status not in \
                w.FINAL_STATES:
            time.sleep(0.01)
        finished = time.perf_counter()
        states = [client.request(w.Status(0, task_id)).header.body.task.status for task_id in ids]
        if states != [w.COMPLETED] * len(ids):
            raise SystemExit(f"not all tasks completed: {states}")
    finally:
        if client is not None:
            client.close()
        node.stop()
        thread.join(timeout=30)
        broker.terminate()
        broker.wait(timeout=30)
        ctx.term()
    calls.sort()
    span = calls[-1][1] - calls[0][0]
    return Round(gaps=[b[0] - a[1] for a, b in zip(calls, calls[1:])], calls=[end - start for start, end in calls],
                 busy=sum(end - start for start, end in calls) / span,
                 images_per_s=len(calls) / (finished - submitted))


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(models: Path, args: argparse.Namespace) -> dict[int, list[Round]]:
    """Rounds of prefetch 0 and 1, alternating which goes first."""
    rounds: dict[int, list[Round]] = {0: [], 1: []}
    for i in range(args.rounds):
        for prefetch in ((0, 1) if i % 2 == 0 else (1, 0)):
            rounds[prefetch].append(run_round(models, prefetch, args))
            r = rounds[prefetch][-1]
            print(f"prefetch {prefetch}: median gap {statistics.median(r.gaps) * 1e3:.2f} ms, busy {r.busy:.1%},"
                  f" {r.images_per_s:.2f} images/s", file=sys.stderr)
    return rounds


def backlog_options(doc: str, extra: Callable[[argparse.ArgumentParser], None] = lambda _ap: None
                    ) -> argparse.Namespace:
    """The options of a backlog benchmark on one node (`extra` adds its own); checks the venv."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--write", type=Path, help="append the section to this markdown file")
    extra(ap)
    args = ap.parse_args()
    if not (BIN / "genserve-broker").exists():
        raise SystemExit("run with the project's venv python (make install)")
    return args


@contextmanager
def tiny_models() -> Iterator[Path]:
    """Tiny model folders in a temporary directory, removed afterwards."""
    import logging

    from gpu_node.tiny import build_all

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="genserve-bench-models-") as tmp:
        build_all(Path(tmp), seed=0)
        yield Path(tmp)


def main() -> None:
    """Interleaved rounds of prefetch 0 and 1; print (and optionally append) the section."""
    args = backlog_options(__doc__)
    with tiny_models() as models:
        rounds = measure(models, args)
    lines = [
        f"## Node duty cycle with a backlog (issue 12, point 3, {date.today()})",
        "",
        f"Command: `.venv/bin/python bench/node_duty.py --tasks {args.tasks} --rounds {args.rounds}"
        f" --size {args.size} --steps {args.steps}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; tiny flux1-dev"
        f" on the CPU, {args.size}x{args.size}, {args.steps} steps, PNG level 1; a real broker subprocess, one"
        f" node; {args.tasks} tasks submitted at once per round, prefetch 0 and 1 alternating.",
        "",
        "| node | median gap | p90 gap | median pipeline call | busy (per round) | images/s (per round) |",
        "|---|---|---|---|---|---|",
    ]
    for prefetch, label in ((0, "--prefetch 0 (one job at a time)"), (1, "--prefetch 1 (credit of two)")):
        gaps = [g for r in rounds[prefetch] for g in r.gaps]
        busy = ", ".join(f"{r.busy:.1%}" for r in rounds[prefetch])
        rate = ", ".join(f"{r.images_per_s:.2f}" for r in rounds[prefetch])
        call = statistics.median([c for r in rounds[prefetch] for c in r.calls])
        lines.append(f"| {label} | {statistics.median(gaps) * 1e3:.2f} ms | {pct(gaps, 0.9) * 1e3:.2f} ms |"
                     f" {call * 1e3:.1f} ms | {busy} | {rate} |")
    ratio = (statistics.median([r.images_per_s for r in rounds[1]])
             / statistics.median([r.images_per_s for r in rounds[0]]))
    lines.append("")
    lines.append(f"images/s, prefetch 1 / prefetch 0 (medians): {ratio:.3f}")
    emit(lines, args.write)


if __name__ == "__main__":
    main()
