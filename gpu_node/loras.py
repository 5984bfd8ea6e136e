"""LoRA files under LORA_BASE_PATH: listing, name resolution, in-memory cache, per-job use.

A job's LoRAs are loaded as named adapters, weighted with ``set_adapters``, and
unloaded when the job ends (successfully or not), so they never leak into the
next request. File contents are cached in memory up to a byte budget (least
recently used first out): reusing a LoRA reads no disk.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from safetensors.torch import load_file

from genserve.spec import LoraRef, lora_set_key
from genserve.wire import LoraInfo
from gpu_node.errors import LoraError
from gpu_node.lora_slots import ADAPTER, DoesNotFit, LoraWeights, slots_of
from gpu_node.speed import eager_blocks

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"


def inside(base: Path, path: Path) -> Path | None:
    """`path` with every link resolved, if it is a regular file below `base` (already resolved); else None.

    A symlink (or a symlinked folder) pointing outside the LoRA folder is neither listed
    nor loadable: it would expose the server's other files.
    """
    try:
        resolved = path.resolve()
        is_file = resolved.is_file()
    except (OSError, RuntimeError, ValueError):  # link loop, permission denied, NUL in a name
        return None
    return resolved if is_file and base in resolved.parents else None


def scan(base: Path | None) -> list[LoraInfo]:
    """Every *.safetensors under `base`, by relative name, sorted (never absolute paths)."""
    if base is None or not base.is_dir():
        return []
    real_base = base.resolve()
    out = []
    for path in sorted(base.rglob("*" + SUFFIX)):
        target = inside(real_base, path)
        if target is None:
            continue
        try:
            size = target.stat().st_size
        except OSError:
            continue  # removed meanwhile
        rel = path.relative_to(base)
        out.append(LoraInfo(rel.as_posix(), round(size / (1024 * 1024), 3),
                            rel.parts[0] if len(rel.parts) > 1 else "root"))
    return out


@dataclass
class LoraUse:
    """How a job's LoRAs were put on the model: "hotswap" (packed into the slots), "reload" or "none"."""

    path: str = "none"
    seconds: float = 0.0


class LoraLibrary:
    """Resolves LoRA names to files below one base folder and caches their tensors."""

    def __init__(self, base: Path | None, cache_bytes: int = 2 << 30) -> None:
        self.base = base.resolve() if base else None
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()
        self._stamps: dict[str, tuple[int, int]] = {}
        self.disk_reads = 0

    def resolve(self, name: str) -> str:
        """Canonical relative name for `name` (extension optional); LoraError if unknown."""
        if self.base is None:
            raise LoraError("no LoRA folder is configured on this node")
        candidate = name if name.endswith(SUFFIX) else name + SUFFIX
        path = inside(self.base, self.base / candidate)
        if path is None:
            raise LoraError(f"unknown LoRA {name!r}")
        return path.relative_to(self.base).as_posix()

    def stamp(self, name: str) -> tuple[int, int]:
        """(mtime in ns, size) of the LoRA's file: a file replaced on disk is read again."""
        try:
            st = (self.base / self.resolve(name)).stat()
        except OSError as exc:
            raise LoraError(f"cannot read LoRA {name!r}: {exc}") from exc
        return st.st_mtime_ns, st.st_size

    def state_dict(self, name: str) -> dict[str, Any]:
        """The LoRA's tensors, read from disk once (again if the file changed)."""
        key = self.resolve(name)
        stamp = self.stamp(name)
        if key in self._cache and self._stamps.get(key) == stamp:
            self._cache.move_to_end(key)
            return self._cache[key][0]
        try:
            tensors = load_file(str(self.base / key))
        except Exception as exc:  # safetensors raises several types for bad files
            raise LoraError(f"cannot read LoRA {name!r}: {exc}") from exc
        self.disk_reads += 1
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        self._cache[key] = (tensors, size)
        self._cache.move_to_end(key)
        self._stamps[key] = stamp
        # Least recently used LoRAs leave memory first; the newest always stays.
        while len(self._cache) > 1 and sum(n for _, n in self._cache.values()) > self.cache_bytes:
            gone, _ = self._cache.popitem(last=False)
            self._stamps.pop(gone, None)
        return tensors

    @property
    def cached(self) -> list[str]:
        """LoRA names held in memory, least recently used first."""
        return list(self._cache)

    def weights(self, pipe: Any, spec: LoraRef) -> LoraWeights:
        """A LoRA converted to diffusers' keys for `pipe` (kohya and other layouts included)."""
        try:
            state, alphas = type(pipe).lora_state_dict(dict(self.state_dict(spec.name)), return_alphas=True)
        except LoraError:
            raise
        except Exception as exc:  # diffusers raises several types for layouts it does not know
            raise LoraError(f"LoRA {spec.name!r} does not fit this model: {exc}") from exc
        return LoraWeights(state, alphas or {}, spec.weight)

    @contextlib.contextmanager
    def applied(self, pipe: Any, specs: list[LoraRef]) -> Iterator[LoraUse]:
        """Put `specs` on `pipe` for the duration of a job: packed into its slots if it has them and they fit."""
        started = time.perf_counter()
        slots = slots_of(pipe)
        if slots is not None:
            key = tuple((self.resolve(s.name), self.stamp(s.name), s.weight) for s in specs)
            try:
                if key != slots.current:  # the same set again costs nothing, not even a conversion
                    slots.load(key, [self.weights(pipe, s) for s in specs], lora_set_key(specs))
                fitted = True
            except DoesNotFit as exc:
                log.info("LoRA set does not fit the slots (%s); loading it as separate adapters", exc)
                slots.load((), [])
                fitted = False
            if fitted:
                yield LoraUse("hotswap" if specs else "none", time.perf_counter() - started)
                return
        if not specs:
            yield LoraUse()
            return
        with eager_blocks(pipe.transformer):  # compiled blocks would recompile for every new adapter layout
            with self._loaded(pipe, specs, slots is not None):
                yield LoraUse("reload", time.perf_counter() - started)

    @contextlib.contextmanager
    def _loaded(self, pipe: Any, specs: list[LoraRef], resident_slots: bool) -> Iterator[None]:
        """Load `specs` as adapters next to whatever the model has, and remove them afterwards."""
        adapters, weights = [], []
        try:
            for i, spec in enumerate(specs):
                state = self.state_dict(spec.name)
                adapter = f"job{i}"
                try:
                    # dict(): diffusers pops keys from the dict it is given.
                    pipe.load_lora_weights(dict(state), adapter_name=adapter)
                except Exception as exc:
                    raise LoraError(f"LoRA {spec.name!r} does not fit this model: {exc}") from exc
                adapters.append(adapter)
                weights.append(spec.weight)
            pipe.set_adapters(adapters, adapter_weights=weights)
            yield
        finally:
            # Also after a failed load: peft may have injected layers before raising.
            if resident_slots:
                _drop_job_adapters(pipe, len(specs))
            else:
                pipe.unload_lora_weights()


def _drop_job_adapters(pipe: Any, count: int) -> None:
    """Delete this job's adapters and make the resident slot the active adapter again."""
    present = {name for names in pipe.get_list_adapters().values() for name in names}
    stale = [f"job{i}" for i in range(count) if f"job{i}" in present]
    if stale:
        pipe.delete_adapters(stale)
    pipe.transformer.set_adapters([ADAPTER], weights=[1.0])
    pipe.transformer.requires_grad_(False)  # peft marks active adapters trainable; compiled guards check it
