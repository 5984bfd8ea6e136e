"""Journal disk use: bytes on disk per task at peak and after the purge, per storage layout.

    .venv/bin/python bench/journal_disk.py [--tasks 500] [--before-rev 87bb583] [--write docs/benchmarks.md]

Drives Journal and TaskTable directly (no sockets): each task is accepted (every other one
with a 256x256 input PNG, as img2img), started and completed with a 256x256 PNG result
of ~150 KB (a gradient plus noise, compressed at level 1 like the node's). Then every task
is purged. Disk is the apparent size of every file in the data dir (database, WAL, image
files), measured by walking the folder, independently of the journal's own counters.

Layouts compared, on the same tasks and images:
- ``blobs``: images as BLOBs in SQLite, the journal at ``--before-rev`` (the layout before
  issue "Hardening" 15), loaded from git into a temporary module;
- ``blobs+vacuum``: the same, with ``auto_vacuum=INCREMENTAL`` set before the tables are
  created, ``secure_delete=OFF`` (Debian's SQLite zeroes every freed page through the WAL
  otherwise), and ``incremental_vacuum`` plus ``wal_checkpoint(TRUNCATE)`` after the purge;
- ``files``: the current journal (rows in SQLite, images as files). Its purge compacts the
  database itself, so its "during purge" column is measured once the purge has returned.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import platform
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from bench.report import emit  # noqa: E402
from broker import protocol as p  # noqa: E402
from broker.journal import Journal  # noqa: E402
from broker.queue import TaskQueue  # noqa: E402
from broker.tasks import Task, TaskTable  # noqa: E402

SIZE = 256
MB = 1 << 20


def make_pngs(count: int, seed: int = 0) -> list[bytes]:
    """Distinct 256x256 RGB PNGs of ~150 KB: a gradient with 6 bits of noise, zlib level 1."""
    rng = random.Random(seed)
    base = bytes((x + y) % 256 for y in range(SIZE) for x in range(SIZE) for _ in range(3))
    out = []
    for _ in range(count):
        noise = rng.randbytes(len(base))
        pixels = bytes((b + (n & 0x3F)) & 0xFF for b, n in zip(base, noise))
        buf = io.BytesIO()
        Image.frombytes("RGB", (SIZE, SIZE), pixels).save(buf, format="PNG", compress_level=1)
        out.append(buf.getvalue())
    return out


def disk_bytes(folder: Path) -> dict[str, int]:
    """Apparent sizes of the database, its WAL (and shared-memory index), and every other file under `folder`."""
    sizes = {"db": 0, "wal": 0, "files": 0}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            size = os.stat(os.path.join(dirpath, name)).st_size
            key = "db" if name.endswith(".sqlite3") else "wal" if name.endswith(("-wal", "-shm")) else "files"
            sizes[key] += size
    sizes["total"] = sum(sizes.values())
    return sizes


def old_journal_class(rev: str) -> type | None:
    """The Journal class of broker/journal.py at git revision `rev`, or None without git."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:broker/journal.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"cannot load broker/journal.py at {rev}: {exc}", file=sys.stderr)
        return None
    path = Path(tempfile.mkdtemp()) / "journal_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("journal_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Journal


def incremental_db(path: Path) -> None:
    """Create an empty database with auto_vacuum=INCREMENTAL, before any table exists."""
    db = sqlite3.connect(str(path))
    db.execute("PRAGMA auto_vacuum=INCREMENTAL")
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript("CREATE TABLE first (a); DROP TABLE first;")  # writes the setting to the file
    db.close()


