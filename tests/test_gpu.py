"""The node's generation path on a CUDA device in bf16 (skipped where there is none).

Runs on a lent GPU machine with `pytest -m gpu`; on CPU-only machines (this project's CI)
every test here is skipped with that reason, never counted as passed. The full-size
figures come from bench/gpu_check.sh.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from genserve.spec import GenerationParams, LoraRef
from gpu_node.catalog import resolve_model_paths
from gpu_node.config import SpeedOptions
from gpu_node.generate import Generator, Job
from gpu_node.loras import LoraLibrary
from gpu_node.pipeline_cache import PipelineCache
from gpu_node.speed import compiled_graphs, prepare

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device on this machine")]


def generator(tiny: Path, options: SpeedOptions) -> Generator:
    cache = PipelineCache(resolve_model_paths(tiny, {}, "cuda:0"), "cuda:0", torch.bfloat16, 1 << 34, 0,
                          lambda pipe: prepare(pipe, options))
    return Generator(cache, LoraLibrary(tiny / "loras", 1 << 28), max_sequence_length=32, speed=options)


def job(seed: int = 3, size: int = 128) -> Job:
    params = GenerationParams(prompt="gpu", width=size, height=size, num_inference_steps=4, seed=seed, cfg=3.5,
                              strength=0.8, loras=[LoraRef("cute_cat_lora.safetensors", 0.8)])
    return Job(f"t{seed}", "flux1-dev", "text2img", params)


def test_text2img_in_bf16_on_cuda_is_deterministic_per_seed(tiny_models: Path) -> None:
    g = generator(tiny_models, SpeedOptions())
    (png_a, meta), (png_b, _) = [g.run(job(), lambda *_: None, lambda: False) for _ in range(2)]
    assert png_a == png_b and meta.device.startswith("cuda")
    assert Image.open(io.BytesIO(png_a)).size == (128, 128)
    assert next(g.cache.base("flux1-dev").transformer.parameters()).dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="float8 needs compute capability 8.9+")
def test_fp8_compiled_with_slots_is_deterministic_and_never_recompiles(tiny_models: Path) -> None:
    pytest.importorskip("torchao", reason="torchao is not installed (pip install 'genserve[fp8]')")
    g = generator(tiny_models, SpeedOptions(compile=True, quantize="fp8", lora_rank=8))
    first = g.run(job(), lambda *_: None, lambda: False)
    graphs = compiled_graphs()
    assert g.run(job(), lambda *_: None, lambda: False)[0] == first[0]
    g.run(job(seed=5, size=96), lambda *_: None, lambda: False)
    assert compiled_graphs() == graphs and first[1].lora_load == "hotswap"
