"""Batching in serving: images/s and task latency of a backlog on one node, `--batch 1` against `--batch N`.

    .venv/bin/python bench/batch_serving.py [--tasks 24] [--rounds 3] [--size 256] [--steps 8] [--batch 4]
                                            [--write F]

A real `genserve-broker` subprocess and one real node (tiny flux1-dev, the node's own threads,
prefetch 1) in this process, whose pipeline runners are wrapped to count calls and images per
call. Each round submits `--tasks` text2img tasks at once (each with its own prompt and seed)
and waits for all of them, once on a node that runs every task alone and once on one that runs
up to `--batch` queued tasks with the same batch key in one pipeline call (`--batch-max-pixels 0`:
any size). The order alternates between rounds.

Reported per setting: images/s per round (tasks over submit-to-last-result), task latency
(acceptance to result, pooled p50 and p90) and images per pipeline call. The tiny model says
nothing about a GPU: there, bench/gpu_check.py's batching rows measure the pipeline call itself.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.node_duty import BIN, backlog_options, free_port, pct, tiny_models  # noqa: E402
from bench.report import emit  # noqa: E402
from genserve import wire as w  # noqa: E402
from genserve.spec import GenerationParams, TaskSpec  # noqa: E402


@dataclass
class Round:
    """One backlog run's figures."""

    images_per_s: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds from acceptance to result, per task
    per_call: list[int] = field(default_factory=list)  # images made by each pipeline call


def run_round(models: Path, batch: int, args: argparse.Namespace) -> Round:
    """Start a broker and a node, push the backlog through, return the figures; everything is closed."""
    import zmq

    from gpu_node.__main__ import build
    from gpu_node.catalog import resolve_model_paths
    from gpu_node.config import NodeConfig
    from http_front.broker_client import BrokerClient

    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    per_call: list[int] = []
    with tempfile.TemporaryDirectory(prefix="genserve-batch-") as data:
        broker = subprocess.Popen([str(BIN / "genserve-broker"), "--frontend", front, "--backend", back,
                                   "--data-dir", data, "--max-queued-per-key", "100000", "--log-level", "WARNING"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ctx = zmq.Context()
        config = NodeConfig(broker=back, device="cpu", node_id=f"batch-{batch}", prefetch=1, batch=batch,
                            batch_pixels=0, model_paths=resolve_model_paths(models, {}, "cpu", ("flux1-dev",)),
                            max_sequence_length=32, preload=("flux1-dev",))
        node, _ = build(config)  # (on the process's default context: its inproc sockets must share one)
        single, batched = node.runner, node.batch_runner

        def one(job: Any, *rest: Any) -> Any:
            per_call.append(1)
            return single(job, *rest)

        def several(jobs: list[Any], *rest: Any) -> Any:
            per_call.append(len(jobs))
            return batched(jobs, *rest)

        node.runner, node.batch_runner = one, several
        thread = threading.Thread(target=node.run, daemon=True)
        client = None
        try:
            thread.start()
            client = BrokerClient(front, timeout=10.0, context=ctx).start()
            until = time.monotonic() + 60
            while time.monotonic() < until and not client.request(w.InfoRequest(0)).header.body.nodes:
                time.sleep(0.1)  # the node registers
            submitted = time.perf_counter()
            ids = []
            for i in range(args.tasks):
                params = GenerationParams(prompt=f"backlog {i}", width=args.size, height=args.size,
                                          num_inference_steps=args.steps, seed=i, cfg=3.5, strength=0.8)
                ids.append(client.request(w.Submit(0, TaskSpec("flux1-dev", "text2img", 0, params), "bench"))
                           .header.task_id)
            until = time.monotonic() + 600
            views: list[w.TaskView] = []
            while time.monotonic() < until:
                views = [client.request(w.Status(0, task_id)).header.body.task for task_id in ids]
                if all(v.status in w.FINAL_STATES for v in views):
                    break
                time.sleep(0.05)
            finished = time.perf_counter()
            if [v.status for v in views] != [w.COMPLETED] * len(ids):
                raise SystemExit(f"not all tasks completed: {[v.status for v in views]}")
        finally:
            if client is not None:
                client.close()
            node.stop()
            thread.join(timeout=30)
            broker.terminate()
            broker.wait(timeout=30)
            ctx.term()
    return Round(images_per_s=len(ids) / (finished - submitted),
                 latencies=[v.finished_at - v.created_at for v in views], per_call=per_call)


def main() -> None:
    """Interleaved rounds of --batch 1 and --batch N; print (and optionally append) the section."""
    args = backlog_options(__doc__, lambda ap: ap.add_argument("--batch", type=int, default=4))
    settings = (1, args.batch)
    rounds: dict[int, list[Round]] = {b: [] for b in settings}
    with tiny_models() as models:
        for i in range(args.rounds):
            for batch in (settings if i % 2 == 0 else settings[::-1]):
                r = run_round(models, batch, args)
                rounds[batch].append(r)
                print(f"--batch {batch}: {r.images_per_s:.2f} images/s, {statistics.mean(r.per_call):.2f} per call",
                      file=sys.stderr)
    lines = [
        f"## Batching in serving on the CPU (issue 13, point 3, {date.today()})",
        "",
        f"Command: `.venv/bin/python bench/batch_serving.py --tasks {args.tasks} --rounds {args.rounds}"
        f" --size {args.size} --steps {args.steps} --batch {args.batch}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; tiny flux1-dev"
        f" on the CPU, {args.size}x{args.size}, {args.steps} steps; a real broker subprocess, one node with"
        f" prefetch 1; {args.tasks} tasks submitted at once per round, the two settings alternating.",
        "",
        "| node | images/s (per round) | task latency p50 | p90 | images per call (mean) |",
        "|---|---|---|---|---|",
    ]
    for batch in settings:
        rate = ", ".join(f"{r.images_per_s:.2f}" for r in rounds[batch])
        lat = [x for r in rounds[batch] for x in r.latencies]
        calls = [n for r in rounds[batch] for n in r.per_call]
        lines.append(f"| --batch {batch} | {rate} | {statistics.median(lat):.3f} s | {pct(lat, 0.9):.3f} s |"
                     f" {statistics.mean(calls):.2f} |")
    ratio = (statistics.median([r.images_per_s for r in rounds[args.batch]])
             / statistics.median([r.images_per_s for r in rounds[1]]))
    lines += ["", f"images/s, --batch {args.batch} / --batch 1 (medians): {ratio:.3f}"]
    emit(lines, args.write)


if __name__ == "__main__":
    main()
