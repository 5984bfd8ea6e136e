"""The job a client asked for, as the front validated it: every default filled in.

The front builds a TaskSpec once from a JSON or multipart request; the broker queues it
and the node runs it, trusting it (they check only what needs live state). Images are
not here: they travel as raw frames beside the message, named by `images`.
"""

from __future__ import annotations

import msgspec


class LoraRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One LoRA by its name relative to the LoRA folder (with .safetensors) and its weight."""

    name: str
    weight: float = 1.0


def lora_set_key(loras: list[LoraRef]) -> str:
    """The LoRA set a job puts on its model, as broker and node compare it ("" for none).

    JSON, so that no name (names may hold any character) can make two sets look alike.
    """
    return msgspec.json.encode([[lora.name, lora.weight] for lora in loras]).decode() if loras else ""


class GenerationParams(msgspec.Struct, forbid_unknown_fields=True):
    """What the pipeline call needs; sizes already rounded to a multiple of 16."""

    prompt: str
    width: int
    height: int
    num_inference_steps: int
    seed: int
    cfg: float
    strength: float
    controlnet_type: str | None = None
    loras: list[LoraRef] = []
    output_format: str = "png"  # png, jpeg or webp (genserve.catalog.OUTPUT_FORMATS)
    output_quality: int = 90  # 1-100, for jpeg and webp
    speed: str | None = None  # quality or fast (genserve.catalog.SPEEDS); None: the node's default


class WebhookSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where to POST the task's events, and which ones (genserve.catalog.WEBHOOK_EVENTS)."""

    url: str
    events: list[str]


class TaskSpec(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A validated generation request: model, mode, priority, parameters and an optional webhook."""

    model_id: str
    mode: str
    priority: int
    params: GenerationParams
    webhook: WebhookSpec | None = None


def batch_key(model_id: str, mode: str, params: GenerationParams, has_images: bool) -> str | None:
    """Jobs with equal keys may share one pipeline call (only prompt, seed and output encoding differ).

    None: the job always runs alone (only text2img without input images batches). Broker and node
    compare the same key, so the broker never groups what the node would refuse.
    """
    if mode != "text2img" or has_images:
        return None
    p = params
    return msgspec.json.encode([model_id, p.width, p.height, p.num_inference_steps, p.cfg, p.speed,
                                lora_set_key(p.loras)]).decode()
