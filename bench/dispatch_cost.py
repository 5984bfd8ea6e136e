"""Placement cost at scale: one broker dispatch pass over many busy nodes with room to prefetch.

    .venv/bin/python bench/dispatch_cost.py [--nodes 50 100 200] [--repeat 5] [--write F]
    PYTHONPATH=/tmp/oldtree .venv/bin/python bench/dispatch_cost.py ...   # another tree's broker

The real `Broker._dispatch` (no sockets are written: sending and event publishing are stubbed)
with N registered nodes, each running a job and with room for one waiting behind it
(`--prefetch 1`), all serving one model, and 2N tasks of one priority queued:

- **burst**: the one pass that places N jobs to wait (as after an urgent job that held the
  others back starts, or at a broker start with a backlog);
- **full**: the next pass, with every waiting place taken (what each later message costs).

Reports the median of `--repeat` fresh brokers per N. No GPU, no processes; a few seconds.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after PYTHONPATH: another tree given there is measured instead

from bench.report import emit  # noqa: E402
from broker.config import BrokerConfig  # noqa: E402
from broker.nodes import BUSY  # noqa: E402
from broker.server import Broker  # noqa: E402
from broker.tasks import Task  # noqa: E402
from genserve import wire as w  # noqa: E402
from genserve.spec import GenerationParams  # noqa: E402


def loaded_broker(nodes: int, data: Path, ctx: zmq.Context) -> Broker:
    """A broker with `nodes` busy prefetching nodes and 2 x `nodes` queued tasks; nothing is sent."""
    broker = Broker(BrokerConfig(data_dir=data), ctx)
    broker._to_node = lambda *args, **kwargs: None  # type: ignore[method-assign]
    broker._publish = lambda *args, **kwargs: None  # type: ignore[method-assign]
    for i in range(nodes):
        ready = w.Ready(node_id=f"n{i}", device="bench", host="h", pid=i, models={"flux1-dev": ["text2img"]},
                        loaded=["flux1-dev"], prefetch=1)
        node = broker.nodes.register(f"node-{i}".encode(), ready, 0.0)
        node.state, node.task_id = BUSY, f"running-{i}"
    params = GenerationParams(prompt="x", width=512, height=512, num_inference_steps=4, seed=0, cfg=3.5,
                              strength=1.0)
    for _ in range(2 * nodes):
        broker.table.accept(Task(task_id=uuid.uuid4().hex, model="flux1-dev", mode="text2img", priority=5,
                                 seq=broker.table.next_seq(), params=params, deadline=1e12), 0.0)
    return broker


def measure(nodes: int, ctx: zmq.Context) -> tuple[float, float, int]:
    """(burst seconds, full seconds, jobs placed by the burst) for one fresh broker."""
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as data:
        broker = loaded_broker(nodes, Path(data), ctx)
        try:
            started = time.perf_counter()
            broker._dispatch()
            burst = time.perf_counter() - started
            placed = sum(1 for node in broker.nodes if node.next_id)
            started = time.perf_counter()
            broker._dispatch()
            return burst, time.perf_counter() - started, placed
        finally:
            broker.close()


def main() -> None:
    """Measure each N; print (and optionally append) the section."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--label", default="this tree")
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    logging.disable(logging.CRITICAL)
    ctx = zmq.Context()
    rows = []
    try:
        for n in args.nodes:
            runs = [measure(n, ctx) for _ in range(args.repeat)]
            burst = statistics.median(r[0] for r in runs)
            full = statistics.median(r[1] for r in runs)
            per_job = burst / max(1, runs[0][2]) * 1e6
            rows.append(f"| {args.label} | {n} | {runs[0][2]} | {burst * 1e3:.1f} | {per_job:.0f} | {full * 1e3:.2f} |")
    finally:
        ctx.term()
    import broker

    lines = [f"### Placement cost at scale ({date.today().isoformat()})", "",
             f"Command: `.venv/bin/python bench/dispatch_cost.py --nodes {' '.join(map(str, args.nodes))}"
             f" --repeat {args.repeat}`  ",
             f"Machine: {platform.machine()}, Python {platform.python_version()}; broker from"
             f" {Path(broker.__file__).parent.parent}; medians of {args.repeat} fresh brokers.", "",
             "| tree | nodes | jobs placed | burst pass ms | us per job placed | full pass ms |",
             "|---|---|---|---|---|---|", *rows, ""]
    emit(lines, args.write)


if __name__ == "__main__":
    main()
