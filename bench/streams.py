"""Event streams: 1,000 open GET /task/{id}/events streams on one front, and /generate latency beside them.

    .venv/bin/python bench/streams.py [--models var/models] [--streams 1000] [--write docs/benchmarks.md]

Starts broker, front (default settings: 48 waitress threads; each stream is handed to the
front's stream pump after its snapshot, so it holds no thread) and two tiny-model
CPU nodes as subprocesses: `node0` serves flux1-dev for the probes; `parked` serves
flux1-canny-dev and is drained, so the canny tasks the streams follow stay queued (alive,
with a queue position) for the whole run. Ten keys submit `--streams` canny tasks (100
each, the per-key stream cap) and a separate process opens one stream per task (asyncio,
one connection each) and counts the events it reads.

Phases, each timing `--samples` synchronous 64x64 2-step /generate requests (one at a time,
0.25 s apart, on a new connection) from this process:

a. idle: no stream open;
b. the streams open and quiet (only keep-alive comments);
c. the streams open with churn: every second a canny task at priority -1 is queued ahead of
   every parked task and cancelled 0.5 s later, so each stream gets two `position` events a
   second (about 2,000 events/s through the broker and the front);
d. idle again, after the streams closed (drift check).

Takes about 90 s on 2 cores. Everything shares the 2 cores: the stream client, the probe,
the front, the broker and the node computing the probes' images.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import multiprocessing as mp
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.front_capacity import percentile, start_load, stop_load  # noqa: E402
from bench.report import emit  # noqa: E402
from tests.conftest import BIN, Cluster, Processes  # noqa: E402

KEYS = [f"bench-streams-key-{i:02d}-0123456789abcdef" for i in range(10)]
PROBE = {"prompt": "cat", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 1}
TARGET = 1.10  # /generate p50 with the streams open, against idle


def auth(i: int = 0) -> dict[str, str]:
    """Authorization header for bench key `i`."""
    return {"Authorization": f"Bearer {KEYS[i % len(KEYS)]}"}


def control_image() -> str:
    """A 64x64 PNG as base64, for the parked controlnet tasks."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 200, 200)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def parked_task(image: str, priority: int = 5) -> dict[str, Any]:
    """Body of a canny task that will wait on the drained node."""
    return {"prompt": "parked", "mode": "controlnet", "controlnet_type": "canny", "control_image": image,
            "width": 64, "height": 64, "num_inference_steps": 2, "priority": priority, "async": True}


class StreamCluster(Cluster):
    """node0 serves flux1-dev (the probes); node1 ("parked") serves flux1-canny-dev and gets drained."""

    def start_node(self, name: str, *extra: str) -> None:
        """node0: flux1-dev only; node1: flux1-canny-dev only."""
        model = "flux1-dev" if name == "node0" else "flux1-canny-dev"
        self.procs.start(name, ["genserve-node", "--broker", self.backend, "--device", "cpu",
                                "--models-dir", str(self.models), "--lora-dir", str(self.models / "loras"),
                                "--node-id", name, "--heartbeat", "0.25", "--preload", model, "--models", model,
                                "--max-sequence-length", "32", *extra], env=self.node_env)


# ---- the stream client, in a child process ----------------------------------------


def stream_clients(port: int, targets: list[tuple[str, str]], ready: Any, stop: Any, result: Any) -> None:
    """Open one stream per (task id, key) and count events until told to stop."""
    counts: dict[str, int] = {}
    opened = [0]
    failed: dict[str, int] = {}

    async def one(task_id: str, key: str) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            failed[type(exc).__name__] = failed.get(type(exc).__name__, 0) + 1
            return
        writer.write(f"GET /task/{task_id}/events HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {key}\r\n"
                     "Accept: text/event-stream\r\n\r\n".encode())
        status = (await reader.readline()).split(b" ")
        if len(status) < 2 or status[1] != b"200":
            failed[status[1].decode() if len(status) > 1 else "?"] = failed.get("?", 0) + 1
            writer.close()
            return
        opened[0] += 1
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                if line.startswith(b"event: "):
                    kind = line[7:].strip().decode()
                    counts[kind] = counts.get(kind, 0) + 1
        except (OSError, asyncio.CancelledError):
            return
        finally:
            writer.close()

    async def main() -> None:
        tasks = []
        for i, (task_id, key) in enumerate(targets):
            tasks.append(asyncio.create_task(one(task_id, key)))
            if i % 50 == 49:
                await asyncio.sleep(0.05)  # a ramp, not a thundering herd
        while opened[0] + sum(failed.values()) < len(targets):
            await asyncio.sleep(0.1)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    result.put({"opened": opened[0], "failed": failed, "events": counts})


# ---- probes ----------------------------------------------------------------------------


def probe(url: str, samples: int) -> list[float]:
    """Milliseconds of synchronous tiny /generate requests, one at a time."""
    timings = []
    for i in range(samples):
        started = time.perf_counter()
        r = requests.post(f"{url}/generate", json={**PROBE, "seed": i}, headers=auth(), timeout=60)
        elapsed = 1000 * (time.perf_counter() - started)
        if r.status_code != 200:
            raise SystemExit(f"probe failed: {r.status_code} {r.text[:200]}")
        timings.append(elapsed)
        time.sleep(0.25)
    return timings


def churn(url: str, image: str, stop: threading.Event) -> None:
    """Every second: queue a priority -1 canny task ahead of every parked one, cancel it 0.5 s later."""
    while not stop.is_set():
        r = requests.post(f"{url}/generate", json=parked_task(image, priority=-1), headers=auth(9),
                          timeout=10)
        stop.wait(0.5)
        requests.delete(f"{url}/task/{r.json()['task_id']}", headers=auth(9), timeout=10)
        stop.wait(0.5)


