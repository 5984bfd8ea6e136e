"""The GPU check: a FLUX.1-dev-sized transformer through the node's own pipeline cache and generator.

    bench/gpu_check.sh                      # every stage, full size (on the GPU machine)
    python -m bench.gpu_check --stage bf16 --out results.jsonl
    python -m bench.gpu_check --cpu-smoke   # every stage at reduced depth and width, on the CPU
    python -m bench.gpu_check --report results.jsonl --write docs/benchmarks.md

The transformer has the real FLUX.1-dev configuration (19 double and 38 single blocks, 24
heads of 128 = 3072 wide, T5 width 4096, pooled 768, guidance embedding) and random bf16
weights, built on the device. The text encoders have the real output widths but one layer
each (T5-XXL's 512-token pass is a few ms on such a GPU), the VAE has the real FLUX
configuration. Every image goes through `Generator.run`, as a JOB does: LoRA slots, the step
cache switch, the PNG encoding and all.

Stages (each meant to run alone in under 3 minutes; a cold fp8 compile took over 5 on the H100;
`all` chains them on shared models):
  bf16      eager bf16; first request, s/image, peak memory; then with the step cache; batching
  switch    a second model; park one transformer in pinned host memory, restore it; the plan
  compile   regional compile (dynamic shapes); s/image, cache, recompile count on a new size
  fp8       torchao float8 weights and activations, compiled; s/image, with the cache
  lora      resident LoRA slots (rank 64) on a compiled transformer; hot-swap time, recompiles, fallback
  profile   the kernels (operators on the CPU) that take the time of one image, for what is loaded:
            `compile fp8 profile` (quantized after compiling) against `fp8 profile` (the node's order)
Random weights make the step cache's hit rate meaningless: its figures are times only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from genserve.spec import GenerationParams, LoraRef
from gpu_node.config import SpeedOptions
from gpu_node.generate import Generator, Job
from gpu_node.loras import LoraLibrary
from gpu_node.memory import GIB, plan
from gpu_node.pipeline_cache import PipelineCache, module_bytes
from gpu_node.speed import compile_blocks, compiled_graphs, full_passes, prepare, quantize_fp8

STAGES = ("bf16", "switch", "compile", "fp8", "lora", "cache", "profile")
T5_XXL_PARAMS, CLIP_L_PARAMS = 4_762_310_656, 123_060_480  # the real encoders the shared bytes stand for


class Rig:
    """The models, options and output file one run shares between stages."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = args.device
        self.cuda = self.device.startswith("cuda")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.cache = PipelineCache({}, self.device, self.dtype, 1 << 50)
        self.loras_dir = Path(tempfile.mkdtemp(prefix="gpu-check-loras-"))
        self.generator = Generator(self.cache, LoraLibrary(self.loras_dir), max_sequence_length=args.seq,
                                   speed=SpeedOptions())
        self.out = args.out
        self.headroom = 6 * GIB  # replaced by the bf16 stage's measurement on a GPU

    def record(self, stage: str, name: str, value: Any, unit: str = "", note: str = "") -> None:
        """Print one figure and append it to the results file at once (a killed run keeps what it had)."""
        row = {"stage": stage, "name": name, "value": value, "unit": unit, "note": note}
        print(json.dumps(row), flush=True)
        if self.out:
            with open(self.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    def build(self, model_id: str = "flux1-dev", speed: SpeedOptions | None = None) -> float:
        """Build the pipeline for `model_id` on the device and register it; returns seconds."""
        from bench.gpu_models import build_pipeline

        started = time.perf_counter()
        shared = self.cache.base("flux1-dev") if model_id != "flux1-dev" and "flux1-dev" in self.cache.loaded else None
        pipe = build_pipeline(self.args, self.device, self.dtype, control=model_id != "flux1-dev", shared=shared)
        self.cache.prepare = (lambda p: prepare(p, speed)) if speed else None
        self.cache.add(model_id, pipe)
        self.cache.prepare = None
        self.sync()
        return time.perf_counter() - started

    def sync(self) -> None:
        """Wait for the device."""
        if self.cuda:
            torch.cuda.synchronize()

    def job(self, size: int | None = None, steps: int | None = None, speed: str | None = None,
            loras: list[LoraRef] | None = None, model_id: str = "flux1-dev", seed: int = 1,
            height: int | None = None) -> Job:
        """A text2img (or controlnet) job at the run's size and steps unless told otherwise."""
        a = self.args
        width = size or a.size
        params = GenerationParams(prompt=f"a photograph, seed {seed}", width=width, height=height or width,
                                  num_inference_steps=steps or a.steps, seed=seed, cfg=3.5, strength=1.0,
                                  loras=loras or [], speed=speed)
        mode = "text2img" if model_id == "flux1-dev" else "controlnet"
        return Job(f"check-{seed}", model_id, mode, params, self.control_images(width, height or width, mode))

    @staticmethod
    def control_images(width: int, height: int, mode: str) -> dict[str, bytes]:
        """A grey control image for controlnet jobs."""
        if mode != "controlnet":
            return {}
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (width, height), (128, 128, 128)).save(buf, format="PNG")
        return {"control_image": buf.getvalue()}

    def run(self, job: Job) -> tuple[float, dict]:
        """Seconds for one job through Generator.run (device synchronised), and its metadata."""
        self.sync()
        started = time.perf_counter()
        _, meta = self.generator.run(job, lambda *_: None, lambda: False)
        self.sync()
        return time.perf_counter() - started, {"lora_load": meta.lora_load, "lora_seconds": meta.lora_seconds}

    def timed(self, stage: str, name: str, make: Callable[[int], Job], runs: int | None = None) -> float:
        """Median seconds per image over `runs` jobs (after whatever warm-up the caller did)."""
        times = [self.run(make(seed))[0] for seed in range(2, 2 + (runs or self.args.runs))]
        value = statistics.median(times)
        self.record(stage, name, round(value, 3), "s/image", f"{len(times)} runs: {[round(t, 3) for t in times]}")
        return value

    @property
    def variant(self) -> str:
        """What the loaded flux1-dev transformer is ("eager", "compile + fp8", ...), for labels."""
        from gpu_node.speed import blocks

        if "flux1-dev" not in self.cache.loaded:
            return "not loaded"
        transformer = self.cache.base("flux1-dev").transformer
        parts = ["compile" if any(hasattr(b, "_genserve_compiled") for b in blocks(transformer)) else "eager"]
        if any("torchao" in type(p).__module__ or "torchao" in type(p.data).__module__
               for p in transformer.parameters()):
            parts.append("fp8")
        if getattr(transformer, "_genserve_slots", None) is not None:
            parts.append("LoRA slots")
        return " + ".join(parts)

    def peak(self, stage: str) -> None:
        """Record and reset the device's peak allocated memory."""
        if self.cuda:
            self.record(stage, "peak memory", round(torch.cuda.max_memory_allocated() / GIB, 2), "GiB")
            torch.cuda.reset_peak_memory_stats()


