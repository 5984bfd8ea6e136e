"""Where a synchronous /generate spends the time it adds to the pipeline call, in four parts.

    .venv/bin/python bench/latency_parts.py [--runs 60] [--size 64] [--steps 2] [--write docs/benchmarks.md]

One deployment (broker, one tiny-model CPU node and the front as subprocesses) answers
`--runs` sequential synchronous requests from one client after 5 warm-ups. Each answer
carries the broker's `created_at`, `started_at` and `finished_at` and the node's
`generation_time`; with the client's send and receive times (one machine, one clock):

- **in**: client send -> the broker accepted the task (HTTP, the front, the hop to the broker);
- **queue**: accepted -> its JOB sent to the idle node (journal commit, placement);
- **node**: JOB sent -> RESULT handled by the broker, less the pipeline call (the hop to the
  node, the hand-off to its worker, PNG encoding, the RESULT back, the journal write);
- **out**: RESULT handled -> the client holds the answer (DONE to the front, JSON with the
  image in base64, HTTP, the client's JSON parsing).

Beside them, the floor no server can go under on this machine: the same client against a bare
Falcon-on-waitress app that answers a JSON body of the same size, the request's JSON as its body;
and what one ZeroMQ hop costs here: a DEALER/ROUTER round trip over TCP between two processes,
each after 10 ms idle (as between a request's hops, which wait on a pipeline call). The served
path crosses processes four times (front, broker, node, broker, front).
Medians over the runs. Takes about 35 s plus the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import requests
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.front_rps import BARE, free_port  # noqa: E402
from bench.report import emit  # noqa: E402
from tests.conftest import Cluster, Processes, wait_until  # noqa: E402

KEY = "bench-parts-key-0123456789abcdef012"
PARTS = ("in", "queue", "node", "out")


def served(url: str, body: dict, runs: int) -> tuple[dict[str, list[float]], list[float], list[float], int]:
    """Per-run parts (ms), totals (ms), pipeline calls (ms) and the answer's size in bytes."""
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {KEY}"
    for _ in range(5):
        s.post(f"{url}/generate", json=body, timeout=120).raise_for_status()
    parts: dict[str, list[float]] = {p: [] for p in PARTS}
    totals, calls, size = [], [], 0
    for _ in range(runs):
        sent, t = time.time(), time.perf_counter()
        r = s.post(f"{url}/generate", json=body, timeout=120)
        answer = r.json()
        elapsed, received = time.perf_counter() - t, time.time()
        r.raise_for_status()
        gen = answer["metadata"]["generation_time"]
        created, started, finished = answer["created_at"], answer["started_at"], answer["finished_at"]
        for name, seconds in zip(PARTS, (created - sent, started - created, finished - started - gen,
                                         received - finished)):
            parts[name].append(seconds * 1e3)
        totals.append(elapsed * 1e3)
        calls.append(gen * 1e3)
        size = len(r.content)
    return parts, totals, calls, size


def bare_floor(size: int, body: dict, runs: int, work: Path) -> float:
    """Median ms of the same client against a bare app answering `size` bytes of JSON."""
    (work / "bare.json").write_text(json.dumps({"/generate": json.dumps({"pad": "x" * max(0, size - 11)})}))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BARE.replace("on_get", "on_post"), str(port), "8",
                             str(work / "bare.json")])
    try:
        url = f"http://127.0.0.1:{port}/generate"
        wait_until(lambda: _up(url), 30, 0.1, "the bare app")
        s = requests.Session()
        times = []
        for i in range(runs + 5):
            t = time.perf_counter()
            s.post(url, json=body, timeout=30).json()
            if i >= 5:
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    finally:
        proc.terminate()
        proc.wait(10)


ECHO = """
import sys, zmq
sock = zmq.Context().socket(zmq.ROUTER)
sock.bind(sys.argv[1])
while sock.poll(30_000):
    sock.send_multipart(sock.recv_multipart())
"""


def zmq_round_trip(runs: int) -> float:
    """Median us of a 200-byte DEALER/ROUTER round trip over TCP to another process, after 10 ms idle."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-c", ECHO, endpoint])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        times = []
        for i in range(runs + 5):
            time.sleep(0.01)
            t = time.perf_counter()
            sock.send(b"x" * 200)
            if not sock.poll(10_000):
                raise RuntimeError("the echo process did not answer")
            sock.recv()
            if i >= 5:
                times.append((time.perf_counter() - t) * 1e6)
        return statistics.median(times)
    finally:
        sock.close(linger=0)
        ctx.term()
        proc.kill()
        proc.wait(10)


def _up(url: str) -> bool:
    try:
        return requests.post(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def main() -> None:
    """Measure and print (optionally append) the section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--models", type=Path, help="tiny model folders (built into a temporary folder if absent)")
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    body = {"prompt": "cat", "width": args.size, "height": args.size, "num_inference_steps": args.steps, "seed": 1}
    work = Path(tempfile.mkdtemp(prefix="bench-parts-"))
    procs = Processes(work)
    try:
        models = args.models
        if models is None:
            models = work / "models"
            subprocess.run([sys.executable, "-m", "gpu_node.tiny", str(models)], check=True, cwd=ROOT)
        cluster = Cluster(procs, models, work / "broker", key=KEY,
                          front_env={"API_KEY_1": f"{KEY}:bench:all", "LOG_LEVEL": "WARNING"})
        parts, totals, calls, size = served(cluster.url, body, args.runs)
        procs.close()
        floor = bare_floor(size, body, args.runs, work)
        hop = zmq_round_trip(max(args.runs, 200))
    finally:
        procs.close()
        shutil.rmtree(work, ignore_errors=True)
    med = {name: statistics.median(v) for name, v in parts.items()}
    added = statistics.median(t - c for t, c in zip(totals, calls))
    lines = [
        f"### Where a synchronous request's added time goes ({date.today()})",
        "",
        f"Command: `.venv/bin/python bench/latency_parts.py --runs {args.runs} --size {args.size}"
        f" --steps {args.steps}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; tiny flux1-dev"
        f" on the CPU, {args.size}x{args.size}, {args.steps} steps; one client, {args.runs} sequential synchronous"
        f" requests; answers of {size} bytes.",
        "",
        "| part | median ms |",
        "|---|---|",
        *(f"| {name} | {med[name]:.2f} |" for name in PARTS),
        f"| all four (median of per-run sums: total less the pipeline call) | {added:.2f} |",
        f"| floor: the same client against a bare app answering {size} bytes | {floor:.2f} |",
        f"| one ZeroMQ round trip between two processes after 10 ms idle | {hop / 1000:.2f} |",
        "",
        f"Pipeline call (the node's `generation_time`): median {statistics.median(calls):.1f} ms; total median"
        f" {statistics.median(totals):.1f} ms. The parts are defined in the module docstring.",
    ]
    emit(lines, args.write)


if __name__ == "__main__":
    main()
