"""The node's cache of loaded Flux pipelines.

- One *base* pipeline per model id, loaded from its folder. Components whose
  weights are identical to an already-loaded one (the Flux fill/control
  checkpoints ship the same text encoders and VAE as flux1-dev) are reused,
  found by a fingerprint of their files, so a node never loads the same
  weights twice.
- Mode variants (img2img from the text2img pipeline) come from ``from_pipe``:
  the same component objects, zero-copy.
- Least-recently-used base models leave the device when loading another would
  pass the memory budget: parked in pinned host memory while the host budget
  allows (gpu_node.memory; coming back is one host-to-device copy), else evicted
  (coming back is a load from disk). A failed load leaves the cache as it was.
- A `prepare` callable (gpu_node.speed) runs on every new pipeline: LoRA slots,
  FP8 weights, compiled blocks.

Only the node's worker thread calls into this class; ``loaded`` is an
immutable snapshot that the socket thread may read at any time.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import diffusers
import torch
import transformers

from gpu_node.memory import HostMirror

log = logging.getLogger(__name__)
# Their progress bars and own stderr handlers would break JSON logs: their records go to ours.
for _library in (diffusers.utils.logging, transformers.utils.logging):
    _library.disable_progress_bar()
    _library.disable_default_handler()
    _library.enable_propagation()

SAMPLE_CHUNKS = 16
CHUNK = 64 * 1024


def fingerprint(folder: Path) -> str | None:
    """Identify a component's weights cheaply: config, safetensors headers and sampled bytes."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256((folder / "config.json").read_bytes() if (folder / "config.json").exists() else b"")
    for path in files:
        size = path.stat().st_size
        h.update(str(size).encode())
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header_len, 16 << 20)))
            for i in range(SAMPLE_CHUNKS):
                f.seek(size * i // SAMPLE_CHUNKS)
                h.update(f.read(CHUNK))
    return h.hexdigest()


def module_bytes(module: Any) -> int:
    """Bytes held by a module's parameters and buffers (0 for non-modules)."""
    if not isinstance(module, torch.nn.Module):
        return 0
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _Component:
    obj: Any
    nbytes: int
    users: set[str] = field(default_factory=set)
    mirror: HostMirror | None = None
    parked: bool = False


@dataclass
class _Entry:
    pipe: Any
    fingerprints: list[str]
    variants: dict[str, Any] = field(default_factory=dict)
    parked: bool = False


class PipelineCache:
    """Loads, shares and evicts pipelines for one device."""

    def __init__(self, paths: dict[str, str], device: str, dtype: torch.dtype,
                 budget_bytes: int, host_budget_bytes: int = 0,
                 prepare: Callable[[Any], None] | None = None) -> None:
        self.paths = dict(paths)
        self.device = device
        self.dtype = dtype
        self.budget = budget_bytes
        self.host_budget = host_budget_bytes
        self.prepare = prepare
        self.restores = 0
        self.restore_seconds = 0.0
        self._models: OrderedDict[str, _Entry] = OrderedDict()
        self._components: dict[str, _Component] = {}
        self.loaded: tuple[str, ...] = ()
        self.loads = 0
        self.load_seconds = 0.0  # totals for metrics (read by the socket thread: plain numbers)
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        """Bytes of weights on the device (each shared component counted once)."""
        return sum(c.nbytes for c in self._components.values() if not c.parked)

    @property
    def host_bytes(self) -> int:
        """Bytes of pinned host memory holding parked weights."""
        return sum(c.mirror.nbytes for c in self._components.values() if c.mirror is not None)

    @property
    def parked(self) -> tuple[str, ...]:
        """Model ids whose own weights wait in host memory."""
        return tuple(m for m, e in self._models.items() if e.parked)

    def lora_sets(self) -> dict[str, str]:
        """Model -> the LoRA set its resident slots hold (models without slots, or with none, left out)."""
        out = {}
        for model_id, entry in self._models.items():
            slots = getattr(getattr(entry.pipe, "transformer", None), "_genserve_slots", None)
            if not entry.parked and slots is not None and slots.label:
                out[model_id] = slots.label
        return out

    def base(self, model_id: str, pinned: tuple[str, ...] = ()) -> Any:
        """The model's own pipeline, loading it (and evicting others) if needed."""
        entry = self._models.get(model_id)
        if entry is None:
            entry = self._load(model_id, pinned + (model_id,))
        elif entry.parked:
            self._restore(model_id, entry, pinned + (model_id,))
        self._models.move_to_end(model_id)
        return entry.pipe

    def variant(self, model_id: str, cls_name: str) -> Any:
        """A pipeline of another class over the same components (``from_pipe``, zero-copy)."""
        pipe = self.base(model_id)
        if type(pipe).__name__ == cls_name:
            return pipe
        entry = self._models[model_id]
        if cls_name not in entry.variants:
            entry.variants[cls_name] = getattr(diffusers, cls_name).from_pipe(pipe)
        return entry.variants[cls_name]

    def redux(self) -> tuple[Any, Any]:
        """(FluxPriorReduxPipeline, flux1-dev FluxPipeline); the prior borrows flux1-dev's text encoders."""
        base = self.base("flux1-dev", pinned=("flux1-redux-dev",))
        prior = self.base("flux1-redux-dev", pinned=("flux1-dev",))
        return prior, base

    def _shared_for(self, model_id: str, folder: Path | None) -> tuple[dict[str, Any], dict[str, str]]:
        """Components already in memory that this model's folder would load again."""
        shared: dict[str, Any] = {}
        prints: dict[str, str] = {}
        if model_id == "flux1-redux-dev" and "flux1-dev" in self._models:
            dev = self._models["flux1-dev"].pipe
            for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
                shared[name] = getattr(dev, name)
        if folder is None or not (folder / "model_index.json").is_file():
            return shared, prints
        index = json.loads((folder / "model_index.json").read_text())
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
                continue
            fp = fingerprint(folder / name) if (folder / name).is_dir() else None
            if fp is None:
                continue
            prints[name] = fp
            if fp in self._components:
                shared[name] = self._components[fp].obj
        return shared, prints

    def _estimate(self, folder: Path | None, shared: dict[str, Any]) -> int:
        if folder is None:
            return 0
        total = 0
        for sub in folder.iterdir():
            if sub.is_dir() and sub.name not in shared:
                total += sum(f.stat().st_size for f in sub.glob("*.safetensors"))
        return total

    def _own(self, model_id: str, keep: tuple[Any, ...] = ()) -> list[_Component]:
        """Components only `model_id` uses (and the model being loaded will not reuse)."""
        entry = self._models[model_id]
        return [c for fp in entry.fingerprints if (c := self._components.get(fp)) and c.users == {model_id}
                and not any(c.obj is k for k in keep)]

    def _make_room(self, needed: int, pinned: tuple[str, ...], keep: tuple[Any, ...] = (),
                   host_credit: int = 0) -> None:
        """Free device memory for `needed` bytes (`host_credit`: host bytes about to be given back)."""
        for victim in list(self._models):
            if self.used_bytes + needed <= self.budget:
                return
            if victim not in self._models or victim in pinned or self._models[victim].parked:
                continue
            own = self._own(victim, keep)
            host = sum(c.nbytes for c in own if c.mirror is None)
            if own and host <= self.host_budget:
                self._free_host(host - host_credit, victim, pinned)
            if own and self.host_bytes + host - host_credit <= self.host_budget:
                self._park(victim, own)
            else:
                self.evict(victim)
        if self.used_bytes + needed > self.budget:
            log.warning("loading needs %d bytes over the %d-byte budget", needed, self.budget)

    def _free_host(self, needed: int, victim: str, pinned: tuple[str, ...]) -> None:
        """Host room for `needed` bytes: first the kept copies of models now on the device, then parked models.

        Both least recently used first. A model on the device keeps its host copy only to make
        its next park free; a parked model's copy is the model itself.
        """
        for model_id, entry in list(self._models.items()):
            if self.host_bytes + needed <= self.host_budget:
                return
            if not entry.parked and model_id != victim:
                for comp in self._own(model_id):
                    if comp.mirror is not None and not comp.parked:
                        comp.mirror = None
        for model_id in [m for m, e in self._models.items() if e.parked and m not in pinned]:
            if self.host_bytes + needed <= self.host_budget:
                return
            self.evict(model_id)

    def _park(self, model_id: str, own: list[_Component]) -> None:
        for comp in own:
            if comp.mirror is None:
                comp.mirror = HostMirror(comp.obj)
            comp.mirror.park()
            comp.parked = True
        self._models[model_id].parked = True
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        log.info("parked %s in host memory (%d bytes)", model_id, sum(c.nbytes for c in own))

    def _restore(self, model_id: str, entry: _Entry, pinned: tuple[str, ...]) -> None:
        own = [c for c in self._own(model_id) if c.parked]
        mirrored = sum(c.mirror.nbytes for c in own)
        # Its host copy can go once it is back on the device, so that copy's room counts as free.
        self._make_room(sum(c.nbytes for c in own), pinned, host_credit=mirrored)
        seconds = 0.0
        for comp in own:
            seconds += comp.mirror.restore(self.device)
            comp.parked = False
            slots = getattr(comp.obj, "_genserve_slots", None)
            if slots is not None:
                slots.clear()  # the host copy may hold an older set
        entry.parked = False
        if self.host_bytes > self.host_budget:  # the credit above was used: drop the copy now
            for comp in own:
                comp.mirror = None
        self.restores += 1
        self.restore_seconds += seconds
        log.info("restored %s from host memory in %.3f s", model_id, seconds)

    def _load(self, model_id: str, pinned: tuple[str, ...]) -> _Entry:
        from gpu_node.catalog import CATALOG

        source = self.paths.get(model_id)
        if source is None:
            raise KeyError(f"this node has no folder for {model_id}")
        folder = Path(source) if os.path.isdir(source) else None
        shared, prints = self._shared_for(model_id, folder)
        self._make_room(self._estimate(folder, shared), pinned, tuple(shared.values()))
        cls = getattr(diffusers, CATALOG[model_id].pipeline)
        log.info("loading %s from %s (reusing %s)", model_id, source, sorted(shared) or "nothing")
        started = time.perf_counter()
        pipe = cls.from_pretrained(source, dtype=self.dtype, **shared).to(self.device)
        self.loads += 1
        self.load_seconds += time.perf_counter() - started
        return self._register(model_id, pipe, prints)

    def add(self, model_id: str, pipe: Any) -> None:
        """Serve `model_id` with a pipeline built in memory (benchmarks, random weights; no folder), making room."""
        self.paths.setdefault(model_id, "<in memory>")
        self._register(model_id, pipe, {})
        self._make_room(0, (model_id,))

    def _register(self, model_id: str, pipe: Any, prints: dict[str, str]) -> _Entry:
        pipe.set_progress_bar_config(disable=True)
        if self.prepare is not None:
            self.prepare(pipe)
        used = []
        for name, comp in pipe.components.items():
            if not isinstance(comp, torch.nn.Module):
                continue
            fp = prints.get(name) or self._print_of(comp) or f"{model_id}/{name}"
            record = self._components.setdefault(fp, _Component(comp, module_bytes(comp)))
            record.users.add(model_id)
            used.append(fp)
        entry = _Entry(pipe, used)
        self._models[model_id] = entry
        self.loaded = tuple(self._models)
        return entry

    def _print_of(self, obj: Any) -> str | None:
        for fp, comp in self._components.items():
            if comp.obj is obj:
                return fp
        return None

    def evict(self, model_id: str) -> None:
        """Drop a model's pipelines; free components no other model uses."""
        entry = self._models.pop(model_id, None)
        if entry is None:
            return
        for fp in entry.fingerprints:
            comp = self._components.get(fp)
            if comp is not None:
                comp.users.discard(model_id)
                if not comp.users:
                    del self._components[fp]
        self.loaded = tuple(self._models)
        self.evictions += 1
        del entry
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        log.info("evicted %s", model_id)
