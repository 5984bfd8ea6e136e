"""The node's pipeline cache on real tiny pipelines: sharing, zero-copy variants, LRU eviction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpu_node.catalog import resolve_model_paths
from gpu_node.pipeline_cache import PipelineCache, module_bytes


def make(tiny_models: Path, budget: int = 1 << 40) -> PipelineCache:
    return PipelineCache(resolve_model_paths(tiny_models, {}, "cpu"), "cpu", torch.float32, budget)


def test_img2img_is_a_zero_copy_view_of_text2img(tiny_models: Path) -> None:
    cache = make(tiny_models)
    base = cache.base("flux1-dev")
    img2img = cache.variant("flux1-dev", "FluxImg2ImgPipeline")
    assert type(img2img).__name__ == "FluxImg2ImgPipeline"
    assert img2img.transformer is base.transformer and img2img.vae is base.vae
    assert cache.variant("flux1-dev", "FluxImg2ImgPipeline") is img2img
    assert cache.loads == 1


def test_fill_and_control_reuse_the_same_encoder_and_vae_weights(tiny_models: Path) -> None:
    cache = make(tiny_models)
    dev = cache.base("flux1-dev")
    dev_bytes = cache.used_bytes
    fill = cache.base("flux1-fill-dev")
    depth = cache.base("flux1-depth-dev")
    for name in ("text_encoder", "text_encoder_2", "vae"):
        assert getattr(fill, name) is getattr(dev, name) is getattr(depth, name)
    assert fill.transformer is not dev.transformer
    assert cache.used_bytes == dev_bytes + module_bytes(fill.transformer) + module_bytes(depth.transformer)
    prior, base = cache.redux()
    assert base is dev and prior.text_encoder_2 is dev.text_encoder_2


def test_lru_eviction_under_a_budget_keeps_shared_weights(tiny_models: Path) -> None:
    probe = make(tiny_models)
    probe.base("flux1-dev")
    shared_and_dev = probe.used_bytes
    fill_t = module_bytes(probe.base("flux1-fill-dev").transformer)
    budget = shared_and_dev + fill_t + fill_t // 2  # room for dev + fill, not a third transformer
    cache = make(tiny_models, budget)
    dev = cache.base("flux1-dev")
    cache.base("flux1-fill-dev")
    cache.base("flux1-dev")  # touch: fill is now least recently used
    cache.base("flux1-canny-dev")
    assert cache.loaded == ("flux1-dev", "flux1-canny-dev")
    assert cache.used_bytes <= budget
    assert cache.base("flux1-canny-dev").text_encoder is dev.text_encoder  # shared weights stayed
    cache.base("flux1-fill-dev")  # comes back, evicting the LRU (dev) but keeping what canny shares
    assert cache.loaded == ("flux1-canny-dev", "flux1-fill-dev")


def test_a_failed_load_leaves_the_cache_as_it_was(tiny_models: Path, tmp_path: Path) -> None:
    broken = tmp_path / "flux1-canny-dev"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "FluxControlPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}')
    paths = resolve_model_paths(tiny_models, {"FLUX_CANNY_MODEL_PATH": str(broken)}, "cpu")
    cache = PipelineCache(paths, "cpu", torch.float32, 1 << 40)
    cache.base("flux1-dev")
    before = (cache.loaded, cache.used_bytes, cache.loads)
    with pytest.raises(OSError):  # diffusers: the folder lacks the transformer's files
        cache.base("flux1-canny-dev")
    assert (cache.loaded, cache.used_bytes, cache.loads) == before
    with pytest.raises(KeyError):
        make(tmp_path).base("flux1-dev")


def test_gpu_env_lists_restrict_models_per_device(tiny_models: Path) -> None:
    env = {"FLUX_GPUS": "0,1", "FLUX_FILL_GPUS": "1"}
    assert "flux1-fill-dev" not in resolve_model_paths(tiny_models, env, "cuda:0")
    assert "flux1-fill-dev" in resolve_model_paths(tiny_models, env, "cuda:1")
    assert resolve_model_paths(tiny_models, env, "cuda:2") == {}
    assert resolve_model_paths(tiny_models, {"FLUX_MODEL_PATH": "org/FLUX.1-dev"}, "cpu")["flux1-dev"] == "org/FLUX.1-dev"


def test_lora_cache_is_bounded_and_least_recently_used_leaves_first(tiny_models: Path) -> None:
    from gpu_node.loras import LoraLibrary

    probe = LoraLibrary(tiny_models / "loras")
    one = sum(t.numel() * t.element_size() for t in probe.state_dict("cute_cat_lora").values())
    lib = LoraLibrary(tiny_models / "loras", cache_bytes=one + one // 2)  # room for one of the two
    lib.state_dict("cute_cat_lora")
    lib.state_dict("cute_cat_lora.safetensors")  # same file, same entry
    assert lib.disk_reads == 1 and lib.cached == ["cute_cat_lora.safetensors"]
    lib.state_dict("styles/watercolor")
    assert lib.cached == ["styles/watercolor.safetensors"] and lib.disk_reads == 2
    lib.state_dict("cute_cat_lora")
    assert lib.disk_reads == 3
