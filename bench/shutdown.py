"""How long stopping takes: a node after SIGTERM (idle and busy), and the whole `make serve` stack.

    .venv/bin/python bench/shutdown.py [--rounds 5] [--write docs/benchmarks.md]

Targets (hardening issue): an idle node exits within 2 s of SIGTERM, a busy one within one
denoising step plus 2 s, and supervisord (what `make serve` runs) stops everything within
5 s. Tiny models on the CPU; the busy case measures the step time from the node's progress.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import emit  # noqa: E402
from tests.conftest import BIN, ROOT, Cluster, Processes, free_port, wait_healthy, wait_until  # noqa: E402


def sigterm_seconds(procs: Processes, name: str) -> float:
    """Seconds from SIGTERM to the exit of one process."""
    proc = procs.procs[name]
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    return time.monotonic() - started


def registered(cluster: Cluster) -> set[str]:
    """Node ids registered with the broker."""
    r = requests.get(f"{cluster.url}/status", headers={"X-API-Key": cluster.key}, timeout=10)
    return {n["node_id"] for n in r.json()["nodes"]}


def node_rounds(models: Path, work: Path, rounds: int) -> tuple[list[float], list[tuple[float, float]]]:
    """(idle stop times, [(busy stop time, step time)])."""
    work.mkdir(parents=True, exist_ok=True)
    procs = Processes(work)
    idle, busy = [], []
    try:
        cluster = Cluster(procs, models, work / "broker", nodes=1)
        headers = {"X-API-Key": cluster.key}
        for i in range(rounds):
            name = f"n{i}"
            cluster.start_node(name)
            wait_until(lambda: name in registered(cluster), 120, 0.1, name)
            idle.append(sigterm_seconds(procs, name))
        procs.kill("node0", signal.SIGKILL)  # from here on, each task runs on the node under test
        for i in range(rounds):
            name = f"b{i}"
            cluster.start_node(name)
            wait_until(lambda: name in registered(cluster), 120, 0.1, name)
            r = cluster.generate(width=512, height=512, num_inference_steps=100, **{"async": True})
            task_id = r.json()["task_id"]
            samples: list[tuple[float, int]] = []

            def progressed() -> bool:
                t = requests.get(f"{cluster.url}/task/{task_id}", headers=headers, timeout=10).json()
                step = t.get("progress", {}).get("step", 0)
                if step > 0:
                    samples.append((time.monotonic(), step))
                return len(samples) >= 2 and samples[-1][1] > samples[0][1]

            wait_until(progressed, 120, 0.05, "progress")
            (t0, s0), (t1, s1) = samples[0], samples[-1]
            busy.append((sigterm_seconds(procs, name), (t1 - t0) / (s1 - s0)))
            requests.delete(f"{cluster.url}/task/{task_id}", headers=headers, timeout=10)  # re-queued: drop it
    finally:
        procs.close()
    return idle, busy


def supervisord_seconds(models: Path, work: Path) -> float:
    """Start the stack as `make serve` does (supervisord.conf), wait until healthy, SIGTERM it."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "GENSERVE_MODELS_DIR": str(models),
           "LORA_BASE_PATH": str(models / "loras"), "GENSERVE_DEVICE": "cpu", "GENSERVE_NUM_NODES": "1",
           "GENSERVE_PRELOAD": "flux1-dev", "PORT": str(port), "HF_HUB_OFFLINE": "1",
           "GENSERVE_BROKER_FRONTEND": f"tcp://127.0.0.1:{free_port()}"}
    env["GENSERVE_BROKER_URL"] = env["GENSERVE_BROKER_FRONTEND"]
    env["GENSERVE_BROKER_BACKEND"] = env["GENSERVE_BROKER_BACKEND_URL"] = f"tcp://127.0.0.1:{free_port()}"
    conf = work / "supervisord.conf"
    conf.write_text((ROOT / "supervisord.conf").read_text())  # %(here)s = work, so var/ lands there
    (work / "var" / "log").mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(BIN / "supervisord"), "-n", "-c", str(conf)], env=env, cwd=work,
                            stdout=(work / "supervisord.out").open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout=180)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        return time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> None:
    """Run the rounds and print (or append) the report."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", type=Path, default=ROOT / "var" / "models")
    ap.add_argument("--write", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = a.models
        if not (models / "flux1-dev").is_dir():
            from gpu_node.tiny import build_all

            models = Path(tmp) / "models"
            build_all(models, seed=0)
        idle, busy = node_rounds(models, Path(tmp) / "nodes", a.rounds)
        stack = [supervisord_seconds(models, Path(tmp) / f"sv{i}") for i in range(3)]
    lines = [f"## Stopping ({date.today()})", "",
             f"`.venv/bin/python bench/shutdown.py --rounds {a.rounds}` on {platform.node() or 'this machine'}"
             f" ({os.cpu_count()} cores, no GPU), tiny models on the CPU. Targets: idle node < 2 s, busy node <"
             " one step + 2 s, `make serve` (supervisord) < 5 s.", "",
             "| what | seconds per round | worst | target held |", "|---|---|---|---|",
             f"| idle node, SIGTERM to exit | {', '.join(f'{x:.2f}' for x in idle)} | {max(idle):.2f} |"
             f" {'yes' if max(idle) < 2 else 'no'} |"]
    worst_margin = max(s - step for s, step in busy)
    lines.append(f"| busy node (512x512), SIGTERM to exit | {', '.join(f'{s:.2f}' for s, _ in busy)} |"
                 f" {max(s for s, _ in busy):.2f} (step {max(st for _, st in busy):.2f} s) |"
                 f" {'yes' if worst_margin < 2 else 'no'} (worst exit minus step: {worst_margin:.2f} s) |")
    lines.append(f"| supervisord stack, SIGTERM to exit | {', '.join(f'{x:.2f}' for x in stack)} |"
                 f" {max(stack):.2f} | {'yes' if max(stack) < 5 else 'no'} |")
    lines.append("")
    emit(lines, a.write)


if __name__ == "__main__":
    main()
