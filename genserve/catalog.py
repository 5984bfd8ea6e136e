"""The model catalog: model ids, the modes each serves, control types, images per mode, defaults.

The one table every process consults: the front validates against it, the broker checks
what live nodes serve against it, the node picks pipelines by it.
"""

from __future__ import annotations

from typing import Final

# The six model ids and the modes each checkpoint supports (guide table 4.3).
MODEL_MODES: Final[dict[str, tuple[str, ...]]] = {
    "flux1-dev": ("text2img", "img2img"),
    "flux1-fill-dev": ("text2img", "img2img", "fill"),
    "flux1-depth-dev": ("controlnet",),
    "flux1-canny-dev": ("controlnet",),
    "flux1-openpose-dev": ("controlnet",),
    "flux1-redux-dev": ("redux",),
}
MODEL_IDS: Final[tuple[str, ...]] = tuple(MODEL_MODES)
MODES: Final[tuple[str, ...]] = ("text2img", "img2img", "fill", "controlnet", "redux")
# Control checkpoints and the kind of map each expects.
CONTROL_TYPES: Final[dict[str, str]] = {
    "flux1-depth-dev": "depth",
    "flux1-canny-dev": "canny",
    "flux1-openpose-dev": "openpose",
}
CONTROL_MODELS: Final[dict[str, str]] = {kind: model for model, kind in CONTROL_TYPES.items()}
IMAGE_FIELDS: Final[tuple[str, ...]] = ("input_image", "mask_image", "control_image")
# The images each mode needs; any other image sent with a request is ignored.
REQUIRED_IMAGES: Final[dict[str, tuple[str, ...]]] = {
    "text2img": (),
    "img2img": ("input_image",),
    "fill": ("input_image", "mask_image"),
    "controlnet": ("control_image",),
    "redux": ("input_image",),
}
# Without an explicit size, these modes take the size of this input image.
SIZE_FROM_IMAGE: Final[dict[str, str]] = {"img2img": "input_image", "fill": "input_image", "redux": "input_image"}
# The model a request without model_id gets, by mode (controlnet: by controlnet_type, depth if none).
DEFAULT_MODEL: Final[dict[str, str]] = {
    "text2img": "flux1-dev", "img2img": "flux1-dev", "fill": "flux1-fill-dev",
    "controlnet": "flux1-depth-dev", "redux": "flux1-redux-dev",
}

DEFAULT_MODE: Final = "text2img"
DEFAULT_WIDTH: Final = 1024
DEFAULT_HEIGHT: Final = 1024
DEFAULT_STEPS: Final = 50
DEFAULT_SEED: Final = 42
DEFAULT_PRIORITY: Final = 0
MIN_PRIORITY: Final = -1000
MAX_PRIORITY: Final = 1000
# Fair share between keys (broker.queue): a key's weight, and the most urgent priority it may
# ask for. Keys without an admin-set floor may not go below 0; admin keys may use any priority.
MIN_WEIGHT: Final = 0.01
MAX_WEIGHT: Final = 100.0
DEFAULT_PRIORITY_FLOOR: Final = 0
DEFAULT_STRENGTH: Final = 0.8
DEFAULT_CFG: Final = 3.5
FILL_DEFAULT_CFG: Final = 30.0  # BFL's recommendation for FLUX.1-Fill
DEFAULT_LORA_WEIGHT: Final = 1.0
SIZE_STEP: Final = 16  # sizes are rounded down to a multiple of this
MAX_LORAS: Final = 8
# Result image formats (encoded on the node) and their media types.
OUTPUT_FORMATS: Final[dict[str, str]] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
DEFAULT_OUTPUT_FORMAT: Final = "png"
DEFAULT_OUTPUT_QUALITY: Final = 90  # JPEG and WebP; PNG is lossless and ignores it
# "fast": the step cache on (fewer transformer passes); "quality": off. Unset: the node's default.
SPEEDS: Final = ("quality", "fast")
# Webhook events a request may ask for (webhook_events_filter); all of them by default.
WEBHOOK_EVENTS: Final = ("start", "completed", "failed", "cancelled")


def default_model(mode: str, controlnet_type: str | None = None) -> str:
    """The model a request without `model_id` runs on."""
    if mode == "controlnet" and controlnet_type in CONTROL_MODELS:
        return CONTROL_MODELS[controlnet_type]
    return DEFAULT_MODEL[mode]


def default_cfg(mode: str, model_id: str | None = None) -> float:
    """Guidance when the request gives none: 30 for the fill checkpoint in any mode, else 3.5."""
    return FILL_DEFAULT_CFG if mode == "fill" or model_id == "flux1-fill-dev" else DEFAULT_CFG


def supports(model_id: str, mode: str) -> bool:
    """Whether the checkpoint can run the mode at all (whether a live node serves it is the broker's)."""
    return mode in MODEL_MODES.get(model_id, ())
