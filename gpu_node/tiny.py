"""Tiny random-weight Flux model folders built with the real diffusers classes.

Every model id GenServe serves gets a folder that `from_pretrained` loads exactly
like a real checkpoint, so the whole request path runs on a CPU in milliseconds
with no download. Weights are random but deterministic for a given seed.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxControlPipeline,
    FluxFillPipeline,
    FluxPipeline,
    FluxPriorReduxPipeline,
    FluxTransformer2DModel,
)
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from genserve.catalog import MODEL_IDS

log = logging.getLogger(__name__)
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()

HIDDEN = 32  # text width = joint_attention_dim = pooled_projection_dim
TRANSFORMER_IN = {"base": 64, "control": 128, "fill": 384}
SAMPLE_LORAS = ("cute_cat_lora.safetensors", "styles/watercolor.safetensors")


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2 table)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = 0
    out = {}
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def clip_tokenizer() -> CLIPTokenizer:
    """A tiny local CLIP tokenizer (no download)."""
    symbols = _byte_symbols()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    for s in symbols:
        vocab.setdefault(s + "</w>", len(vocab))
    merges = [("c", "a"), ("ca", "t</w>"), ("t", "h"), ("th", "e</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer() -> T5TokenizerFast:
    """A tiny local T5 tokenizer (no download)."""
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + c, -3.0) for c in chars]
    pieces += [(c, -4.0) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _text_encoders(vocab_clip: int, vocab_t5: int) -> tuple[CLIPTextModel, T5EncoderModel]:
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_clip, hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=HIDDEN,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab_t5, d_model=HIDDEN, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
            relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )
    )
    return clip, t5


def vae() -> AutoencoderKL:
    """A tiny random-weight Flux VAE."""
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 8, 8], layers_per_block=1, latent_channels=16,
        norm_num_groups=4, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def _transformer(kind: str) -> FluxTransformer2DModel:
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=TRANSFORMER_IN[kind], out_channels=64, num_layers=1,
        num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=HIDDEN, pooled_projection_dim=HIDDEN, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    # The real checkpoints are trained; random init leaves proj_out tiny, so
    # scale it up so that prompts, seeds and LoRAs visibly change the image.
    with torch.no_grad():
        model.proj_out.weight.mul_(20.0)
    return model


def scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Flux's flow-matching scheduler."""
    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
    )


def _redux() -> FluxPriorReduxPipeline:
    vision = SiglipVisionModel(
        SiglipVisionConfig(hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=1,
                           num_attention_heads=4, image_size=32, patch_size=8)
    )
    processor = SiglipImageProcessor(size={"height": 32, "width": 32}, do_resize=True)
    embedder = ReduxImageEncoder(redux_dim=HIDDEN, txt_in_features=HIDDEN)
    # Real Redux folders carry no text encoders: the node lends it flux1-dev's.
    return FluxPriorReduxPipeline(image_encoder=vision, feature_extractor=processor, image_embedder=embedder)


def build_pipeline(model_id: str, seed: int = 0):
    """Build the tiny pipeline for one model id (random weights, deterministic for `seed`).

    As with the real checkpoints, every model shares flux1-dev's text encoders and
    VAE (same weights for the same seed); only the transformer differs per model.
    """
    if model_id == "flux1-redux-dev":
        torch.manual_seed(seed + 1 + MODEL_IDS.index(model_id))
        return _redux()
    torch.manual_seed(seed)
    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    clip, t5 = _text_encoders(len(tok), len(tok2))
    parts = dict(scheduler=scheduler(), vae=vae(), text_encoder=clip, tokenizer=tok,
                 text_encoder_2=t5, tokenizer_2=tok2)
    torch.manual_seed(seed + 1 + MODEL_IDS.index(model_id))
    if model_id == "flux1-dev":
        return FluxPipeline(transformer=_transformer("base"), **parts)
    if model_id == "flux1-fill-dev":
        return FluxFillPipeline(transformer=_transformer("fill"), **parts)
    if model_id in ("flux1-depth-dev", "flux1-canny-dev", "flux1-openpose-dev"):
        return FluxControlPipeline(transformer=_transformer("control"), **parts)
    raise ValueError(f"unknown model id {model_id!r}")


def build_lora(base: FluxPipeline, out: Path, seed: int) -> None:
    """Save a small random LoRA for the base transformer in diffusers format."""
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel.from_config(base.transformer.config)
    transformer.load_state_dict(base.transformer.state_dict())
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out"])
    transformer.add_adapter(config)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    out.parent.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(
        save_directory=str(out.parent), weight_name=out.name,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
    )


def build_all(target: Path, seed: int = 0, model_ids: tuple[str, ...] = MODEL_IDS,
              loras: bool = True) -> list[Path]:
    """Write tiny folders for `model_ids` (and sample LoRAs) under `target`."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for model_id in model_ids:
        folder = target / model_id
        if folder.exists():
            shutil.rmtree(folder)
        pipe = build_pipeline(model_id, seed)
        pipe.save_pretrained(str(folder))
        written.append(folder)
        log.info("built tiny %s in %s", model_id, folder)
    if loras:
        base = build_pipeline("flux1-dev", seed)
        for index, name in enumerate(SAMPLE_LORAS):
            path = target / "loras" / name
            build_lora(base, path, seed + 100 + index)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    """`genserve-build-tiny DIR`: write the tiny demo models (and sample LoRAs) into DIR."""
    import argparse
    import time

    ap = argparse.ArgumentParser(prog="genserve-build-tiny", description=main.__doc__)
    ap.add_argument("directory", type=Path)
    ap.add_argument("--seed", type=int, default=0, help="weights are deterministic for a seed")
    ap.add_argument("--model", dest="model_ids", action="append", choices=MODEL_IDS,
                    help="only these model ids (default: all six)")
    ap.add_argument("--no-loras", action="store_true", help="skip the sample LoRAs")
    a = ap.parse_args(argv)
    started = time.perf_counter()
    written = build_all(a.directory, a.seed, tuple(a.model_ids or MODEL_IDS), loras=not a.no_loras)
    for path in written:
        print(path)
    print(f"built {len(written)} items in {time.perf_counter() - started:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
