"""Which model ids exist, where their folders come from, and which modes a node can serve.

Torch-free: the node's __main__ uses it to build its config before any heavy import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from genserve.catalog import MODEL_IDS, MODEL_MODES


@dataclass(frozen=True)
class ModelSpec:
    """One model id: its diffusers pipeline and the legacy environment names."""

    model_id: str
    pipeline: str
    path_env: str
    gpus_env: str


CATALOG: dict[str, ModelSpec] = {
    "flux1-dev": ModelSpec("flux1-dev", "FluxPipeline", "FLUX_MODEL_PATH", "FLUX_GPUS"),
    "flux1-fill-dev": ModelSpec("flux1-fill-dev", "FluxFillPipeline", "FLUX_FILL_MODEL_PATH", "FLUX_FILL_GPUS"),
    "flux1-depth-dev": ModelSpec("flux1-depth-dev", "FluxControlPipeline", "FLUX_DEPTH_MODEL_PATH", "FLUX_DEPTH_GPUS"),
    "flux1-canny-dev": ModelSpec("flux1-canny-dev", "FluxControlPipeline", "FLUX_CANNY_MODEL_PATH", "FLUX_CANNY_GPUS"),
    "flux1-openpose-dev": ModelSpec("flux1-openpose-dev", "FluxControlPipeline", "FLUX_OPENPOSE_MODEL_PATH",
                                    "FLUX_OPENPOSE_GPUS"),
    "flux1-redux-dev": ModelSpec("flux1-redux-dev", "FluxPriorReduxPipeline", "FLUX_REDUX_MODEL_PATH",
                                 "FLUX_REDUX_GPUS"),
}
assert tuple(CATALOG) == MODEL_IDS


def _device_index(device: str) -> int | None:
    if device.startswith("cuda"):
        return int(device.split(":", 1)[1]) if ":" in device else 0
    return None


def _gpu_allowed(spec: ModelSpec, device: str, env: Mapping[str, str]) -> bool:
    """FLUX_<X>_GPUS (or FLUX_GPUS for all models) lists the GPU indices that serve a model."""
    index = _device_index(device)
    listed = env.get(spec.gpus_env) or env.get("FLUX_GPUS")
    if index is None or not listed:
        return True
    return str(index) in {x.strip() for x in listed.split(",")}


def resolve_model_paths(models_dir: Path | None, env: Mapping[str, str], device: str,
                        only: tuple[str, ...] = ()) -> dict[str, str]:
    """Model id -> folder (or hub id): FLUX_*_MODEL_PATH wins, else MODELS_DIR/<model_id>."""
    paths: dict[str, str] = {}
    for model_id, spec in CATALOG.items():
        if only and model_id not in only:
            continue
        if not _gpu_allowed(spec, device, env):
            continue
        explicit = env.get(spec.path_env)
        if explicit:
            paths[model_id] = explicit
        elif models_dir is not None and (models_dir / model_id / "model_index.json").is_file():
            paths[model_id] = str(models_dir / model_id)
    return paths


def servable_modes(paths: Mapping[str, str]) -> dict[str, list[str]]:
    """Modes this node can really run: redux also needs flux1-dev's transformer and VAE."""
    out = {}
    for model_id in paths:
        if model_id == "flux1-redux-dev" and "flux1-dev" not in paths:
            continue
        out[model_id] = list(MODEL_MODES[model_id])
    return out
