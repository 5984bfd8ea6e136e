"""Front capacity: /health and /task latency while clients misbehave or crowd the front.

    .venv/bin/python bench/front_capacity.py [--models var/models] [--write docs/benchmarks.md]

Starts broker, one tiny-model CPU node (one torch thread) and the front as subprocesses
with default front settings and eight API keys, then probes GET /health and GET /task/{id}
(one new connection each, every 0.1 s) in four phases:

a. idle;
b. 500 slowloris connections open (each sent part of a request, then a header line more);
c. 32 synchronous /generate clients that hung up while their tasks were queued behind a
   long one (the front should notice, cancel their tasks and free their threads);
d. 200 concurrent clients sending synchronous 64x64 2-step /generate requests in a loop
   (honouring Retry-After on 429).

The load runs in a separate process, so the probe's timings do not include the load
generator's own GIL. Takes about 45 s on 2 cores (20 s more without var/models).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402
from tests.conftest import Cluster, Processes, wait_until  # noqa: E402

KEYS = [f"bench-capacity-key-{i}-0123456789abcdef" for i in range(8)]
TINY = {"prompt": "cat", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 1}
LONG = {"prompt": "slow", "width": 1024, "height": 1024, "num_inference_steps": 100, "async": True}
TARGET_MS = 100.0
PROBE_TIMEOUT = 10.0


def auth(i: int = 0) -> dict[str, str]:
    """Authorization header for bench key `i`."""
    return {"Authorization": f"Bearer {KEYS[i % len(KEYS)]}"}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def probe(url: str, task_id: str, samples: int) -> dict[str, Any]:
    """Time GET /health and GET /task/{id}, each on a new connection; failures count as the timeout."""
    timings: dict[str, list[float]] = {"health": [], "task": []}
    failures = 0
    for _ in range(samples):
        for name, path in (("health", "/health"), ("task", f"/task/{task_id}")):
            started = time.perf_counter()
            try:
                ok = requests.get(url + path, headers=auth(), timeout=PROBE_TIMEOUT).status_code == 200
            except requests.RequestException:
                ok = False
            timings[name].append(1000 * (time.perf_counter() - started) if ok else 1000 * PROBE_TIMEOUT)
            failures += not ok
        time.sleep(0.1)
    return {"timings": timings, "failures": failures}


# ---- load, run in a child process ------------------------------------------------


def _post_head(body: bytes, key: str) -> bytes:
    return (b"POST /generate HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)


def slowloris(port: int, count: int, ready: Any, stop: Any, result: Any) -> None:
    """Hold `count` connections that never finish their request; a header line per connection every 2 s."""
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: bench\r\n")
        socks.append(s)
    ready.set()
    while not stop.wait(2.0):
        for s in socks:
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                pass
    still_open = 0
    for s in socks:
        s.setblocking(False)
        try:
            still_open += s.recv(1) != b""
        except BlockingIOError:
            still_open += 1
        except OSError:
            pass
        s.close()
    result.put(still_open)


def sync_clients(url: str, count: int, ready: Any, stop: Any, result: Any) -> None:
    """`count` threads sending synchronous tiny /generate requests until told to stop."""
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def client(i: int) -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                r = session.post(f"{url}/generate", json={**TINY, "seed": i}, headers=auth(i), timeout=60)
                outcome = str(r.status_code)
                pause = float(r.headers.get("Retry-After", 0)) if r.status_code == 429 else 0.0
            except requests.RequestException:
                outcome, pause = "error", 1.0
            with lock:
                counts[outcome] = counts.get(outcome, 0) + 1
            if pause:
                stop.wait(pause)
        session.close()

    ready.set()
    with ThreadPoolExecutor(count) as pool:
        list(pool.map(client, range(count)))
    result.put(counts)


def start_load(target: Any, *args: Any) -> tuple[Any, Any, Any, Any]:
    """Run `target(*args, ready, stop, result)` in a fresh process; returns (process, ready, stop, result)."""
    ctx = mp.get_context("spawn")
    ready, stop, result = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, ready, stop, result), daemon=True)
    proc.start()
    if not ready.wait(60):
        proc.kill()
        raise SystemExit("the load process did not start")
    return proc, ready, stop, result


def stop_load(proc: Any, stop: Any, result: Any) -> Any:
    """Stop the load process and return what it reported."""
    stop.set()
    value = result.get(timeout=90)
    proc.join(timeout=30)
    return value


# ---- phases ------------------------------------------------------------------------


def hung_up_phase(cluster: Cluster, task_id: str, samples: int) -> tuple[dict[str, Any], str]:
    """32 sync clients queue behind a long task, then hang up; probe while the front lets go."""
    url = cluster.url
    blocker = requests.post(f"{url}/generate", json=LONG, headers=auth(), timeout=10).json()["task_id"]

    def counts() -> dict[str, int]:
        return requests.get(f"{url}/status", headers=auth(), timeout=10).json()["tasks"]

    before = counts().get("cancelled", 0)
    socks = []
    for i in range(32):  # 4 per key: the per-key cap (16) is not what limits them
        s = socket.create_connection(("127.0.0.1", cluster.front_port), timeout=10)
        s.sendall(_post_head(json.dumps({**TINY, "seed": 100 + i}).encode(), KEYS[i % len(KEYS)]))
        socks.append(s)
    wait_until(lambda: requests.get(f"{url}/health", headers=auth(), timeout=10).json()["queue_length"] >= 32,
               30, 0.1, "32 queued sync tasks")
    for s in socks:
        s.close()
    hung_up = time.monotonic()
    cancelled: list[float] = []

    def watch() -> None:  # polls /status (0.2 s apart) alongside the probes
        wait_until(lambda: counts().get("cancelled", 0) - before >= 32, 30, 0.2, "the 32 tasks to be cancelled")
        cancelled.append(time.monotonic() - hung_up)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = probe(url, task_id, samples)
    watcher.join(timeout=40)
    requests.delete(f"{url}/task/{blocker}", headers=auth(), timeout=10)
    note = (f"the 32 hung-up clients' tasks were all cancelled {cancelled[0]:.2f} s after the hang-up"
            if cancelled else "the 32 hung-up clients' tasks were NOT all cancelled within 30 s")
    return result, note


def run(models: Path, samples: int, workdir: Path) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """Start the deployment, run the four phases, stop everything."""
    procs = Processes(workdir)
    results: list[tuple[str, dict[str, Any]]] = []
    notes: list[str] = []
    try:
        front_env = {f"API_KEY_{i + 1}": f"{k}:bench{i}:all" for i, k in enumerate(KEYS)}
        cluster = Cluster(procs, models, workdir / "broker", front_env={**front_env, "LOG_LEVEL": "WARNING"},
                          key=KEYS[0], node_env={"OMP_NUM_THREADS": "1"})
        r = requests.post(f"{cluster.url}/generate", json=TINY, headers=auth(), timeout=60)
        r.raise_for_status()
        task_id = r.json()["task_id"]

        results.append(("a. idle", probe(cluster.url, task_id, samples)))

        proc, _, stop, result = start_load(slowloris, cluster.front_port, 500)
        results.append(("b. 500 slow connections open", probe(cluster.url, task_id, samples)))
        notes.append(f"b: {stop_load(proc, stop, result)} of the 500 slow connections were still open at the end")

        result_c, note = hung_up_phase(cluster, task_id, samples)
        results.append(("c. 32 sync clients hung up", result_c))
        notes.append(f"c: {note}")

        proc, _, stop, result = start_load(sync_clients, cluster.url, 200)
        time.sleep(2)  # let the clients fill the synchronous slots
        results.append(("d. 200 concurrent sync clients", probe(cluster.url, task_id, samples)))
        counts = stop_load(proc, stop, result)
        notes.append("d: client outcomes " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
                     + " (429 = over the synchronous-wait cap, retried after Retry-After)")
    finally:
        procs.close()
    return results, notes


def report(results: list[tuple[str, dict[str, Any]]], notes: list[str], samples: int) -> list[str]:
    """The markdown section."""
    lines = [f"### Front capacity ({date.today().isoformat()})", "",
             "Command: `.venv/bin/python bench/front_capacity.py --write docs/benchmarks.md`  ",
             f"Machine: {platform.machine()}, {mp.cpu_count()} cores, no GPU, {platform.platform()}, "
             f"Python {platform.python_version()}; broker, one tiny-model CPU node (OMP_NUM_THREADS=1), "
             f"front with default settings and 8 keys; {samples} probes per phase, each GET on a new "
             "connection, 0.1 s apart; a failed probe counts as its 10 s timeout.", "",
             "| phase | /health p50 ms | p99 | max | /task p50 ms | p99 | max | failed |",
             "|---|---|---|---|---|---|---|---|"]
    held = []
    for name, r in results:
        h, t = r["timings"]["health"], r["timings"]["task"]
        row = [percentile(h, 50), percentile(h, 99), max(h), percentile(t, 50), percentile(t, 99), max(t)]
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in row) + f" | {r['failures']} |")
        held.append((name, max(h) <= TARGET_MS and max(t) <= TARGET_MS,
                     percentile(h, 99) <= TARGET_MS and percentile(t, 99) <= TARGET_MS))
    lines.append("")
    lines.extend(f"- {n}" for n in notes)
    verdict = "; ".join(f"{name.split('.')[0]}: {'max' if all_ok else ('p99 only' if p99_ok else 'no')}"
                        for name, all_ok, p99_ok in held)
    lines += ["", f"Target (/health and /task within {TARGET_MS:.0f} ms) held: {verdict}.", ""]
    return lines


def main() -> None:
    """Parse flags, build models if needed, run, print (and optionally record) the section."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=ROOT / "var" / "models")
    ap.add_argument("--samples", type=int, default=60, help="probes per phase")
    ap.add_argument("--write", type=Path, help="append the result section to this markdown file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="front-capacity-") as tmp:
        models = args.models
        if not (models / "flux1-dev").is_dir():
            from gpu_node.tiny import build_all

            models = Path(tmp) / "models"
            build_all(models, seed=0)
        results, notes = run(models, args.samples, Path(tmp))
    emit(report(results, notes, args.samples), args.write)


if __name__ == "__main__":
    main()
