"""Full-size FLUX.1-dev transformer (random bf16 weights) through the node's own code path.

    python bench/gpu_flux_full.py --device cuda:0 --steps 4 --size 1024 --write docs/benchmarks.md
    python bench/gpu_flux_full.py --device cpu --layers 1 --single-layers 1 --size 64   # code-path check

Builds FluxTransformer2DModel with the FLUX.1-dev configuration (19 double and 38 single
blocks, 24 heads of 128, joint_attention_dim 4096, pooled 768, guidance embeds) directly
on the device, with text encoders of the real widths but one layer each (their cost is
not what is measured) and a tiny VAE. The pipeline goes into the node's PipelineCache
and runs through Generator.run, the same call a JOB takes, so the figures include the
node's callback, LoRA context and PNG encoding. Reports seconds per denoising step and
peak GPU memory.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import FluxPipeline, FluxTransformer2DModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel  # noqa: E402

from bench.report import emit  # noqa: E402
from genserve.spec import GenerationParams  # noqa: E402
from gpu_node.generate import Generator, Job  # noqa: E402
from gpu_node.loras import LoraLibrary  # noqa: E402
from gpu_node.pipeline_cache import PipelineCache, module_bytes  # noqa: E402
from gpu_node.tiny import clip_tokenizer, scheduler, t5_tokenizer  # noqa: E402
from gpu_node.tiny import vae as tiny_vae


def build(args: argparse.Namespace, device: str, dtype: torch.dtype) -> FluxPipeline:
    """The pipeline object: full transformer, real-width one-layer encoders, tiny VAE."""
    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    with torch.device(device):
        torch.set_default_dtype(dtype)
        try:
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=args.layers, num_single_layers=args.single_layers,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
            clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=1024,
                                                num_hidden_layers=1, num_attention_heads=12,
                                                max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                                pad_token_id=1))
            t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=4096, d_kv=64, d_ff=1024, num_layers=1,
                                         num_heads=64, relative_attention_num_buckets=32,
                                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
            vae = tiny_vae()
        finally:
            torch.set_default_dtype(torch.float32)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler(), vae=vae, text_encoder=clip,
                        tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok2).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    """Run warm-up plus timed jobs; print and optionally record the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", type=int, default=19)
    ap.add_argument("--single-layers", type=int, default=38)
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    pipe = build(args, args.device, dtype)
    cache = PipelineCache({}, args.device, dtype, 1 << 50)
    cache.add("flux1-dev", pipe)  # built in memory instead of from_pretrained (no download)
    generator = Generator(cache, LoraLibrary(None), png_level=1, max_sequence_length=512)
    params = GenerationParams("a cat in a garden", args.size, args.size, args.steps, 42, 3.5, 0.8)
    step_times: list[float] = []
    totals: list[float] = []
    for run in range(args.runs + 1):
        marks: list[float] = []

        def on_step(step: int, total: int) -> None:
            if cuda:
                torch.cuda.synchronize(args.device)
            marks.append(time.perf_counter())

        if cuda:
            torch.cuda.reset_peak_memory_stats(args.device)
        started = time.perf_counter()
        png, meta = generator.run(Job(f"bench{run}", "flux1-dev", "text2img", params), on_step, lambda: False)
        totals.append(time.perf_counter() - started)
        if run > 0:  # the first run is warm-up
            step_times += [b - a for a, b in zip(marks, marks[1:])]
    peak = torch.cuda.max_memory_allocated(args.device) / 2**30 if cuda else float("nan")
    name = torch.cuda.get_device_name(args.device) if cuda else platform.processor() or "cpu"
    lines = [
        f"### Full-size FLUX.1-dev transformer through the node ({time.strftime('%Y-%m-%d')})", "",
        f"Command: `python bench/gpu_flux_full.py {' '.join(sys.argv[1:])}`  ",
        f"Device: {name}, torch {torch.__version__}, {dtype}; transformer {args.layers}+{args.single_layers} blocks,"
        f" {module_bytes(pipe.transformer) / 2**30:.1f} GiB of weights; {args.size}x{args.size}, {args.steps} steps,"
        f" {args.runs} timed runs after 1 warm-up.", "",
        "| figure | value |", "|---|---|",
        f"| seconds per denoising step (median) | {statistics.median(step_times):.3f} |" if step_times else
        "| seconds per denoising step | n/a (one step per run) |",
        f"| whole job incl. text encoders, VAE, PNG (median s) | {statistics.median(totals[1:]):.3f} |",
        f"| peak GPU memory (GiB) | {peak:.1f} |", "",
    ]
    emit(lines, args.write)


if __name__ == "__main__":
    main()