def front_memory(pid: int) -> tuple[float, int]:
    """(resident MB, threads) of the front process."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def run(models: Path, streams: int, samples: int, workdir: Path) -> dict[str, Any]:
    """Start the deployment, run the phases, stop everything."""
    procs = Processes(workdir)
    out: dict[str, Any] = {"phases": []}
    try:
        front_env = {f"API_KEY_{i + 1}": f"{k}:bench{i}:all" for i, k in enumerate(KEYS)}
        cluster = StreamCluster(procs, models, workdir / "broker", nodes=2,
                                front_env={**front_env, "LOG_LEVEL": "WARNING"}, key=KEYS[0],
                                node_env={"OMP_NUM_THREADS": "1"})
        subprocess.run([str(BIN / "genservectl"), "drain", "node1", "--broker", cluster.frontend], check=True,
                       capture_output=True)
        url = cluster.url
        image = control_image()
        probe(url, 3)  # warm up
        out["phases"].append(("a. idle", probe(url, samples)))

        targets = []
        for i in range(streams):
            key = i % len(KEYS)
            r = requests.post(f"{url}/generate", json=parked_task(image), headers=auth(key), timeout=30)
            r.raise_for_status()
            targets.append((r.json()["task_id"], KEYS[key]))
        pid = procs.procs["front"].pid
        out["memory_before"] = front_memory(pid)
        proc, _, stop, result = start_load(stream_clients, cluster.front_port, targets)
        opened_at = time.monotonic()
        out["memory_open"] = front_memory(pid)
        out["phases"].append((f"b. {streams} streams open, quiet", probe(url, samples)))

        stop_churn = threading.Event()
        churner = threading.Thread(target=churn, args=(url, image, stop_churn), daemon=True)
        churner.start()
        churn_started = time.monotonic()
        out["phases"].append((f"c. {streams} streams, 2 position events/s each", probe(url, samples)))
        stop_churn.set()
        churner.join(timeout=10)
        out["churn_seconds"] = time.monotonic() - churn_started
        out["memory_churn"] = front_memory(pid)
        out["streams_seconds"] = time.monotonic() - opened_at
        out["client"] = stop_load(proc, stop, result)
        out["phases"].append(("d. idle again", probe(url, samples)))
    finally:
        procs.close()
    return out


def report(out: dict[str, Any], streams: int, samples: int) -> list[str]:
    """The markdown section."""
    lines = [f"### Event streams ({date.today().isoformat()})", "",
             f"Command: `.venv/bin/python bench/streams.py --streams {streams} --write docs/benchmarks.md`  ",
             f"Machine: {platform.machine()}, {mp.cpu_count()} cores, no GPU, {platform.platform()}, "
             f"Python {platform.python_version()}; broker, front (default settings: 48 waitress threads, "
             "streams written by the stream pump), one tiny-model CPU node for the probes (OMP_NUM_THREADS=1) and one drained node "
             f"holding the streamed tasks in the queue; {samples} synchronous 64x64 2-step /generate probes "
             "per phase, one at a time, 0.25 s apart. The stream client (asyncio, one connection per "
             "stream) runs in its own process on the same 2 cores.", "",
             "| phase | /generate p50 ms | p90 | p99 | max | p50 vs idle (a) |", "|---|---|---|---|---|---|"]
    idle = percentile(out["phases"][0][1], 50)
    for name, t in out["phases"]:
        p50 = percentile(t, 50)
        lines.append(f"| {name} | {p50:.1f} | {percentile(t, 90):.1f} | {percentile(t, 99):.1f} | {max(t):.1f} "
                     f"| {p50 / idle:.3f} |")
    client = out["client"]
    expected = 2 * streams * int(out["churn_seconds"])
    rss0, threads0 = out["memory_before"]
    rss1, threads1 = out["memory_open"]
    rss2, _ = out["memory_churn"]
    worst = max(percentile(t, 50) for name, t in out["phases"][1:3]) / idle
    lines += ["",
              f"- Streams: {client['opened']} of {streams} opened (refused or failed: {client['failed'] or 'none'}); "
              f"events read: {', '.join(f'{k} {v}' for k, v in sorted(client['events'].items()))} "
              f"(about {expected} position events expected over {out['churn_seconds']:.0f} s of churn).",
              f"- Front memory: {rss0:.0f} MB resident with {threads0} threads before the streams, "
              f"{rss1:.0f} MB with {streams} streams open ({threads1} threads), {rss2:.0f} MB after the churn.",
              f"- Target (/generate p50 within {TARGET:.2f}x of idle with the streams open): worst ratio "
              f"{worst:.3f}, {'held' if worst <= TARGET else 'NOT held'}.", ""]
    return lines


def main() -> None:
    """Parse flags, build models if needed, run, print (and optionally record) the section."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=ROOT / "var" / "models")
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=40, help="probes per phase")
    ap.add_argument("--write", type=Path, help="append the result section to this markdown file")
    args = ap.parse_args()
    if not 1 <= args.streams <= 100 * len(KEYS):
        raise SystemExit(f"--streams must be 1-{100 * len(KEYS)} (100 per key, the per-key cap)")
    with tempfile.TemporaryDirectory(prefix="streams-") as tmp:
        models = args.models
        if not (models / "flux1-dev").is_dir():
            from gpu_node.tiny import build_all

            models = Path(tmp) / "models"
            build_all(models, seed=0)
        out = run(models, args.streams, args.samples, Path(tmp))
    emit(report(out, args.streams, args.samples), args.write)


if __name__ == "__main__":
    main()
