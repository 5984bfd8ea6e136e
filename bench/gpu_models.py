"""Random-weight models at FLUX.1-dev's real sizes, random LoRAs, and the GPU check's report."""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxControlPipeline, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from bench.report import emit
from gpu_node.tiny import clip_tokenizer, scheduler, t5_tokenizer

PUBLISHED_H100 = {"bf16": 6.7, "compile": 4.4, "compile + fp8": None}  # FLUX.1-dev, 1024x1024, 28 steps


def _encoders(tok: Any, tok2: Any, text: int, pooled: int) -> tuple[CLIPTextModel, T5EncoderModel]:
    """CLIP-L and T5-XXL at the given widths (real: 768 pooled, 4096 per token), one layer each."""
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=pooled, intermediate_size=4 * pooled,
                                        num_hidden_layers=1, num_attention_heads=max(1, pooled // 64),
                                        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=text, d_kv=64, d_ff=text * 5 // 2, num_layers=1,
                                 num_heads=max(1, text // 64), relative_attention_num_buckets=32,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                 feed_forward_proj="gated-gelu"))
    return clip, t5


def _vae() -> AutoencoderKL:
    """FLUX.1's VAE configuration (16 latent channels, 8x downsampling)."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                         layers_per_block=2, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                         use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)


def build_pipeline(args: argparse.Namespace, device: str, dtype: torch.dtype, control: bool = False,
                   shared: Any = None) -> Any:
    """FluxPipeline (or FluxControlPipeline) with a transformer of `args`' depth and width, built on `device`."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    with torch.device(device):
        torch.set_default_dtype(dtype)
        try:
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=128 if control else 64, out_channels=64, num_layers=args.layers,
                num_single_layers=args.single_layers, attention_head_dim=128, num_attention_heads=args.heads,
                joint_attention_dim=args.text_width, pooled_projection_dim=args.pooled_width, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
            if shared is None:
                tok, tok2 = clip_tokenizer(), t5_tokenizer()
                clip, t5 = _encoders(tok, tok2, args.text_width, args.pooled_width)
                vae = _vae()
        finally:
            torch.set_default_dtype(previous)
    if shared is not None:
        tok, tok2, clip, t5, vae = (shared.tokenizer, shared.tokenizer_2, shared.text_encoder,
                                    shared.text_encoder_2, shared.vae)
    cls = FluxControlPipeline if control else FluxPipeline
    pipe = cls(transformer=transformer.to(device, dtype), scheduler=scheduler(), vae=vae.to(device, dtype),
               text_encoder=clip.to(device, dtype), tokenizer=tok, text_encoder_2=t5.to(device, dtype),
               tokenizer_2=tok2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_random_lora(transformer: Any, path: Path, rank: int, seed: int) -> str:
    """A rank-`rank` LoRA on every attention projection, in diffusers' keys; returns its file name."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in transformer.named_modules():
        if not name.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")):
            continue
        base = getattr(module, "base_layer", module)
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, base.in_features, generator=gen) * 0.01
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(base.out_features, rank, generator=gen) * 0.01
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(path))
    return path.name


def report(results: Path, write: Path | None) -> None:
    """Render a results file as a markdown section (figures, ratios, and the published figures on an H100)."""
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    value = {(r["stage"], r["name"]): r["value"] for r in rows}
    device = value.get(("setup", "device"), "?")
    setup = next((r["note"] for r in rows if r["name"] == "device"), "")
    lines = [f"## GPU check on {device} ({datetime.date.today().isoformat()})", "",
             "Command: `bench/gpu_check.sh` (stages bf16, switch, compile, fp8, lora in one process); "
             f"{setup}. Random weights: the step cache's hit rate says nothing about real images, "
             "so its figures are times only.", "",
             "| stage | figure | value | unit | note |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["stage"] != "setup":
            note = str(r["note"]).replace("|", "/")
            lines.append(f"| {r['stage']} | {r['name']} | {r['value']} | {r['unit']} | {note} |")
    base = value.get(("bf16", "bf16"))
    if isinstance(base, (int, float)):
        lines += ["", "Ratios to eager bf16 in the same run:", ""]
        for key in (("bf16", "bf16 + first block cache"), ("compile", "compile"),
                    ("compile", "compile + first block cache"), ("fp8", "compile + fp8"),
                    ("fp8", "compile + fp8 + first block cache"), ("lora", "compile + empty slots")):
            if isinstance(value.get(key), (int, float)):
                lines.append(f"- {key[1]}: {value[key]} s/image, {base / value[key]:.2f}x faster")
    if "H100" in str(device):
        lines += ["", "Published H100 figures for FLUX.1-dev at 1024x1024, 28 steps: bf16 6.7 s, compile 4.3-4.5 s,"
                  " lora-fast (FA3 + FP8 + compile) 3.55 s, First Block Cache 0.35 about 1.9 s."]
    else:
        lines += ["", "This run was not on an H100, so the published H100 figures are not compared; "
                  "the bf16 row above is this GPU's own baseline."]
    emit(lines, write)
