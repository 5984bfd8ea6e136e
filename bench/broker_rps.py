"""Broker throughput: tasks/s through the real broker with no-op nodes, against a bare ROUTER relay.

    .venv/bin/python bench/broker_rps.py [--seconds 5] [--rounds 3] [--nodes 4] [--window 64] [--write F]

Three processes in both set-ups, on the same cores: a client, the server and one process of
no-op nodes. The client keeps `--window` SUBMITs (watch=True, 16x16 text2img, the frames a
front sends) outstanding and counts the DONE messages that come back. The nodes answer each
JOB at once with a RESULT carrying a real 16x16 PNG.

- **broker**: `genserve-broker` with its journal on disk (every task is journaled before its
  ACK, its result file written, as in production).
- **relay**: a bare pyzmq ROUTER/ROUTER loop moving the same frames without decoding them:
  SUBMIT to an idle node as the JOB, a small ACK back to the client, the node's RESULT to the
  client as the DONE and a small ack to the node: the broker's message count, nothing else.

Rounds alternate broker and relay; reported: median tasks/s of each and the ratio (issue 12's
target: 50 %), then the p50/p99 submit-to-done latency at half of each one's peak rate.
Takes about rounds x 2 x (seconds + 3) + 2 x (seconds + 3) seconds.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Iterator

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402
from genserve import wire as w  # noqa: E402
from genserve.spec import GenerationParams, TaskSpec  # noqa: E402

BIN = Path(sys.executable).parent
PARAMS = GenerationParams(prompt="bench", width=16, height=16, num_inference_steps=2, seed=1, cfg=3.5, strength=0.8)


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png16() -> bytes:
    """A real 16x16 PNG, the no-op nodes' result."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


# ---- the bare relay ---------------------------------------------------------------------------

def waiting_on(sock: zmq.Socket) -> Iterator[list[bytes]]:
    """Every message waiting on `sock` now, without blocking."""
    while True:
        try:
            yield sock.recv_multipart(zmq.NOBLOCK, copy=True)
        except zmq.Again:
            return


def relay(frontend: str, backend: str) -> None:
    """ROUTER/ROUTER: client frames to an idle node, node frames back to the client; no decoding."""
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    for sock in (front, back):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
    front.bind(frontend)
    back.bind(backend)
    idle: collections.deque[bytes] = collections.deque()
    waiting: collections.deque[list[bytes]] = collections.deque()
    owner: dict[bytes, bytes] = {}  # node -> the client whose job it runs
    ack, result_ack = b"ACK", b"RESULT_ACK"
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        events = dict(poller.poll(1000))
        for frames in waiting_on(back) if back in events else ():
            node = frames[0]
            client = owner.pop(node, None)
            if client is not None:
                front.send_multipart([client, *frames[1:]], copy=False)
                back.send_multipart([node, result_ack])
            idle.append(node)
        for frames in waiting_on(front) if front in events else ():
            front.send_multipart([frames[0], ack])
            waiting.append(frames)
        while idle and waiting:
            node, frames = idle.popleft(), waiting.popleft()
            owner[node] = frames[0]
            back.send_multipart([node, *frames[1:]], copy=False)


# ---- no-op nodes ------------------------------------------------------------------------------

