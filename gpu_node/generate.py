"""One generation job, in the diffusers step order: validate, prepare, run, encode."""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from PIL import Image

from genserve.catalog import CONTROL_TYPES, MODEL_MODES, REQUIRED_IMAGES
from genserve.spec import GenerationParams, batch_key
from genserve.wire import ResultMeta
from gpu_node.errors import Cancelled, JobError
from gpu_node.loras import LoraLibrary, LoraUse
from gpu_node.pipeline_cache import PipelineCache
from gpu_node.speed import SpeedOptions, set_cache

log = logging.getLogger(__name__)

MAX_DECODE_PIXELS = 4096 * 4096  # the front refuses larger inputs; this guards direct broker clients


@dataclass
class Job:
    """A JOB message as the worker sees it: parameters plus raw input images."""

    task_id: str
    model_id: str
    mode: str
    params: GenerationParams
    images: dict[str, bytes] = field(default_factory=dict)


def decode_image(data: bytes, name: str, mode: str = "RGB") -> Image.Image:
    """Decode PNG/JPEG/WebP bytes (already size-checked by the front)."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_DECODE_PIXELS:
            raise JobError(f"{name} is too large to decode")
        return image.convert(mode)
    except (OSError, Image.DecompressionBombError) as exc:
        raise JobError(f"{name} is not a decodable image: {exc}") from exc


def encode_png(image: Image.Image, level: int) -> bytes:
    """PNG bytes at a chosen zlib level (level 1 is ~2x faster than the default 6)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def encode_image(image: Image.Image, fmt: str, quality: int, png_level: int) -> bytes:
    """The result in its requested format: PNG (lossless, zlib `png_level`), JPEG or WebP at `quality`."""
    if fmt == "png":
        return encode_png(image, png_level)
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=False)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise JobError(f"unknown output format {fmt!r}")
    return buf.getvalue()


