"""Serving overhead: the same tiny text2img request in-process vs through HTTP -> broker -> node.

    .venv/bin/python bench/overhead.py [--runs 30] [--size 256] [--steps 8] [--write docs/benchmarks.md]
                                       [--compare-old OLD_TREE [--old-label REV]]

In-process is the diffusers pipeline call plus PNG encoding, timed inside a worker process at the node's level
(what a caller needs to hold a PNG); the pipeline call alone is shown too. The
served path is a synchronous POST /generate timed by the client, including
JSON, base64, the broker hop and the node's PNG encode. Both use the same tiny
flux1-dev folder, seed, size, steps and max_sequence_length, and are measured
interleaved (the services idle while the in-process call runs, and vice versa).

--compare-old OLD_TREE also measures the served path with an older source tree (e.g. from
`git archive REV | tar -x -C OLD_TREE`) in the same run: each round then holds a fresh
deployment of each tree, and every iteration times the in-process call, the new deployment and
the old one in a rotating order. The old tree's broker, node and front are this venv's console
scripts with PYTHONPATH=OLD_TREE: PYTHONPATH comes before site-packages, and the editable
install's finder is appended to sys.meta_path, after the path finder, so every package the old
tree has is imported from it. Before measuring, a process with the same environment imports
every module of both trees and the run stops if any module came from the other tree.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
KEY = "genserve-default-key-2024"
PACKAGES = ("broker", "gpu_node", "http_front", "genservectl", "genserve")

from bench.report import emit  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


class InProcess:
    """The tiny flux1-dev pipeline loaded in the current process (used by --worker)."""

    def __init__(self, models: Path, args: argparse.Namespace) -> None:
        import torch
        from diffusers import FluxPipeline

        self.torch = torch
        self.args = args
        self.pipe = FluxPipeline.from_pretrained(str(models / "flux1-dev"), dtype=torch.float32)
        self.pipe.set_progress_bar_config(disable=True)

    def run(self) -> tuple[float, float]:
        """One call: (pipeline seconds, pipeline + PNG seconds)."""
        from gpu_node.generate import encode_png

        a, torch = self.args, self.torch
        started = time.perf_counter()
        with torch.inference_mode():
            image = self.pipe(prompt=a.prompt, height=a.size, width=a.size, num_inference_steps=a.steps,
                              guidance_scale=3.5, generator=torch.Generator("cpu").manual_seed(42),
                              max_sequence_length=a.max_seq).images[0]
        mid = time.perf_counter()
        encode_png(image, 1)
        return mid - started, time.perf_counter() - started


def free_port() -> int:
    """A free loopback port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_env(tree: Path | None) -> dict[str, str]:
    """Environment of the served processes; `tree` (an old source tree) goes first on PYTHONPATH."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LOG_LEVEL": "WARNING"}
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)
    return env


_IMPORT_CHECK = """
import importlib, json, pkgutil, sys
root, packages = sys.argv[1], sys.argv[2:]
failed = {}
for name in packages:
    try:
        pkg = importlib.import_module(name)
    except ImportError as exc:
        failed[name] = repr(exc)
        continue
    for info in pkgutil.walk_packages(pkg.__path__, name + "."):
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            failed[info.name] = repr(exc)
files = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items()) if n.split(".")[0] in packages}
print(json.dumps({"files": files, "failed": failed}))
"""


def check_imports(tree: Path) -> str:
    """Import every module of `tree`'s packages as the served processes would; fail on any from elsewhere."""
    bindir = Path(sys.executable).parent
    packages = [p for p in PACKAGES if (tree / p / "__init__.py").exists()]
    old = tree.resolve() != ROOT
    # cwd = the scripts' folder: sys.path[0] is what it is for a console script.
    out = subprocess.run([sys.executable, "-c", _IMPORT_CHECK, str(tree), *packages], cwd=bindir,
                         env=served_env(tree if old else None), capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    files, failed = report["files"], report["failed"]
    stray = {n: f for n, f in files.items() if f and not Path(f).resolve().is_relative_to(tree.resolve())}
    if failed or stray or (old and "genserve" in files and not (tree / "genserve").is_dir()):
        raise SystemExit(f"{tree}: modules that failed to import: {failed}; imported from elsewhere: {stray}")
    return f"{len(files)} modules of {', '.join(packages)}, all from {tree} (broker: {files['broker']})"


class Served:
    """Broker, node and front as subprocesses; one synchronous POST /generate per call."""

    def __init__(self, models: Path, args: argparse.Namespace, workdir: Path, tree: Path | None = None) -> None:
        bindir = Path(sys.executable).parent
        fport, bport, hport = free_port(), free_port(), free_port()
        env = served_env(tree)
        workdir.mkdir(parents=True, exist_ok=True)
        cmds = [
            ["genserve-broker", "--frontend", f"tcp://127.0.0.1:{fport}", "--backend", f"tcp://127.0.0.1:{bport}",
             "--data-dir", str(workdir / "broker")],
            ["genserve-node", "--broker", f"tcp://127.0.0.1:{bport}", "--device", "cpu", "--models-dir",
             str(models), "--models", "flux1-dev", "--preload", "flux1-dev", "--max-sequence-length",
             str(args.max_seq)],
            ["genserve-front", "--broker", f"tcp://127.0.0.1:{fport}", "--host", "127.0.0.1", "--port", str(hport)],
        ]
        # cwd = the round's folder, so that nothing (e.g. the front's api_keys.enc) comes from the caller's.
        self.procs = [subprocess.Popen([str(bindir / c[0]), *c[1:]], env=env, cwd=workdir,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in cmds]
        self.url = f"http://127.0.0.1:{hport}"
        self.headers = {"Authorization": f"Bearer {KEY}"}
        self.body = {"prompt": args.prompt, "model_id": "flux1-dev", "mode": "text2img", "height": args.size,
                     "width": args.size, "num_inference_steps": args.steps, "cfg": 3.5, "seed": 42}
        self.session = requests.Session()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if self.session.get(f"{self.url}/health", headers=self.headers, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.close()
        raise SystemExit("the service did not become healthy")

    def run(self) -> float:
        """One request, timed by the client."""
        started = time.perf_counter()
        r = self.session.post(f"{self.url}/generate", json=self.body, headers=self.headers, timeout=300)
        elapsed = time.perf_counter() - started
        r.raise_for_status()
        return elapsed

    def close(self) -> None:
        """Kill the processes."""
        self.session.close()
        for proc in self.procs:
            proc.kill()
            proc.wait()


class Worker:
    """A fresh process holding the in-process pipeline; each call is timed inside that process."""

    def __init__(self, models: Path, args: argparse.Namespace) -> None:
        cmd = [sys.executable, __file__, "--worker", str(models), "--size", str(args.size), "--steps",
               str(args.steps), "--max-seq", str(args.max_seq), "--prompt", args.prompt]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def run(self) -> tuple[float, float]:
        """One pipeline call: (pipeline seconds, pipeline + PNG seconds)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        a, b = self.proc.stdout.readline().split()
        return float(a), float(b)

    def close(self) -> None:
        """End the worker."""
        self.proc.kill()
        self.proc.wait()


def worker_main(models: Path, args: argparse.Namespace) -> None:
    """--worker: load the pipeline, then time one call per line read from stdin."""
    pipe = InProcess(models, args)
    print("ready", flush=True)
    for _ in sys.stdin:
        a, b = pipe.run()
        print(f"{a} {b}", flush=True)


def measure_round_old(models: Path, args: argparse.Namespace, workdir: Path,
                      n: int) -> tuple[list, list, list, list]:
    """One round with --compare-old: a fresh worker and fresh new and old deployments, measured interleaved."""
    local_pipe = Worker(models, args)
    deployments: list[Served] = []
    raw, local, remote, remote_old = [], [], [], []
    try:
        # Alternate which deployment starts first (and so has been idle longer).
        for tree in ((None, args.compare_old) if n % 2 == 0 else (args.compare_old, None)):
            deployments.append(Served(models, args, workdir / ("old" if tree else "new"), tree))
        new, old = (deployments[0], deployments[1]) if n % 2 == 0 else (deployments[1], deployments[0])
        # Every order of the three paths in turn, so that none is always first or after the same one.
        orders = list(itertools.permutations(("local", "new", "old")))
        for i in range(args.warmup + args.runs):
            got: dict[str, Any] = {}
            for path in orders[(i + n) % len(orders)]:
                got[path] = local_pipe.run() if path == "local" else (new if path == "new" else old).run()
            if i >= args.warmup:
                raw.append(got["local"][0])
                local.append(got["local"][1])
                remote.append(got["new"])
                remote_old.append(got["old"])
    finally:
        for served in deployments:
            served.close()
        local_pipe.close()
    return raw, local, remote, remote_old


def measure_round(models: Path, args: argparse.Namespace, workdir: Path) -> tuple[list, list, list]:
    """One round: a fresh in-process worker and a fresh deployment, measured interleaved."""
    local_pipe, served = Worker(models, args), Served(models, args, workdir)
    raw, local, remote = [], [], []
    try:
        # Alternating which goes first, so that the shared machine's speed drifting
        # during the round affects both paths alike.
        for i in range(args.warmup + args.runs):
            if i % 2:
                r = served.run()
                a, b = local_pipe.run()
            else:
                a, b = local_pipe.run()
                r = served.run()
            if i >= args.warmup:
                raw.append(a)
                local.append(b)
                remote.append(r)
    finally:
        served.close()
        local_pipe.close()
    return raw, local, remote


def main() -> None:
    """Run both measurements and print (and optionally record) the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-seq", type=int, default=512)
    ap.add_argument("--prompt", default="一只可爱的小猫坐在花园里")
    ap.add_argument("--rounds", type=int, default=3,
                    help="fresh processes per side; single processes on this VM vary by +-10%%")
    ap.add_argument("--write", type=Path, help="append the result section to this markdown file")
    ap.add_argument("--compare-old", type=Path, metavar="OLD_TREE",
                    help="also measure the served path with this older source tree's code, interleaved")
    ap.add_argument("--old-label", default="old code", help="what to call the old tree in the report")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from gpu_node.tiny import build_all

    if args.worker:
        worker_main(args.worker, args)
        return
    started = time.perf_counter()
    imports = []
    if args.compare_old:
        args.compare_old = args.compare_old.resolve()
        for tree in (ROOT, args.compare_old):
            imports.append(check_imports(tree))
            print(imports[-1], file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        build_all(models, seed=0, model_ids=("flux1-dev",), loras=False)
        raw, local, remote, remote_old, per_round = [], [], [], [], []
        for n in range(args.rounds):
            if args.compare_old:
                r_raw, r_local, r_remote, r_old = measure_round_old(models, args, Path(tmp) / f"round{n}", n)
                remote_old += r_old
            else:
                r_raw, r_local, r_remote = measure_round(models, args, Path(tmp) / f"round{n}")
                r_old = [float("nan")]
            raw += r_raw
            local += r_local
            remote += r_remote
            per_round.append((statistics.median(r_local), statistics.median(r_remote), statistics.median(r_old)))
            old_p50 = f", {args.old_label} {per_round[-1][2] * 1000:.1f}" if args.compare_old else ""
            print(f"round {n}: p50 ms in-process+PNG {per_round[-1][0] * 1000:.1f}, served "
                  f"{per_round[-1][1] * 1000:.1f}{old_p50}", file=sys.stderr)
    rows = [("in-process pipeline call", raw), ("in-process pipeline + PNG", local),
            ("HTTP -> broker -> node (sync /generate)", remote)]
    if args.compare_old:
        rows[-1] = ("HTTP -> broker -> node (sync /generate), this tree", remote)
        rows.append((f"HTTP -> broker -> node (sync /generate), {args.old_label}", remote_old))
    p50_local, p50_remote = statistics.median(local), statistics.median(remote)
    how = ("a fresh in-process worker and a fresh deployment measured interleaved" if not args.compare_old else
           f"a fresh in-process worker and fresh deployments of this tree and of {args.old_label} "
           f"(`{args.compare_old}`), the three measured interleaved in a rotating order")
    lines = [
        f"### Serving overhead ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'bench/overhead.py', *sys.argv[1:]])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()}; tiny flux1-dev, {args.size}x{args.size}, {args.steps} steps, "
        f"max_sequence_length {args.max_seq}; {args.rounds} rounds, each {how}, {args.runs} runs after "
        f"{args.warmup} warm-up per round; {time.perf_counter() - started:.0f} s in all.",
        "",
        "| path | p50 ms | p95 ms | mean ms |",
        "|---|---|---|---|",
    ]
    for name, values in rows:
        lines.append(f"| {name} | {statistics.median(values) * 1000:.1f} | {percentile(values, 95) * 1000:.1f}"
                     f" | {statistics.mean(values) * 1000:.1f} |")
    paired = statistics.median(served / inproc for served, inproc in zip(remote, local))
    rounds = ", ".join(f"{served / inproc:.3f}" for inproc, served, _ in per_round)
    lines += ["", f"p50 ratio served / in-process (with PNG): **{p50_remote / p50_local:.3f}** "
                  f"(target <= 1.10); median of paired ratios: {paired:.3f}; against the bare pipeline call: "
                  f"{p50_remote / statistics.median(raw):.3f}; p95 ratio: "
                  f"{percentile(remote, 95) / percentile(local, 95):.3f}. Per-round p50 ratios: {rounds}.", ""]
    if args.compare_old:
        p50_old = statistics.median(remote_old)
        paired_old = statistics.median(new / old for new, old in zip(remote, remote_old))
        rounds_old = ", ".join(f"{new / old:.3f}" for _, new, old in per_round)
        lines[-1:] = [
            f"{args.old_label}: p50 ratio served / in-process (with PNG): {p50_old / p50_local:.3f}; "
            f"against the bare pipeline call: {p50_old / statistics.median(raw):.3f}.",
            "",
            f"p50 ratio this tree / {args.old_label}, served: **{p50_remote / p50_old:.3f}** (target <= 1.02); "
            f"difference {(p50_remote - p50_old) * 1000:+.2f} ms; median of paired ratios: {paired_old:.3f}; "
            f"p95 ratio: {percentile(remote, 95) / percentile(remote_old, 95):.3f}. "
            f"Per-round p50 ratios: {rounds_old}.",
            "",
            f"Imports checked before measuring: {'; '.join(imports)}.",
            "",
        ]
    emit(lines, args.write)


if __name__ == "__main__":
    main()