def nodes(backend: str, count: int, protocol: bool) -> None:
    """`count` DEALER nodes in one thread; each answers a JOB at once with a RESULT and a 16x16 PNG."""
    ctx = zmq.Context()
    png = png16()
    meta = w.ResultMeta(generation_time=0.0, width=16, height=16, seed=1, steps=2, device="noop")
    socks = []
    for i in range(count):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, f"noop-{i}".encode())
        sock.connect(backend)
        if protocol:
            sock.send_multipart(w.encode(w.Ready(node_id=f"noop-{i}", device="noop", host="bench", pid=os.getpid(),
                                                 models={"flux1-dev": ["text2img"]}, loaded=["flux1-dev"],
                                                 reports=[])))
        else:
            sock.send(b"READY")
        socks.append(sock)
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    beat = w.encode(w.Heartbeat(idle=True))
    last_beat = time.monotonic()
    while True:
        for sock, _ in poller.poll(250):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if not protocol:
                    if frames[0] != b"RESULT_ACK":
                        sock.send_multipart(frames[:1] + [png], copy=False)  # the relay's "RESULT"
                    continue
                msg = w.decode(frames)
                if msg.command == w.JOB:
                    sock.send_multipart(w.encode(w.Result(msg.header.task_id, meta, loaded=["flux1-dev"]), [png]),
                                        copy=False)
        if protocol and time.monotonic() - last_beat > 0.5:
            last_beat = time.monotonic()
            for sock in socks:
                sock.send_multipart(beat)


# ---- the client -------------------------------------------------------------------------------

class Client:
    """Keeps SUBMITs outstanding against one server and counts what comes back done."""

    def __init__(self, ctx: zmq.Context, endpoint: str, protocol: bool) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.connect(endpoint)
        self.protocol = protocol
        self.req = 0
        self.sent: dict[int, float] = {}  # req -> send time (relay: its order)
        self.by_task: dict[str, int] = {}
        self.order: collections.deque[int] = collections.deque()

    def submit(self) -> None:
        """Send one SUBMIT (the relay forwards the same frames)."""
        self.req += 1
        self.sent[self.req] = time.perf_counter()
        self.order.append(self.req)
        self.sock.send_multipart(w.encode(w.Submit(self.req, TaskSpec("flux1-dev", "text2img", 0, PARAMS), "bench",
                                                   watch=True)))

    def poll(self, timeout_ms: int) -> list[float]:
        """Receive what arrived; returns the submit-to-done latency of each task that ended."""
        done = []
        if not self.sock.poll(timeout_ms):
            return done
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return done
            if not self.protocol:
                if frames[0] != b"ACK":
                    done.append(time.perf_counter() - self.sent.pop(self.order.popleft()))
                continue
            msg = w.decode(frames)
            if msg.command == w.ACK:
                self.by_task[msg.header.task_id] = msg.header.req
            elif msg.command == w.DONE:
                assert msg.header.task.status == w.COMPLETED, msg.header.task
                req = self.by_task.pop(msg.header.task.task_id)
                done.append(time.perf_counter() - self.sent.pop(req))
            elif msg.command == w.FAIL:
                raise RuntimeError(f"the broker refused a SUBMIT: {msg.header}")

    def closed_loop(self, window: int, seconds: float) -> float:
        """Tasks/s with `window` outstanding, after a one-second warm-up."""
        for _ in range(window):
            self.submit()
        start = time.perf_counter()
        count, counting_from = 0, start + 1.0
        while time.perf_counter() < counting_from + seconds:
            for _ in self.poll(100):
                if time.perf_counter() >= counting_from:
                    count += 1
                self.submit()
        elapsed = time.perf_counter() - counting_from
        self.drain()
        return count / elapsed

    def open_loop(self, rate: float, seconds: float) -> list[float]:
        """Submit at `rate` tasks/s for `seconds`; the latencies of those tasks."""
        latencies: list[float] = []
        start = time.perf_counter()
        n = 0
        while time.perf_counter() < start + seconds:
            due = start + n / rate
            while time.perf_counter() >= due:
                self.submit()
                n += 1
                due = start + n / rate
            latencies += self.poll(max(0, int((due - time.perf_counter()) * 1000)))
        latencies += self.drain()
        return latencies

    def drain(self) -> list[float]:
        """Wait for everything outstanding (at most 30 s)."""
        out: list[float] = []
        deadline = time.monotonic() + 30
        while self.sent and time.monotonic() < deadline:
            out += self.poll(100)
        if self.sent:
            raise RuntimeError(f"{len(self.sent)} tasks never came back")
        return out

    def close(self) -> None:
        """Close the socket (linger 0)."""
        self.sock.close(linger=0)


