"""Front throughput: requests/s of the real front against a bare Falcon-on-waitress app, with wrk.

    apt-get install wrk      # Debian's load generator
    .venv/bin/python bench/front_rps.py [--seconds 5] [--rounds 3] [--write docs/benchmarks.md]

Starts broker, one tiny-model node and the front as subprocesses (rate limit raised so that
only 2xx answers are counted), and beside them a bare app: falcon.App on waitress with the
front's thread count, answering the same paths with a constant JSON body of similar size.
For /health, /models and /task/{id} (a completed task), wrk runs against each server in
turn, interleaved over several rounds; a round's figure counts 2xx answers only. The bare
app answers each path with the very bytes the front answered it with (fetched once before
measuring: the /task body carries the image twice in base64, about 26 KB for the tiny 64x64
one), so the ratio is the front's own cost, not a difference in what is sent. Reports the
median requests/s of each, the ratio of the medians and the median of the per-round ratios
(issue 12's target: 70 % of the bare app).
Takes about 2 x paths x rounds x seconds plus 20 s.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402
from tests.conftest import Cluster, Processes, wait_until  # noqa: E402

KEY = "bench-rps-key-0123456789abcdef0123"
TINY = {"prompt": "cat", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 1}
BARE = """
import falcon, json, sys, waitress
bodies = {path: body.encode() for path, body in json.load(open(sys.argv[3])).items()}
class R:
    def __init__(self, body):
        self.body = body
    def on_get(self, req, resp, **_):
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self.body
app = falcon.App()
for path, body in bodies.items():
    app.add_route(path, R(body))
waitress.serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=int(sys.argv[2]), _quiet=True)
"""


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wrk(url: str, seconds: int, connections: int) -> tuple[float, int, int]:
    """(requests/s of 2xx answers, all answers, non-2xx answers) from one wrk run."""
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-H", f"Authorization: Bearer {KEY}",
                          url], capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return rate * (total - bad) / max(total, 1), total, bad


def main() -> None:
    """Run the comparison; print (and optionally record) the section."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--threads", type=int, default=48, help="waitress threads of both servers (the front's default)")
    ap.add_argument("--models", type=Path, help="tiny model folders (built into a temporary folder if absent)")
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="bench-rps-"))
    procs = Processes(work)
    bare = None
    try:
        models = args.models
        if models is None:
            models = work / "models"
            subprocess.run([sys.executable, "-m", "gpu_node.tiny", str(models)], check=True, cwd=ROOT)
        cluster = Cluster(procs, models, work / "broker", key=KEY, node_env={"OMP_NUM_THREADS": "1"},
                          front_env={"API_KEY_1": f"{KEY}:bench:all", "LOG_LEVEL": "WARNING",
                                     "GENSERVE_RATE_LIMIT": "100000000", "GENSERVE_THREADS": str(args.threads)})
        task_id = requests.post(f"{cluster.url}/generate", json=TINY, headers={"Authorization": f"Bearer {KEY}"},
                                timeout=120).json()["task_id"]
        paths = ["/health", "/models", f"/task/{task_id}"]
        bodies = {}
        for path in paths:
            r = requests.get(cluster.url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
            r.raise_for_status()
            bodies["/task/{task_id}" if path.startswith("/task/") else path] = r.content.decode()
        (work / "bodies.json").write_text(json.dumps(bodies))
        port = free_port()
        bare = subprocess.Popen([sys.executable, "-c", BARE, str(port), str(args.threads), str(work / "bodies.json")])
        wait_until(lambda: _up(f"http://127.0.0.1:{port}/health"), 30, 0.1, "the bare app")
        rates: dict[tuple[str, str], list[float]] = {}
        refused = 0
        servers = [("bare", f"http://127.0.0.1:{port}"), ("front", cluster.url)]
        for i in range(args.rounds):
            for path in paths:
                for name, base in servers if i % 2 == 0 else servers[::-1]:  # neither always goes first
                    rate, _, bad = wrk(base + path, args.seconds, args.connections)
                    rates.setdefault((name, path), []).append(rate)
                    refused += bad if name == "front" else 0
    finally:
        if bare is not None:
            bare.kill()
            bare.wait(10)
        procs.close()
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"## Front throughput against a bare Falcon app (issue 12, point 2, {date.today().isoformat()})", "",
             f"Command: `.venv/bin/python bench/front_rps.py --seconds {args.seconds} --rounds {args.rounds}`  ",
             f"Machine: {platform.machine()}, {_cores()} cores, Python {platform.python_version()}; wrk 2 threads, "
             f"{args.connections} connections, {args.seconds} s per run, {args.rounds} interleaved rounds; both "
             f"servers waitress with {args.threads} threads on the same machine as wrk. Front answers other than "
             f"2xx: {refused} (not counted).", "",
             "The bare app answers each path with the front's own response body (see the module docstring).", "",
             "| path | bare app req/s | front req/s | front / bare (medians) | per-round ratios | median of those |",
             "|---|---|---|---|---|---|"]
    for path in paths:
        bare_rate = statistics.median(rates[("bare", path)])
        front_rate = statistics.median(rates[("front", path)])
        ratios = [f / b for f, b in zip(rates[("front", path)], rates[("bare", path)])]
        label = "/task/{id}" if path.startswith("/task/") else path
        lines.append(f"| {label} | {bare_rate:.0f} | {front_rate:.0f} | {front_rate / bare_rate:.0%} |"
                     f" {', '.join(f'{r:.0%}' for r in ratios)} | {statistics.median(ratios):.0%} |")
    emit(lines + [""], args.write)


def _up(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _cores() -> int:
    import os

    return os.cpu_count() or 1


if __name__ == "__main__":
    main()
