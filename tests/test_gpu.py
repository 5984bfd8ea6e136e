"""The node's generation path on a CUDA device in bf16 (skipped where there is none).

Runs on a lent GPU machine with `pytest -m gpu`; on CPU-only machines (this project's CI)
every test here is skipped with that reason, never counted as passed.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from gpu_node.catalog import resolve_model_paths
from gpu_node.generate import Generator, Job
from gpu_node.loras import LoraLibrary
from gpu_node.pipeline_cache import PipelineCache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device on this machine")]


def test_text2img_in_bf16_on_cuda_is_deterministic_per_seed(tiny_models: Path) -> None:
    cache = PipelineCache(resolve_model_paths(tiny_models, {}, "cuda:0"), "cuda:0", torch.bfloat16, 1 << 34)
    generator = Generator(cache, LoraLibrary(tiny_models / "loras", 1 << 28), max_sequence_length=32)
    params = {"prompt": "gpu", "width": 128, "height": 128, "num_inference_steps": 4, "seed": 3, "cfg": 3.5,
              "strength": 0.8, "controlnet_type": None, "loras": [{"name": "cute_cat_lora.safetensors",
                                                                   "weight": 0.8}]}
    outputs = [generator.run(Job(f"t{i}", "flux1-dev", "text2img", dict(params)), lambda *_: None,
                             lambda: False) for i in range(2)]
    (png_a, meta), (png_b, _) = outputs
    assert png_a == png_b and meta["device"].startswith("cuda")
    assert Image.open(io.BytesIO(png_a)).size == (128, 128)
    assert next(cache.base("flux1-dev").transformer.parameters()).dtype == torch.bfloat16