def stage_bf16(rig: Rig) -> None:
    """Eager bf16: first request, steady s/image, peak memory; then the step cache."""
    if "flux1-dev" not in rig.cache.loaded:
        rig.record("bf16", "build transformer and encoders", round(rig.build(), 2), "s")
    first, _ = rig.run(rig.job(seed=1))
    rig.record("bf16", "first request", round(first, 3), "s")
    rig.timed("bf16", "bf16", lambda s: rig.job(seed=s))
    rig.timed("bf16", "bf16 + first block cache", lambda s: rig.job(seed=s, speed="fast"))
    if rig.cuda:
        rig.headroom = torch.cuda.max_memory_allocated() - rig.cache.used_bytes
        rig.record("bf16", "activation headroom at this size", round(rig.headroom / GIB, 2), "GiB",
                   "peak allocated minus the weights held")
    rig.peak("bf16")
    batching(rig)
    if rig.cuda:  # the batched calls' peak belongs to no stage's figure
        torch.cuda.reset_peak_memory_stats()


def stage_switch(rig: Rig) -> None:
    """Two models with room for one on the device: park, restore, switch time, and the residency plan."""
    if "flux1-dev" not in rig.cache.loaded:
        rig.build()
    cache = rig.cache
    transformer = module_bytes(cache.base("flux1-dev").transformer)
    cache.budget = cache.used_bytes + transformer // 2  # room for one transformer only
    cache.host_budget = 4 * transformer
    started = time.perf_counter()
    rig.build("flux1-depth-dev")  # parks flux1-dev: the first park copies its weights to pinned memory
    rig.record("switch", "build a second model, park the first", round(time.perf_counter() - started, 2), "s",
               f"parked: {list(cache.parked)}")
    steps = 2
    for model in ("flux1-depth-dev", "flux1-dev", "flux1-depth-dev", "flux1-dev"):
        before, started = cache.restore_seconds, time.perf_counter()
        cache.base(model)
        rig.sync()
        took = time.perf_counter() - started
        restored = cache.restore_seconds - before
        rig.run(rig.job(steps=steps, model_id=model, size=min(256, rig.args.size)))
        rig.record("switch", f"switch to {model}", round(took, 3), "s",
                   f"restore copy {restored:.3f} s; parked now: {list(cache.parked)}")
    rig.record("switch", "transformer size", round(transformer / GIB, 2), "GiB")
    rig.record("switch", "host-to-device copy rate", round(transformer / GIB / max(restored, 1e-9), 1), "GiB/s")
    cache.evict("flux1-depth-dev")
    cache.budget, cache.host_budget = 1 << 50, 0
    shared = (T5_XXL_PARAMS + CLIP_L_PARAMS) * 2 + module_bytes(cache.base("flux1-dev").vae)
    headroom = max(rig.headroom, 2 * GIB)
    for label, gib in (("80 GB", 80), ("141 GB", 141)):
        for kind, size in (("bf16", transformer), ("fp8", transformer // 2)):
            r = plan(int(gib * 1e9), shared, size, headroom, 96 * GIB)
            rig.record("switch", f"{label} GPU, {kind}: transformers resident", r.on_device, "",
                       f"shared {r.shared_gib} GiB + {r.transformer_gib} GiB each + {r.headroom_gib} GiB headroom;"
                       f" {r.parked} more parked in 96 GiB of pinned host memory")


# Regional compilation should compile each kind of block once (a handful of graphs); one graph per block
# (dozens) would say that guards specialize on each block's weights, and would explain a long first request.
GRAPHS = "a few expected: one per kind of block; dozens mean one per block"


def stage_compile(rig: Rig) -> None:
    """Regional compilation: warm-up, s/image, cache, no recompilation on a new size; batching."""
    if "flux1-dev" not in rig.cache.loaded:
        rig.build()
    transformer = rig.cache.base("flux1-dev").transformer
    compile_blocks(transformer, rig.args.backend)
    before = compiled_graphs()
    first, _ = rig.run(rig.job(seed=1))
    rig.record("compile", "first request (compiles)", round(first, 2), "s")
    graphs = compiled_graphs()
    rig.record("compile", "graphs compiled by the first request", graphs - before, "", GRAPHS)
    rig.timed("compile", "compile", lambda s: rig.job(seed=s))
    rig.timed("compile", "compile + first block cache", lambda s: rig.job(seed=s, speed="fast"))
    other = rig.args.size * 3 // 4 // 16 * 16
    rig.run(rig.job(size=other, height=rig.args.size, steps=2))
    rig.record("compile", "graphs compiled after a new size and cache toggles", compiled_graphs() - graphs, "",
               "0 = no recompilation")
    rig.peak("compile")


def batching(rig: Rig) -> None:
    """Images/s for one job per call against several jobs per call (same model, size and steps), eager."""
    steps = max(2, rig.args.steps // 4)
    for size, count in ((rig.args.size // 2, 4), (rig.args.size, 2)):
        jobs = [rig.job(size=size, steps=steps, seed=s) for s in range(count)]
        rig.generator.run_batch(jobs[:1], lambda *_: None, lambda: False)
        rig.generator.run_batch(jobs, lambda *_: None, lambda: False)  # warm-up of both shapes
        rig.sync()
        started = time.perf_counter()
        for job in jobs:
            rig.generator.run(job, lambda *_: None, lambda: False)
        rig.sync()
        single = count / (time.perf_counter() - started)
        started = time.perf_counter()
        rig.generator.run_batch(jobs, lambda *_: None, lambda: False)
        rig.sync()
        batched = count / (time.perf_counter() - started)
        rig.record("bf16", f"batch of {count} at {size}x{size}, {steps} steps", round(batched / single, 3),
                   "x images/s", f"one per call {single:.3f}/s, batched {batched:.3f}/s")


def stage_fp8(rig: Rig) -> None:
    """torchao float8 weights and activations on the compiled transformer."""
    if not rig.cuda:
        rig.record("fp8", "fp8", "skipped", "", "float8 needs a CUDA GPU of compute capability 8.9+")
        return
    if "flux1-dev" not in rig.cache.loaded:  # alone: the node's own order (quantize, then compile)
        took = rig.build(speed=SpeedOptions(compile=True, compile_backend=rig.args.backend, quantize="fp8"))
        rig.record("fp8", "build, quantize and wrap for compilation", round(took, 2), "s")
    else:  # after the compile stage: its compiled blocks are quantized in place and recompile
        started = time.perf_counter()
        quantize_fp8(rig.cache.base("flux1-dev").transformer)
        rig.sync()
        rig.record("fp8", "quantize", round(time.perf_counter() - started, 2), "s", "after compile, in place")
    before = compiled_graphs()
    first, _ = rig.run(rig.job(seed=1))
    rig.record("fp8", "first request (compiles)", round(first, 2), "s")
    rig.record("fp8", "graphs compiled by the first request", compiled_graphs() - before, "", GRAPHS)
    rig.timed("fp8", "compile + fp8", lambda s: rig.job(seed=s))
    rig.timed("fp8", "compile + fp8 + first block cache", lambda s: rig.job(seed=s, speed="fast"))
    rig.peak("fp8")


def stage_lora(rig: Rig) -> None:
    """Resident slots of rank 64 on a compiled transformer: hot-swap cost and recompiles; the fallback."""
    from bench.gpu_models import save_random_lora

    for model in list(rig.cache.loaded):
        rig.cache.evict(model)
    rank = rig.args.lora_rank
    rig.record("lora", "build with slots", round(rig.build(speed=SpeedOptions(
        compile=True, compile_backend=rig.args.backend, lora_rank=rank)), 2), "s")
    transformer = rig.cache.base("flux1-dev").transformer
    names = [save_random_lora(transformer, rig.loras_dir / f"l{i}.safetensors", r, seed=i)
             for i, r in enumerate((rank // 4, rank // 2, rank // 4, rank))]
    before = compiled_graphs()
    first, _ = rig.run(rig.job(seed=1))
    rig.record("lora", "first request (compiles, with slots)", round(first, 2), "s")
    graphs = compiled_graphs()
    rig.record("lora", "graphs compiled by the first request", graphs - before, "", GRAPHS)
    rig.timed("lora", "compile + empty slots", lambda s: rig.job(seed=s))
    sets = [[LoraRef(names[0], 0.8)], [LoraRef(names[1], 1.0), LoraRef(names[2], 0.5)], [LoraRef(names[0], 0.3)]]
    swaps = []
    for i, loras in enumerate(sets * 2):
        _, meta = rig.run(rig.job(seed=10 + i, loras=loras, steps=2))
        swaps.append(meta["lora_seconds"])
    rig.record("lora", "hot-swap a LoRA set", round(statistics.median(swaps) * 1000, 2), "ms",
               f"{len(swaps)} swaps, sets of 1-2 LoRAs of rank {rank // 4}-{rank // 2}: {swaps}")
    rig.timed("lora", "compile + a LoRA set in the slots", lambda s: rig.job(seed=s, loras=sets[1]))
    rig.record("lora", "graphs compiled across LoRA changes", compiled_graphs() - graphs, "", "0 = no recompilation")
    heavy = [LoraRef(names[3], 1.0), LoraRef(names[1], 1.0)]  # ranks add up past the slots
    took, meta = rig.run(rig.job(seed=30, loras=heavy))
    rig.record("lora", "fallback: a set over the slots' rank", round(took, 2), "s/image",
               f"path {meta['lora_load']}, loading {meta['lora_seconds']} s, graphs +{compiled_graphs() - graphs}")
    rig.peak("lora")


def stage_cache(rig: Rig) -> None:
    """The compiled transformer with the step cache at several thresholds: s/image and transformer passes run.

    A counter around the last block's compiled forward (inside the cache's hooks) counts the full passes;
    the rest were skipped by the cache. With random weights the share skipped at a threshold says nothing
    about a real model: these rows give the time per image at a given share, nothing more.
    """
    if "flux1-dev" not in rig.cache.loaded:
        rig.build()
        compile_blocks(rig.cache.base("flux1-dev").transformer, rig.args.backend)
        rig.run(rig.job(seed=1))
    transformer = rig.cache.base("flux1-dev").transformer
    with full_passes(transformer) as calls:
        for threshold in (0.12, 0.35, 0.6, 1.0):
            rig.generator.speed = SpeedOptions(cache_threshold=threshold)
            calls[0] = 0
            value = rig.timed("cache", f"{rig.variant} + first block cache at {threshold}",
                              lambda s: rig.job(seed=s, speed="fast"))
            passes = calls[0] / rig.args.runs
            rig.record("cache", f"full passes per image at {threshold}", round(passes, 1), f"of {rig.args.steps}",
                       f"{value:.3f} s/image; random weights: the share skipped is not a real model's")
    rig.generator.speed = SpeedOptions()


def stage_profile(rig: Rig, top: int = 12) -> None:
    """The kernels that take one image's time (after a warm-up), as the loaded transformer runs."""
    from torch.profiler import ProfilerActivity, profile

    if "flux1-dev" not in rig.cache.loaded:
        rig.build()
    rig.run(rig.job(seed=1))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rig.cuda else [])
    with profile(activities=activities) as prof:
        took, _ = rig.run(rig.job(seed=2))
    if rig.cuda:  # kernels only: a CPU op's row repeats its kernels' time, and annotations span whole graphs
        from torch.autograd import DeviceType

        events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA
                  and not getattr(e, "is_user_annotation", False)]
        attr = "self_device_time_total"
    else:
        events, attr = list(prof.key_averages()), "self_cpu_time_total"
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1
    variant = rig.variant
    rig.record("profile", f"{variant}: one image, under the profiler", round(took, 3), "s",
               f"{total / 1e6:.3f} s of {'kernel' if rig.cuda else 'operator'} time")
    for event in events[:top]:
        spent = getattr(event, attr)
        rig.record("profile", f"{variant}: {event.key[:90]}", round(spent / 1e3, 1), "ms",
                   f"{100 * spent / total:.1f}% in {event.count} calls")


def main() -> None:
    """Run the chosen stages, or render recorded results as a markdown section."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", nargs="+", default=["all"], choices=("all",) + STAGES)
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, help="denoising steps (default 28; 2 with --cpu-smoke)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512, help="T5 sequence length")
    ap.add_argument("--layers", type=int, default=19)
    ap.add_argument("--single-layers", type=int, default=38)
    ap.add_argument("--heads", type=int, default=24, help="attention heads of 128 (24 = 3072 wide)")
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--text-width", type=int, default=4096, help="T5 width (joint_attention_dim)")
    ap.add_argument("--pooled-width", type=int, default=768, help="CLIP width (pooled_projection_dim)")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--cpu-smoke", action="store_true", help="every stage at reduced depth and width on the CPU")
    ap.add_argument("--out", help="append results as JSON lines here")
    ap.add_argument("--report", type=Path, help="render this results file as markdown instead of running")
    ap.add_argument("--write", type=Path, help="with --report: append the section to this file")
    args = ap.parse_args()
    if args.report:
        from bench.gpu_models import report

        report(args.report, args.write)
        return
    if args.cpu_smoke:
        args.device, args.size, args.steps, args.runs, args.seq = "cpu", 64, args.steps or 2, 1, 32
        args.layers, args.single_layers, args.heads, args.lora_rank = 1, 1, 2, 8
        args.text_width, args.pooled_width = 128, 64
    args.steps = args.steps or 28
    rig = Rig(args)
    props = torch.cuda.get_device_properties(torch.device(args.device)) if rig.cuda else None
    name = props.name if props else platform.processor() or "cpu"
    import diffusers
    import peft
    import transformers

    rig.record("setup", "device", name, "", f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
               f"transformers {transformers.__version__}, peft {peft.__version__}, python {platform.python_version()}, "
               f"{args.layers}+{args.single_layers} blocks, {args.heads * 128} wide, {args.size}px, {args.steps} steps")
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    cache_dir = Path(inductor_cache_dir())
    warm = sum(1 for f in cache_dir.rglob("*") if f.is_file()) if cache_dir.is_dir() else 0
    rig.record("setup", "inductor cache entries at start", warm, "files",
               f"{cache_dir}; 0 = every compilation is a first one")
    stages = STAGES if "all" in args.stage else tuple(s for s in STAGES if s in args.stage)
    for stage in stages:
        started = time.perf_counter()
        try:
            globals()[f"stage_{stage}"](rig)
        except Exception as exc:  # one stage's failure is a result; the next stage still runs
            rig.record(stage, "error", f"{type(exc).__name__}: {exc}"[:500])
            if os.environ.get("GPU_CHECK_STRICT"):
                raise
        rig.record(stage, "stage wall time", round(time.perf_counter() - started, 1), "s")


if __name__ == "__main__":
    sys.exit(main())
