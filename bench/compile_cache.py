"""A node start with `--compile`, cold against one that finds the last start's compile cache (CPU, Flux blocks).

    .venv/bin/python bench/compile_cache.py [--rounds 3]

Each start is a fresh process that does what a compiling node does before it serves:
`use_compile_cache(folder)`, then the transformer's blocks compiled by `compile_blocks` and one
step run. A small Flux transformer (two double and three single blocks) stands in for the real
one: the graphs are the same kinds, the CPU compiles them with C++ instead of Triton. The H100
figures for the full-size transformer are in docs/benchmarks.md (GPU check, run 4). The cold
figure also depends on whether inductor's precompiled C++ headers, which it keeps under /tmp
whatever the cache folder, are already there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

START = """
import json, sys, time
started = time.perf_counter()
import torch
from pathlib import Path
from torch._dynamo.utils import counters
from diffusers import FluxTransformer2DModel
from gpu_node.__main__ import use_compile_cache
from gpu_node.speed import compile_blocks

use_compile_cache(Path(sys.argv[1]))
torch.manual_seed(0)
model = FluxTransformer2DModel(patch_size=1, in_channels=64, out_channels=64, num_layers=2, num_single_layers=3,
                               attention_head_dim=64, num_attention_heads=2, joint_attention_dim=128,
                               pooled_projection_dim=32, guidance_embeds=True,
                               axes_dims_rope=(16, 24, 24)).requires_grad_(False)
compile_blocks(model)
imported = time.perf_counter()
with torch.no_grad():
    model(hidden_states=torch.randn(1, 64, 64), encoder_hidden_states=torch.randn(1, 16, 128),
          pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(64, 3),
          txt_ids=torch.zeros(16, 3), guidance=torch.tensor([3.5]))
print(json.dumps({"first_step": time.perf_counter() - imported,
                  "total": time.perf_counter() - started,
                  "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"]}))
"""


def start(folder: Path) -> dict:
    """One node start in a fresh process: seconds to the first step's end, and inductor's cache counts."""
    done = subprocess.run([sys.executable, "-c", START, str(folder)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    if done.returncode:
        raise SystemExit(f"a start failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Alternate cold and warm starts; print the medians and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cold, warm = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            folder = Path(tmp) / f"cache-{i}"
            first = start(folder)  # an empty folder: everything compiles
            again = start(folder)  # the next start of the same node
            assert first["misses"] and not first["hits"] and again["hits"] and not again["misses"], (first, again)
            cold.append(first)
            warm.append(again)
            print(f"round {i + 1}: cold {first['first_step']:.2f} s (total {first['total']:.2f}), "
                  f"warm {again['first_step']:.2f} s (total {again['total']:.2f}); "
                  f"graphs compiled {first['misses']}, read back {again['hits']}", flush=True)
    c = statistics.median(r["first_step"] for r in cold)
    w = statistics.median(r["first_step"] for r in warm)
    print(f"median first step: cold {c:.2f} s, warm {w:.2f} s, {c / w:.1f}x")


if __name__ == "__main__":
    main()