class Generator:
    """Runs jobs on one device through the pipeline cache."""

    def __init__(self, cache: PipelineCache, loras: LoraLibrary, png_level: int = 1,
                 max_sequence_length: int = 512, speed: SpeedOptions | None = None) -> None:
        self.cache = cache
        self.loras = loras
        self.png_level = png_level
        self.max_sequence_length = max_sequence_length
        self.speed = speed or SpeedOptions()
        # Model -> LoRA set its slots hold after the last job (replaced whole: the socket thread reads it).
        self.lora_sets: dict[str, str] = {}

    def fast(self, params: GenerationParams) -> bool:
        """Whether the step cache runs for these parameters (the request's choice, else the node's)."""
        if params.speed is not None:
            return params.speed == "fast"
        return self.speed.cache != "none"

    def run(self, job: Job, on_step: Callable[[int, int], None],
            should_stop: Callable[[], bool]) -> tuple[bytes, ResultMeta]:
        """Generate one image; returns (image bytes, metadata)."""
        return self.render(job, on_step, should_stop)()

    def render(self, job: Job, on_step: Callable[[int, int], None],
               should_stop: Callable[[], bool]) -> Callable[[], tuple[bytes, ResultMeta]]:
        """Run the pipeline for one job; returns what encodes its image (the node calls it on another thread)."""
        return self.render_batch([job], on_step, should_stop)[0]

    @staticmethod
    def batch_key(job: Job) -> str | None:
        """Jobs with equal keys may share one pipeline call (genserve.spec.batch_key); None: never."""
        return batch_key(job.model_id, job.mode, job.params, bool(job.images))

    def run_batch(self, jobs: list[Job], on_step: Callable[[int, int], None],
                  should_stop: Callable[[], bool]) -> list[tuple[bytes, ResultMeta]]:
        """Generate one image per job in one pipeline call; returns (image bytes, metadata) per job."""
        return [encode() for encode in self.render_batch(jobs, on_step, should_stop)]

    def render_batch(self, jobs: list[Job], on_step: Callable[[int, int], None],
                     should_stop: Callable[[], bool]) -> list[Callable[[], tuple[bytes, ResultMeta]]]:
        """One pipeline call for all jobs; returns, per job, what encodes its image and makes its metadata."""
        started = time.perf_counter()
        if len(jobs) > 1 and (None in (keys := {self.batch_key(j) for j in jobs}) or len(keys) > 1):
            raise JobError("only text2img jobs with equal model, size, steps, cfg, speed and LoRAs run together")
        every = [self._validate(job) for job in jobs]
        args = every[0]
        pipe, kwargs = self._prepare(jobs[0], args)
        if len(jobs) > 1:
            kwargs["prompt"] = [a["prompt"] for a in every]
            kwargs["generator"] = [torch.Generator(device="cpu").manual_seed(a["seed"]) for a in every]

        def callback(pipeline: Any, step: int, _timestep: Any, tensors: dict) -> dict:
            on_step(step + 1, int(getattr(pipeline, "_num_timesteps", args["steps"])))
            if should_stop():
                raise Cancelled(jobs[0].task_id)
            return tensors

        kwargs["callback_on_step_end"] = callback
        fast = self.fast(jobs[0].params)
        transformer = pipe.transformer
        try:
            with torch.inference_mode(), self.loras.applied(pipe, args["loras"]) as lora:
                set_cache(transformer, fast, self.speed.cache_threshold)  # after the LoRAs: a fallback swaps blocks
                try:
                    images = pipe(**kwargs).images
                finally:
                    # diffusers clears the cache's state only after a call that completes; a cancelled or
                    # failed one would leave the previous image's residuals to the next job.
                    if getattr(transformer, "_genserve_cache", None) is not None:
                        transformer._reset_stateful_cache()
        finally:
            self.lora_sets = self.cache.lora_sets()  # loads, evictions and LoRA changes of this job
        return [partial(self._encode, job, a, image, kwargs, fast, lora, started, len(jobs))
                for job, a, image in zip(jobs, every, images)]

    def _encode(self, job: Job, args: dict[str, Any], image: Image.Image, kwargs: dict[str, Any], fast: bool,
                lora: LoraUse, started: float, batch: int = 1) -> tuple[bytes, ResultMeta]:
        p = job.params
        data = encode_image(image, p.output_format, p.output_quality, self.png_level)
        loaded = lora.path != "none"
        meta = ResultMeta(generation_time=round(time.perf_counter() - started, 4), width=image.width,
                          height=image.height, seed=args["seed"], steps=args["steps"], device=self.cache.device,
                          cfg=kwargs.get("guidance_scale"), format=p.output_format,
                          speed="fast" if fast else "quality", lora_load=lora.path if loaded else None,
                          lora_seconds=round(lora.seconds, 4) if loaded else None, batch=batch if batch > 1 else None)
        return data, meta

    def warm(self, model_ids: list[str], sizes: tuple[tuple[int, int], ...], batch: int = 1,
             batch_pixels: int = 0) -> float:
        """Run two steps per model and size so that compilation happens before the first request;
        with `batch` > 1, also one call of two images (at the smallest size, within `batch_pixels`)."""
        started = time.perf_counter()
        for model_id in model_ids:
            if model_id not in MODEL_MODES or "text2img" not in MODEL_MODES[model_id]:
                continue
            def job(width: int, height: int) -> Job:
                return Job("warm-up", model_id, "text2img", GenerationParams(
                    prompt="warm-up", width=width, height=height, num_inference_steps=2, seed=0, cfg=3.5, strength=1.0))

            for width, height in sizes:
                self.run(job(width, height), lambda *_: None, lambda: False)
            if batch > 1 and sizes:
                # Dynamo specializes a dimension of size 1, so the first call of two images compiles the blocks
                # again (once: three or more reuse it); that must not fall on a request. The blocks take any
                # size without compiling again, so the call uses one that batches for real.
                width, height = min(sizes, key=lambda size: size[0] * size[1])
                if 0 < batch_pixels < width * height:
                    width = height = max(16, math.isqrt(batch_pixels) // 16 * 16)
                self.run_batch([job(width, height)] * 2, lambda *_: None, lambda: False)
        return time.perf_counter() - started

    def _validate(self, job: Job) -> dict[str, Any]:
        """The front validated the request; here only what the pipeline call itself needs."""
        p = job.params
        if job.mode not in MODEL_MODES.get(job.model_id, ()):
            raise JobError(f"{job.model_id} does not support mode {job.mode}")
        if job.mode == "controlnet" and p.controlnet_type and p.controlnet_type != CONTROL_TYPES[job.model_id]:
            raise JobError(f"{job.model_id} is a {CONTROL_TYPES[job.model_id]} model, not {p.controlnet_type}")
        width, height = p.width, p.height
        if width % 16 or height % 16 or not (16 <= width <= 2048 and 16 <= height <= 2048):
            raise JobError("width and height must be multiples of 16 in 16..2048")
        missing = [n for n in REQUIRED_IMAGES[job.mode] if n not in job.images]
        if missing:
            raise JobError(f"mode {job.mode} needs {', '.join(missing)}")
        images = {name: decode_image(data, name, "L" if name == "mask_image" else "RGB")
                  for name, data in job.images.items()}
        # Inputs are resized to the output size (the guide sends 1x1 images).
        images = {n: im if im.size == (width, height) else im.resize((width, height), Image.LANCZOS)
                  for n, im in images.items()}
        return {"width": width, "height": height, "steps": p.num_inference_steps, "seed": p.seed, "cfg": p.cfg,
                "prompt": p.prompt, "strength": p.strength, "images": images, "loras": list(p.loras)}

    def _prepare(self, job: Job, a: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        images = a["images"]
        kwargs: dict[str, Any] = {
            "height": a["height"], "width": a["width"], "num_inference_steps": a["steps"],
            "generator": torch.Generator(device="cpu").manual_seed(a["seed"]),
            "guidance_scale": a["cfg"],
        }
        text = {"prompt": a["prompt"], "max_sequence_length": self.max_sequence_length}
        if job.model_id == "flux1-fill-dev":
            pipe = self.cache.base(job.model_id)
            full = Image.new("L", (a["width"], a["height"]), 255)
            blank = Image.new("RGB", (a["width"], a["height"]), 0)
            kwargs.update(text, image=images.get("input_image", blank),
                          mask_image=images.get("mask_image", full))
            if job.mode == "img2img":
                kwargs["strength"] = a["strength"]
            return pipe, kwargs
        if job.mode == "text2img":
            return self.cache.base(job.model_id), {**kwargs, **text}
        if job.mode == "img2img":
            pipe = self.cache.variant(job.model_id, "FluxImg2ImgPipeline")
            return pipe, {**kwargs, **text, "image": images["input_image"], "strength": a["strength"]}
        if job.mode == "controlnet":
            pipe = self.cache.base(job.model_id)
            return pipe, {**kwargs, **text, "control_image": images["control_image"]}
        if job.mode == "redux":
            prior, base = self.cache.redux()
            with torch.inference_mode():
                embeds = prior(image=images["input_image"], prompt=a["prompt"])
            return base, {**kwargs, "prompt_embeds": embeds.prompt_embeds,
                          "pooled_prompt_embeds": embeds.pooled_prompt_embeds}
        raise JobError(f"unknown mode {job.mode}")
