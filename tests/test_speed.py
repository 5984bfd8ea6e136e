"""The node's speed options on the tiny models, on the CPU: compile, step cache, LoRA slots, parking, batching.

These run the real diffusers pipelines through PipelineCache and Generator, as a JOB does.
FP8 needs a CUDA GPU of compute capability 8.9+; its run is tested in tests/test_gpu.py and
measured by bench/gpu_check.sh. Here only its refusal at start is tested.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from genserve.spec import GenerationParams, LoraRef, lora_set_key
from gpu_node.catalog import resolve_model_paths
from gpu_node.config import SpeedError, SpeedOptions
from gpu_node.errors import JobError
from gpu_node.generate import Generator, Job
from gpu_node.lora_slots import ADAPTER, DoesNotFit, LoraSlots, LoraWeights
from gpu_node.loras import LoraLibrary
from gpu_node.memory import GIB, plan
from gpu_node.pipeline_cache import PipelineCache, module_bytes
from gpu_node.speed import check_device, compiled_graphs, full_passes, prepare

CAT, WATERCOLOR = "cute_cat_lora.safetensors", "styles/watercolor.safetensors"


def make(tiny: Path, options: SpeedOptions, only: tuple[str, ...] = ("flux1-dev",), budget: int = 1 << 34,
         host: int = 0) -> Generator:
    """A generator over the tiny models with `options` applied to every pipeline it loads."""
    cache = PipelineCache(resolve_model_paths(tiny, {}, "cpu", only), "cpu", torch.float32, budget, host,
                          lambda pipe: prepare(pipe, options))
    return Generator(cache, LoraLibrary(tiny / "loras"), max_sequence_length=32, speed=options)


def job(width: int = 64, height: int = 64, loras: tuple[tuple[str, float], ...] = (), speed: str | None = None,
        seed: int = 3, steps: int = 3, prompt: str = "a cat", model: str = "flux1-dev") -> Job:
    params = GenerationParams(prompt=prompt, width=width, height=height, num_inference_steps=steps, seed=seed,
                              cfg=3.5, strength=1.0, loras=[LoraRef(n, w) for n, w in loras], speed=speed)
    mode = "text2img" if model == "flux1-dev" else "controlnet"
    images = {}
    if mode == "controlnet":
        buf = io.BytesIO()
        Image.new("RGB", (width, height), (90, 90, 90)).save(buf, format="PNG")
        images["control_image"] = buf.getvalue()
    return Job("t", model, mode, params, images)


def pixels(result: tuple[bytes, object]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result[0])), dtype=np.int16)


def run(generator: Generator, j: Job) -> tuple[bytes, object]:
    return generator.run(j, lambda *_: None, lambda: False)


def room_for_one(tiny: Path) -> int:
    """A device budget that holds the shared encoders and VAE plus either transformer, never both."""
    probe = make(tiny, SpeedOptions(), ("flux1-dev", "flux1-depth-dev"))
    sizes = [module_bytes(probe.cache.base(m).transformer) for m in ("flux1-dev", "flux1-depth-dev")]
    return probe.cache.used_bytes - min(sizes)


@pytest.fixture(scope="module")
def eager(tiny_models: Path) -> Generator:
    return make(tiny_models, SpeedOptions())


@pytest.fixture(scope="module")
def compiled(tiny_models: Path) -> Iterator[Generator]:
    """Compiled with inductor on the CPU, with LoRA slots of rank 8 (the sample LoRAs have rank 4)."""
    generator = make(tiny_models, SpeedOptions(compile=True, lora_rank=8))
    yield generator
    torch._dynamo.reset()


def test_compiled_output_matches_eager_and_nothing_recompiles(eager: Generator, compiled: Generator) -> None:
    first = run(compiled, job())
    graphs = compiled_graphs()
    assert graphs > 0
    cases = [job(), job(48, 32), job(32, 80, seed=9), job(loras=((CAT, 0.8),)),
             job(loras=((CAT, 0.8), (WATERCOLOR, 0.5))), job(48, 32, loras=((WATERCOLOR, 1.2),)),
             job(speed="fast"), job(speed="quality"), job()]
    for case in cases:
        got, want = run(compiled, case), run(eager, case)
        assert np.abs(pixels(got) - pixels(want)).max() <= 1, case.params
    assert compiled_graphs() == graphs, "a size, LoRA set or cache change recompiled a block"
    assert pixels(run(compiled, job())).tolist() == pixels(first).tolist()  # deterministic per seed


def test_a_warm_up_with_batching_leaves_nothing_to_compile_for_a_batched_call(compiled: Generator) -> None:
    before = compiled_graphs()
    compiled.warm(["flux1-dev"], ((32, 32),), batch=4)
    assert compiled_graphs() > before, "the first call of two images did not compile during the warm-up"
    graphs = compiled_graphs()
    images = compiled.run_batch([job(48, 32, seed=s) for s in range(3)], lambda *_: None, lambda: False)
    assert len(images) == 3 and compiled_graphs() == graphs, "a batched call after the warm-up recompiled"


def test_hot_swap_equals_loading_the_loras_and_reports_its_path(tiny_models: Path, eager: Generator) -> None:
    slots = make(tiny_models, SpeedOptions(lora_rank=8))
    plain = pixels(run(eager, job()))
    for loras in [((CAT, 0.8),), ((CAT, 0.8), (WATERCOLOR, 0.5)), ((WATERCOLOR, -1.0),), ()]:
        got, want = run(slots, job(loras=loras)), run(eager, job(loras=loras))
        assert np.abs(pixels(got) - pixels(want)).max() <= 1
        assert got[1].lora_load == ("hotswap" if loras else None) and want[1].lora_load == ("reload" if loras else None)
        # What the node reports for LoRA affinity: the set now resident, as the broker keys tasks.
        assert slots.lora_sets == ({"flux1-dev": lora_set_key(job(loras=loras).params.loras)} if loras else {})
        assert eager.lora_sets == {}  # without slots nothing stays resident
        if loras:
            assert np.abs(pixels(got) - plain).max() > 10, "the LoRA changed nothing: the test would prove nothing"
    assert pixels(run(slots, job())).tolist() == plain.tolist(), "a previous set leaked into a job without LoRAs"


def test_a_set_over_the_slot_rank_falls_back_and_leaves_the_slot_usable(tiny_models: Path, eager: Generator) -> None:
    small = make(tiny_models, SpeedOptions(lora_rank=4))  # one rank-4 LoRA fits, two do not
    pipe = small.cache.base("flux1-dev")
    both = ((CAT, 0.8), (WATERCOLOR, 0.5))
    got = run(small, job(loras=both))
    assert got[1].lora_load == "reload" and got[1].lora_seconds is not None
    assert small.lora_sets == {}  # loaded beside the slots and removed: nothing stays
    assert np.abs(pixels(got) - pixels(run(eager, job(loras=both)))).max() <= 1
    assert pipe.get_list_adapters() == {"transformer": [ADAPTER]}, "the fallback's adapters were left behind"
    one = run(small, job(loras=((CAT, 0.8),)))
    assert one[1].lora_load == "hotswap" and small.lora_sets == {"flux1-dev": f'[["{CAT}",0.8]]'}
    assert np.abs(pixels(one) - pixels(run(eager, job(loras=((CAT, 0.8),))))).max() <= 1


def test_packing_concatenates_ranks_and_folds_each_scale_into_b(tiny_models: Path) -> None:
    generator = make(tiny_models, SpeedOptions(lora_rank=6))
    slots: LoraSlots = generator.cache.base("flux1-dev").transformer._genserve_slots
    layer = "transformer_blocks.0.attn.to_q"
    base = slots.layers[layer].base_layer
    gen = torch.Generator().manual_seed(0)
    a1, b1 = torch.randn(2, base.in_features, generator=gen), torch.randn(base.out_features, 2, generator=gen)
    a2, b2 = torch.randn(3, base.in_features, generator=gen), torch.randn(base.out_features, 3, generator=gen)
    first = LoraWeights({f"transformer.{layer}.lora_A.weight": a1, f"transformer.{layer}.lora_B.weight": b1},
                        {f"transformer.{layer}.alpha": 4.0}, 0.5)
    second = LoraWeights({f"transformer.{layer}.lora_A.weight": a2, f"transformer.{layer}.lora_B.weight": b2}, {}, 2.0)
    a, b = slots.pack([first, second])[layer]
    want = 0.5 * (4.0 / 2) * b1 @ a1 + 2.0 * b2 @ a2
    assert torch.allclose(b @ a, want, atol=1e-5)
    with pytest.raises(DoesNotFit, match="over the slot"):
        slots.pack([first, second, first])  # ranks 2 + 3 + 2 > 6
    with pytest.raises(DoesNotFit, match="only the transformer"):
        slots.pack([LoraWeights({"text_encoder.x.lora_A.weight": a1}, {}, 1.0)])
    with pytest.raises(DoesNotFit, match="do not pair"):
        slots.pack([LoraWeights({f"transformer.{layer}.lora_A.weight": a1}, {}, 1.0)])
    wrong = LoraWeights({f"transformer.{layer}.lora_A.weight": torch.zeros(2, 7),
                         f"transformer.{layer}.lora_B.weight": torch.zeros(base.out_features, 2)}, {}, 1.0)
    with pytest.raises(DoesNotFit, match="does not fit"):
        slots.pack([wrong])


def test_the_step_cache_skips_passes_per_request_and_the_metadata_says_so(tiny_models: Path) -> None:
    generator = make(tiny_models, SpeedOptions(cache_threshold=5.0))  # so high that every pass after the first skips
    with full_passes(generator.cache.base("flux1-dev").transformer) as calls:
        quality = run(generator, job(steps=6))
        assert calls[0] == 6 and quality[1].speed == "quality"  # the node's default cache is "none"
        calls[0] = 0
        fast = run(generator, job(steps=6, speed="fast"))
        assert calls[0] == 1 and fast[1].speed == "fast"
        assert pixels(fast).tolist() != pixels(quality).tolist()
        calls[0] = 0
        again = run(generator, job(steps=6, speed="quality"))
        assert calls[0] == 6 and pixels(again).tolist() == pixels(quality).tolist(), "the cache leaked to the next job"
    by_default = make(tiny_models, SpeedOptions(cache="first_block", cache_threshold=5.0))
    assert run(by_default, job(steps=6))[1].speed == "fast"


def test_a_parked_model_comes_back_from_host_memory_not_from_disk(tiny_models: Path) -> None:
    generator = make(tiny_models, SpeedOptions(), ("flux1-dev", "flux1-depth-dev"),
                     budget=room_for_one(tiny_models), host=1 << 30)
    cache = generator.cache
    before = pixels(run(generator, job()))
    run(generator, job(model="flux1-depth-dev"))
    assert cache.parked == ("flux1-dev",) and cache.loads == 2
    assert cache.used_bytes <= cache.budget
    after = pixels(run(generator, job()))
    assert cache.parked == ("flux1-depth-dev",) and cache.loads == 2 and cache.restores == 1
    assert after.tolist() == before.tolist()
    run(generator, job(model="flux1-depth-dev"))
    assert cache.loads == 2 and cache.restores == 2


def test_without_host_memory_the_model_is_evicted_and_reloaded(tiny_models: Path) -> None:
    generator = make(tiny_models, SpeedOptions(), ("flux1-dev", "flux1-depth-dev"),
                     budget=room_for_one(tiny_models), host=0)
    run(generator, job())
    run(generator, job(model="flux1-depth-dev"))
    run(generator, job())
    assert generator.cache.parked == () and generator.cache.loads == 3 and generator.cache.evictions == 2


def test_a_parked_model_gets_empty_lora_slots_back(tiny_models: Path) -> None:
    generator = make(tiny_models, SpeedOptions(lora_rank=8), ("flux1-dev", "flux1-depth-dev"),
                     budget=room_for_one(tiny_models), host=1 << 30)
    plain = pixels(run(generator, job()))
    run(generator, job(loras=((CAT, 1.0),)))
    assert generator.lora_sets == {"flux1-dev": lora_set_key([LoraRef(CAT, 1.0)])}
    run(generator, job(model="flux1-depth-dev"))
    assert generator.lora_sets == {}  # flux1-dev is parked: nothing of it is resident to prefer
    assert pixels(run(generator, job())).tolist() == plain.tolist()
    assert generator.lora_sets == {}  # back with empty slots, and it says so


def test_residency_plan() -> None:
    r = plan(80 * 10**9, 9 * GIB, 22 * GIB, 3 * GIB, 96 * GIB)
    assert (r.on_device, r.parked) == (2, 3)
    assert plan(141 * 10**9, 9 * GIB, 22 * GIB, 3 * GIB, 0).on_device == 5  # all five transformers
    assert plan(20 * GIB, 9 * GIB, 22 * GIB, 3 * GIB, 30 * GIB).on_device == 0


def test_batched_jobs_match_single_jobs_and_mixed_ones_are_refused(eager: Generator) -> None:
    jobs = [job(prompt="a cat", seed=1), job(prompt="a dog", seed=2)]
    together = eager.run_batch(jobs, lambda *_: None, lambda: False)
    for one, both in zip(jobs, together):
        assert np.abs(pixels(run(eager, one)) - pixels(both)).max() <= 2
    assert pixels(together[0]).tolist() != pixels(together[1]).tolist()
    assert Generator.batch_key(jobs[0]) == Generator.batch_key(jobs[1])
    with pytest.raises(JobError, match="only text2img jobs"):
        eager.run_batch([job(), job(width=48)], lambda *_: None, lambda: False)


def test_fp8_is_refused_at_start_without_a_float8_gpu() -> None:
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this machine has a float8 GPU: tests/test_gpu.py runs FP8 there")
    with pytest.raises(SpeedError, match="fp8 needs"):
        check_device(SpeedOptions(quantize="fp8"), "cpu")
    check_device(SpeedOptions(), "cpu")


@pytest.mark.parametrize("kwargs, message", [({"quantize": "int4"}, "--quantize"), ({"cache": "magic"}, "--cache"),
                                             ({"cache_threshold": float("nan")}, "threshold"),
                                             ({"cache_threshold": 0}, "threshold"), ({"lora_rank": -1}, "rank")])
def test_bad_speed_options_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(SpeedError, match=message):
        SpeedOptions(**kwargs)


def test_a_cancelled_fast_job_leaves_no_cache_state_to_the_next(tiny_models: Path) -> None:
    from gpu_node.errors import Cancelled

    generator = make(tiny_models, SpeedOptions(cache="first_block", cache_threshold=0.5))
    stops = iter([False, True])
    with pytest.raises(Cancelled):
        generator.run(job(32, 48, steps=4), lambda *_: None, lambda: next(stops, True))
    clean = make(tiny_models, SpeedOptions(cache="first_block", cache_threshold=0.5))
    want = pixels(run(clean, job(64, 64, steps=4)))
    assert pixels(run(generator, job(64, 64, steps=4))).tolist() == want.tolist()


def test_a_set_that_does_not_fit_a_compiled_model_runs_eagerly_without_recompiling(
        compiled: Generator, eager: Generator) -> None:
    run(compiled, job())  # compiled (or already, by the test above)
    graphs = compiled_graphs()
    three = ((CAT, 0.8), (WATERCOLOR, 0.5), (CAT, 0.3))  # ranks 4 + 4 + 4 > the slots' 8
    got = run(compiled, job(loras=three))
    assert got[1].lora_load == "reload"
    assert np.abs(pixels(got) - pixels(run(eager, job(loras=three)))).max() <= 1
    assert run(compiled, job(speed="fast"))[1].speed == "fast"  # compiled blocks and the cache are back
    assert compiled_graphs() == graphs


def test_the_host_tier_is_least_recently_used_first(tiny_models: Path) -> None:
    sizes = make(tiny_models, SpeedOptions(), ("flux1-dev",)).cache
    one = module_bytes(sizes.base("flux1-dev").transformer)
    models = ("flux1-dev", "flux1-depth-dev", "flux1-canny-dev")
    generator = make(tiny_models, SpeedOptions(), models, budget=room_for_one(tiny_models), host=int(one * 1.5))
    for model in models:
        run(generator, job(model=model))
    cache = generator.cache
    assert cache.parked == ("flux1-depth-dev",) and "flux1-dev" not in cache.loaded  # dev left for depth
    assert cache.host_bytes <= cache.host_budget


def test_a_lora_file_replaced_on_disk_is_read_again(tiny_models: Path, tmp_path: Path) -> None:
    import os
    import shutil

    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(tiny_models / "loras" / CAT, folder / "mine.safetensors")
    library = LoraLibrary(folder)
    first = library.state_dict("mine")
    shutil.copy(tiny_models / "loras" / WATERCOLOR, folder / "mine.safetensors")
    os.utime(folder / "mine.safetensors", ns=(1, 1))
    assert library.state_dict("mine") is not first and library.disk_reads == 2


def test_round_robin_over_more_models_than_the_device_holds_never_reads_the_disk_again(tiny_models: Path) -> None:
    models = ("flux1-dev", "flux1-depth-dev", "flux1-canny-dev", "flux1-openpose-dev")
    probe = make(tiny_models, SpeedOptions(), ("flux1-depth-dev",)).cache
    biggest = module_bytes(probe.base("flux1-depth-dev").transformer)
    generator = make(tiny_models, SpeedOptions(), models, budget=room_for_one(tiny_models), host=3 * biggest)
    for _ in range(3):
        for model in models:
            run(generator, job(model=model))
    cache = generator.cache
    assert cache.loads == 4 and cache.evictions == 0 and len(cache.parked) == 3
    assert cache.host_bytes <= cache.host_budget


def test_warm_up_runs_text2img_models_at_each_size_and_skips_the_others(tiny_models: Path) -> None:
    generator = make(tiny_models, SpeedOptions(), ("flux1-dev", "flux1-depth-dev"))
    assert generator.warm(["flux1-dev", "flux1-depth-dev"], ((32, 32), (48, 16))) > 0
    assert generator.cache.loaded == ("flux1-dev",)  # the depth model serves controlnet only: not warmed
    calls: list[list[tuple[int, int]]] = []
    real = generator.run_batch
    generator.run_batch = lambda jobs, *rest: calls.append([(j.params.width, j.params.height) for j in jobs]) \
        or real(jobs, *rest)
    generator.warm(["flux1-dev"], ((64, 64), (48, 96)), batch=4, batch_pixels=40 * 40)
    assert calls == [[(32, 32), (32, 32)]]  # one call of two; the smaller size (64x64) is over 40x40: 32x32


def test_regional_compilation_compiles_each_kind_of_block_once() -> None:
    """Two double and three single blocks make two graphs per batch class, whatever strides they hand on.

    A single block returns its text part as a slice of the joint sequence; without the restated
    strides, the second single block fails the first graph's stride guard and compiles again (a
    third graph, minutes with FP8 on a GPU). Run in inference mode, as the generator runs.
    """
    from diffusers import FluxTransformer2DModel

    from gpu_node.speed import compile_blocks

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=2,
                                   num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
                                   joint_attention_dim=24, pooled_projection_dim=8, guidance_embeds=True,
                                   axes_dims_rope=(4, 4, 8)).requires_grad_(False)

    def forward(batch: int, tokens: int) -> None:
        with torch.inference_mode():
            model(hidden_states=torch.randn(batch, tokens, 16), encoder_hidden_states=torch.randn(batch, 6, 24),
                  pooled_projections=torch.randn(batch, 8), timestep=torch.full((batch,), 0.5),
                  img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(6, 3), guidance=torch.full((batch,), 3.5))

    torch._dynamo.reset()
    try:
        assert compile_blocks(model, backend="eager") == 5
        before = compiled_graphs()
        forward(1, 16)
        forward(1, 24)
        assert compiled_graphs() - before == 2
        forward(2, 16)  # dynamo specializes a batch of one, so a batch of two compiles each kind once more
        forward(3, 24)
        assert compiled_graphs() - before == 4
    finally:
        torch._dynamo.reset()


def test_only_tensors_with_other_strides_are_copied() -> None:
    from gpu_node.speed import _dense

    joint = torch.arange(2 * 10 * 4.0).reshape(1, 20, 4)
    text = joint[:, :6]  # is_contiguous() says yes: the size-1 batch's stride is ignored
    assert text.is_contiguous() and text.stride() == (80, 4, 1)
    same = _dense(text)
    assert same.stride() == (24, 4, 1) and torch.equal(same, text) and same._base is None
    assert same.data_ptr() == text.data_ptr(), "a size-1 dimension's stride needed no copy"
    image = _dense(joint[:, 6:])
    assert torch.equal(image, joint[:, 6:]) and image.stride() == (56, 4, 1)
    assert image.data_ptr() == joint[:, 6:].data_ptr(), "an offset slice needed no copy either"
    dense = torch.zeros(2, 3, 4)
    assert _dense(dense) is dense and _dense(None) is None and _dense(7) == 7
    transposed = _dense(dense.transpose(1, 2))
    assert transposed.stride() == (12, 3, 1) and transposed.data_ptr() != dense.data_ptr()
    view = dense.view(6, 4)
    assert _dense(view)._base is None and _dense(view).data_ptr() == dense.data_ptr()
