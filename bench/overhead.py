"""Serving overhead: the same tiny text2img request in-process vs through HTTP -> broker -> node.

    .venv/bin/python bench/overhead.py [--runs 30] [--size 256] [--steps 8] [--write docs/benchmarks.md]

In-process is the diffusers pipeline call plus PNG encoding at the node's level
(what a caller needs to hold a PNG); the pipeline call alone is shown too. The
served path is a synchronous POST /generate timed by the client, including
JSON, base64, the broker hop and the node's PNG encode. Both use the same tiny
flux1-dev folder, seed, size, steps and max_sequence_length.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
KEY = "genserve-default-key-2024"

from bench.report import emit  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def in_process(models: Path, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Time pipeline-only and pipeline+PNG in this process."""
    import torch
    from diffusers import FluxPipeline

    from gpu_node.generate import encode_png

    pipe = FluxPipeline.from_pretrained(str(models / "flux1-dev"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    raw, with_png = [], []
    for i in range(args.warmup + args.runs):
        started = time.perf_counter()
        with torch.inference_mode():
            image = pipe(prompt=args.prompt, height=args.size, width=args.size, num_inference_steps=args.steps,
                         guidance_scale=3.5, generator=torch.Generator("cpu").manual_seed(42),
                         max_sequence_length=args.max_seq).images[0]
        mid = time.perf_counter()
        encode_png(image, 1)
        end = time.perf_counter()
        if i >= args.warmup:
            raw.append(mid - started)
            with_png.append(end - started)
    return raw, with_png


def free_port() -> int:
    """A free loopback port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(models: Path, args: argparse.Namespace, workdir: Path) -> list[float]:
    """Time POST /generate against real broker, node and front subprocesses."""
    bindir = Path(sys.executable).parent
    fport, bport, hport = free_port(), free_port(), free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LOG_LEVEL": "WARNING"}
    cmds = [
        ["genserve-broker", "--frontend", f"tcp://127.0.0.1:{fport}", "--backend", f"tcp://127.0.0.1:{bport}",
         "--data-dir", str(workdir / "broker")],
        ["genserve-node", "--broker", f"tcp://127.0.0.1:{bport}", "--device", "cpu", "--models-dir", str(models),
         "--models", "flux1-dev", "--preload", "flux1-dev", "--max-sequence-length", str(args.max_seq)],
        ["genserve-front", "--broker", f"tcp://127.0.0.1:{fport}", "--host", "127.0.0.1", "--port", str(hport)],
    ]
    procs = [subprocess.Popen([str(bindir / c[0]), *c[1:]], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for c in cmds]
    url = f"http://127.0.0.1:{hport}"
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/health", headers=headers, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        else:
            raise SystemExit("the service did not become healthy")
        body = {"prompt": args.prompt, "model_id": "flux1-dev", "mode": "text2img", "height": args.size,
                "width": args.size, "num_inference_steps": args.steps, "cfg": 3.5, "seed": 42}
        times = []
        with requests.Session() as session:
            for i in range(args.warmup + args.runs):
                started = time.perf_counter()
                r = session.post(f"{url}/generate", json=body, headers=headers, timeout=300)
                elapsed = time.perf_counter() - started
                r.raise_for_status()
                if i >= args.warmup:
                    times.append(elapsed)
        return times
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def main() -> None:
    """Run both measurements and print (and optionally record) the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-seq", type=int, default=512)
    ap.add_argument("--prompt", default="一只可爱的小猫坐在花园里")
    ap.add_argument("--write", type=Path, help="append the result section to this markdown file")
    args = ap.parse_args()
    from gpu_node.tiny import build_all

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        build_all(models, seed=0, model_ids=("flux1-dev",), loras=False)
        raw, local = in_process(models, args)
        remote = served(models, args, Path(tmp))
    rows = [("in-process pipeline call", raw), ("in-process pipeline + PNG", local),
            ("HTTP -> broker -> node (sync /generate)", remote)]
    p50_local, p50_remote = statistics.median(local), statistics.median(remote)
    lines = [
        f"### Serving overhead ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'bench/overhead.py', *sys.argv[1:]])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()}; tiny flux1-dev, {args.size}x{args.size}, {args.steps} steps, "
        f"max_sequence_length {args.max_seq}, {args.runs} runs after {args.warmup} warm-up.",
        "",
        "| path | p50 ms | p95 ms | mean ms |",
        "|---|---|---|---|",
    ]
    for name, values in rows:
        lines.append(f"| {name} | {statistics.median(values) * 1000:.1f} | {percentile(values, 95) * 1000:.1f}"
                     f" | {statistics.mean(values) * 1000:.1f} |")
    lines += ["", f"p50 ratio served / in-process (with PNG): **{p50_remote / p50_local:.3f}** "
                  f"(target <= 1.10); against the bare pipeline call: {p50_remote / statistics.median(raw):.3f}; "
                  f"p95 ratio: {percentile(remote, 95) / percentile(local, 95):.3f}.", ""]
    emit(lines, args.write)


if __name__ == "__main__":
    main()