def written() -> int | None:
    """Bytes this process has passed to write() so far (Linux), or None."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))
    except (OSError, StopIteration, ValueError):
        return None


def run(name: str, open_journal: Callable[[Path], Any], after_purge: list[Callable[[Any], None]],
        results: list[bytes], inputs: list[bytes], n: int) -> dict[str, Any]:
    """Journal `n` tasks through a TaskTable, purge them all; returns the disk figures.

    `after_purge` steps run one by one after the purge; the disk is measured after each.
    """
    folder = Path(tempfile.mkdtemp(prefix=f"journal-{name}-"))
    try:
        journal = open_journal(folder / "journal.sqlite3")
        table = TaskTable(journal, TaskQueue())
        peak = disk_bytes(folder)
        wrote = written()
        started = time.perf_counter()
        for i in range(n):
            img = [inputs[i % len(inputs)]] if i % 2 else []
            task = Task(task_id=uuid.uuid4().hex, model="flux1-dev", mode="img2img" if img else "text2img",
                        priority=0, seq=table.next_seq(), owner="bench", image_names=["input_image"] * len(img),
                        inputs=img, created=float(i), deadline=i + 240.0,
                        params={"prompt": "a cat in a garden " * 4, "width": SIZE, "height": SIZE,
                                "num_inference_steps": 8, "seed": i, "cfg": 3.5})
            table.accept(task, float(i))
            table.queue.remove(task.task_id)
            task.state, task.started, task.attempts = p.RUNNING, i + 0.1, 1
            journal.update(task)
            task.state, task.finished = p.COMPLETED, i + 0.5
            task.meta = {"generation_time": 0.4, "width": SIZE, "height": SIZE, "device": "cpu"}
            table.finish(task, results[i % len(results)])
            if i % 50 == 49:
                now = disk_bytes(folder)
                peak = max(peak, now, key=lambda d: d["total"])
        journal_s = time.perf_counter() - started
        full = disk_bytes(folder)
        peak = max(peak, full, key=lambda d: d["total"])
        started = time.perf_counter()
        table.housekeeping(now=n + 10_000.0, result_ttl=60.0)
        purge_s = time.perf_counter() - started
        transient = disk_bytes(folder)
        for step in after_purge:
            started = time.perf_counter()
            step(journal)
            purge_s += time.perf_counter() - started
            transient = max(transient, disk_bytes(folder), key=lambda d: d["total"])
        assert len(table) == 0, "every task should have been purged"
        after = disk_bytes(folder)
        wrote = None if wrote is None else written() - wrote
        counters = getattr(journal, "blob_bytes", None)
        journal.close()
        return {"name": name, "peak": peak, "transient": transient, "after": after, "wrote": wrote,
                "journal_ms": journal_s / n * 1000, "purge_s": purge_s, "counted": counters}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def incremental_vacuum(journal: Any) -> None:
    """Return the free pages at the end of the database to the filesystem (through the WAL)."""
    journal._db.executescript("PRAGMA incremental_vacuum;")


def checkpoint(journal: Any) -> None:
    """Copy the WAL into the database and truncate it."""
    journal._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def main() -> None:
    """Run the layouts and print (or append) a markdown section."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=500)
    ap.add_argument("--before-rev", default="87bb583", help="git revision with images as BLOBs in SQLite")
    ap.add_argument("--write", type=Path, help="append the section to this markdown file")
    args = ap.parse_args()

    results, inputs = make_pngs(32, seed=1), make_pngs(8, seed=2)
    mean_result = sum(map(len, results)) / len(results)
    mean_input = sum(map(len, inputs)) / len(inputs)
    runs = []
    old = old_journal_class(args.before_rev)
    if old is not None:
        runs.append(run("blobs", old, [], results, inputs, args.tasks))

        def old_incremental(path: Path) -> Any:
            incremental_db(path)
            journal = old(path)
            journal._db.execute("PRAGMA secure_delete=OFF")  # its best case: freed pages are not zeroed
            return journal
        runs.append(run("blobs+vacuum", old_incremental, [incremental_vacuum, checkpoint], results, inputs,
                        args.tasks))
    runs.append(run("files", Journal, [], results, inputs, args.tasks))

    n = args.tasks
    images = (mean_result + mean_input / 2) * n
    lines = [
        "", f"### Journal disk use ({time.strftime('%Y-%m-%d')})", "",
        f"Command: `.venv/bin/python bench/journal_disk.py --tasks {n}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared VM), {platform.platform()}, Python "
        f"{platform.python_version()}, SQLite {sqlite3.sqlite_version}; {n} tasks, every one with a "
        f"{SIZE}x{SIZE} PNG result (mean {mean_result / 1024:.0f} KB), every other one with a "
        f"{SIZE}x{SIZE} PNG input (mean {mean_input / 1024:.0f} KB): {images / MB:.1f} MB of images in all. "
        f"Disk = apparent size of every file in the data dir.", "",
        "| layout | peak MB (db + wal + files) | bytes/task at peak | during purge MB (db + wal + files) "
        "| after purge MB (db + wal + files) | bytes/task after purge | MB written | journal ms/task | purge s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def mb(d: dict[str, int], digits: int) -> str:
        return (f"{d['total'] / MB:.{digits}f} ({d['db'] / MB:.{digits}f} + {d['wal'] / MB:.{digits}f} + "
                f"{d['files'] / MB:.{digits}f})")
    for r in runs:
        wrote = "-" if r["wrote"] is None else f"{r['wrote'] / MB:.0f}"
        lines.append(
            f"| {r['name']} | {mb(r['peak'], 1)} | {r['peak']['total'] / n:,.0f} | {mb(r['transient'], 1)} | "
            f"{mb(r['after'], 2)} | {r['after']['total'] / n:,.0f} | {wrote} | {r['journal_ms']:.2f} | "
            f"{r['purge_s']:.2f} |")
    files = runs[-1]
    lines += ["", f"At the peak every task is completed, so only results are stored (inputs are dropped when a "
                  f"task ends): {mean_result:,.0f} image bytes per task. The `files` journal's own byte counter "
                  f"after the purge: {files['counted']:,}."]
    emit(lines, args.write)


if __name__ == "__main__":
    main()
