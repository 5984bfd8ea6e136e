"""LoRA files under LORA_BASE_PATH: listing, name resolution, in-memory cache, per-job use.

A job's LoRAs are loaded as named adapters, weighted with ``set_adapters``, and
unloaded when the job ends (successfully or not), so they never leak into the
next request. File contents are cached in memory up to a byte budget (least
recently used first out): reusing a LoRA reads no disk.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

from safetensors.torch import load_file

from genserve.spec import LoraRef
from genserve.wire import LoraInfo
from gpu_node.errors import LoraError

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


class LoraLibrary:
    """Resolves LoRA names to files below one base folder and caches their tensors."""

    def __init__(self, base: Path | None, cache_bytes: int = 2 << 30) -> None:
        self.base = base.resolve() if base else None
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()
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

    def state_dict(self, name: str) -> dict[str, Any]:
        """The LoRA's tensors, read from disk once."""
        key = self.resolve(name)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key][0]
        try:
            tensors = load_file(str(self.base / key))
        except Exception as exc:  # safetensors raises several types for bad files
            raise LoraError(f"cannot read LoRA {name!r}: {exc}") from exc
        self.disk_reads += 1
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        self._cache[key] = (tensors, size)
        # Least recently used LoRAs leave memory first; the newest always stays.
        while len(self._cache) > 1 and sum(n for _, n in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)
        return tensors

    @property
    def cached(self) -> list[str]:
        """LoRA names held in memory, least recently used first."""
        return list(self._cache)

    @contextlib.contextmanager
    def applied(self, pipe: Any, specs: list[LoraRef]) -> Iterator[list[str]]:
        """Load `specs` as adapters on `pipe` for the duration of a job."""
        if not specs:
            yield []
            return
        adapters, weights = [], []
        try:
            for i, spec in enumerate(specs):
                state = self.state_dict(spec.name)
                adapter = f"job{i}"
                try:
                    # dict(): diffusers pops keys from the dict it is given.
                    pipe.load_lora_weights(dict(state), adapter_name=adapter)
                except Exception as exc:
                    raise LoraError(f"LoRA {spec['name']!r} does not fit this model: {exc}") from exc
                adapters.append(adapter)
                weights.append(spec.weight)
            pipe.set_adapters(adapters, adapter_weights=weights)
            yield adapters
        finally:
            # Also after a failed load: peft may have injected layers before raising.
            pipe.unload_lora_weights()
