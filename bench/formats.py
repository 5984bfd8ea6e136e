"""Encode time and size of each output format at 1024x1024, on a natural photograph.

    .venv/bin/pip install '.[bench]'   # matplotlib, for its sample photograph
    .venv/bin/python bench/formats.py [--repeat 15] [--write docs/benchmarks.md]

Random tiny-model output is noise, which no codec compresses; a photograph is what real
Flux output resembles. The photograph is matplotlib's `grace_hopper.jpg` (512x600), resized
to 1024x1024 with Lanczos. Each format is encoded by the node's own `encode_image` at its
defaults (PNG zlib level 1 as the node uses, JPEG and WebP quality 90), median of N runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import emit  # noqa: E402
from genserve.catalog import DEFAULT_OUTPUT_QUALITY, OUTPUT_FORMATS  # noqa: E402
from gpu_node.generate import encode_image  # noqa: E402

SETTINGS = {"png": "zlib level 1 (the node's default)", "jpeg": f"quality {DEFAULT_OUTPUT_QUALITY}",
            "webp": f"quality {DEFAULT_OUTPUT_QUALITY}, method 4"}


def photograph(size: int) -> Image.Image:
    """matplotlib's sample photograph, resized to size x size."""
    import matplotlib.cbook

    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return Image.open(path).convert("RGB").resize((size, size), Image.LANCZOS)


def main() -> None:
    """Time every format and print (or append) the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--write", type=Path)
    a = ap.parse_args()
    image = photograph(a.size)
    raw = a.size * a.size * 3
    rows = []
    for fmt in OUTPUT_FORMATS:
        encode_image(image, fmt, DEFAULT_OUTPUT_QUALITY, 1)  # warm-up
        times, data = [], b""
        for _ in range(a.repeat):
            started = time.perf_counter()
            data = encode_image(image, fmt, DEFAULT_OUTPUT_QUALITY, 1)
            times.append(time.perf_counter() - started)
        rows.append((fmt, statistics.median(times) * 1000, len(data)))
    png_ms, png_bytes = rows[0][1], rows[0][2]
    lines = [f"## Output formats at {a.size}x{a.size} ({date.today()})", "",
             f"Command: `.venv/bin/python bench/formats.py --repeat {a.repeat}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, no GPU, Python {platform.python_version()},"
             f" Pillow {Image.__version__}. Image: matplotlib's `grace_hopper.jpg` resized to {a.size}x{a.size};"
             f" median of {a.repeat} encodes on one core (what the node's encode costs per image).", "",
             "| format | settings | encode ms | size KB | size vs raw RGB | time vs png | size vs png |",
             "|---|---|---|---|---|---|---|"]
    for fmt, ms, nbytes in rows:
        lines.append(f"| {fmt} | {SETTINGS[fmt]} | {ms:.1f} | {nbytes / 1024:.0f} | {nbytes / raw:.3f} |"
                     f" {ms / png_ms:.2f} | {nbytes / png_bytes:.3f} |")
    lines += ["", "Smaller results travel faster (node to broker, disk, base64 in JSON, the client's "
              "download); PNG is lossless, the others are not.", ""]
    emit(lines, a.write)


if __name__ == "__main__":
    main()