# ---- one set-up -------------------------------------------------------------------------------

class Setup:
    """Server and nodes as subprocesses; killed by close()."""

    def __init__(self, kind: str, node_count: int, data: Path) -> None:
        self.kind = kind
        fport, bport = free_port(), free_port()
        self.frontend, self.backend = f"tcp://127.0.0.1:{fport}", f"tcp://127.0.0.1:{bport}"
        me = [sys.executable, str(Path(__file__).resolve())]
        if kind == "broker":
            server = [str(BIN / "genserve-broker"), "--frontend", self.frontend, "--backend", self.backend,
                      "--data-dir", str(data), "--max-queued-per-key", "1000000", "--log-level", "WARNING"]
        else:
            server = [*me, "relay", self.frontend, self.backend]
        self.procs = [subprocess.Popen(server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        time.sleep(1.5 if kind == "broker" else 0.5)
        self.procs.append(subprocess.Popen([*me, "nodes", self.backend, str(node_count), kind],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.5)

    def close(self) -> None:
        """Kill both subprocesses."""
        for proc in self.procs:
            proc.kill()
            proc.wait(timeout=10)


def measure(kind: str, args: argparse.Namespace, ctx: zmq.Context, rate: float | None = None) -> float | list[float]:
    """One closed-loop throughput run (rate None) or one open-loop latency run, on a fresh set-up."""
    with tempfile.TemporaryDirectory(prefix="broker-rps-") as tmp:
        setup = Setup(kind, args.nodes, Path(tmp))
        client = Client(ctx, setup.frontend, kind == "broker")
        try:
            if rate is None:
                return client.closed_loop(args.window, args.seconds)
            return client.open_loop(rate, args.seconds)
        finally:
            client.close()
            setup.close()


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) in milliseconds."""
    values = sorted(values)
    return 1000 * values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    """Interleaved rounds of broker and relay; print (and optionally append) the section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--write", type=Path, help="append the section to this markdown file")
    args = ap.parse_args()
    if not (BIN / "genserve-broker").exists() or not shutil.which(sys.executable):
        raise SystemExit("run with the project's venv python (make install)")
    ctx = zmq.Context()
    peak: dict[str, list[float]] = {"broker": [], "relay": []}
    for _ in range(args.rounds):
        for kind in peak:
            peak[kind].append(measure(kind, args, ctx))
            print(f"{kind}: {peak[kind][-1]:.0f} tasks/s", file=sys.stderr)
    median = {kind: statistics.median(v) for kind, v in peak.items()}
    latency = {kind: measure(kind, args, ctx, rate=median[kind] / 2) for kind in peak}
    ctx.term()
    lines = [
        f"## Broker throughput against a bare ROUTER relay ({date.today()})",
        "",
        f"Command: `.venv/bin/python bench/broker_rps.py --seconds {args.seconds:g} --rounds {args.rounds}"
        f" --nodes {args.nodes} --window {args.window}`. Machine: {platform.machine()}, {os.cpu_count()} cores,"
        f" Python {platform.python_version()}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}.",
        "",
        "| server | tasks/s per round | median | vs relay | p50 / p99 submit-to-done at half its peak |",
        "|---|---|---|---|---|",
    ]
    for kind in peak:
        lat = latency[kind]
        lines.append(f"| {kind} | {', '.join(f'{v:.0f}' for v in peak[kind])} | {median[kind]:.0f} |"
                     f" {median[kind] / median['relay']:.0%} | {pct(lat, 0.5):.2f} / {pct(lat, 0.99):.2f} ms"
                     f" ({len(lat)} tasks) |")
    emit(lines, args.write)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "relay":
        relay(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "nodes":
        nodes(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "broker")
    else:
        main()
