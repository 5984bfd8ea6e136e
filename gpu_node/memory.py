"""Where a model's weights live: on the device, parked in pinned host memory, or only on disk.

All six model ids share one T5, CLIP and VAE (the pipeline cache finds them by fingerprint),
so what differs between models is one transformer (about 24 GB in bf16). Parking copies
the weights the model alone uses into page-locked host memory once and keeps that copy:
weights never change while serving (LoRAs live in separate matrices), so parking again
drops the device tensors without copying back, and switching to a parked model is one
host-to-device copy at PCIe speed instead of a read from disk.

On a CPU device there is no separate host memory: parking and restoring keep the same
tensors, and only the bookkeeping (which model is where, what a switch cost) runs.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

GIB = 1 << 30
ALIGN = 512


def _pin(flat: torch.Tensor) -> bool:
    """Page-lock a host buffer in place (cudaHostRegister: no power-of-two rounding, unlike pin_memory)."""
    if not torch.cuda.is_available():
        return False
    cudart = torch.cuda.cudart()
    result = cudart.cudaHostRegister(flat.data_ptr(), flat.numel(), 0)
    if int(getattr(result, "value", result)) != 0:
        log.warning("could not page-lock %d bytes; parked weights stay in pageable memory", flat.numel())
        return False
    weakref.finalize(flat, cudart.cudaHostUnregister, flat.data_ptr())
    return True


class HostMirror:
    """A pinned host copy of one module's tensors, made on the first park and kept."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.host: dict[str, torch.Tensor] = {}
        self.nbytes = 0

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = dict(self.module.named_parameters(remove_duplicate=False))
        out.update(self.module.named_buffers(remove_duplicate=False))
        return out

    def park(self) -> None:
        """Point every tensor at its host copy (copying device to host the first time only)."""
        tensors = self._tensors()
        if not self.host:
            self._copy_out(tensors)
        for name, tensor in tensors.items():
            tensor.data = self.host[name]

    def _copy_out(self, tensors: dict[str, torch.Tensor]) -> None:
        """One page-locked buffer for all device tensors, carved into views; host tensors are kept as they are."""
        layout, size = {}, 0
        for name, tensor in tensors.items():
            if tensor.device.type != "cpu":
                nbytes = tensor.numel() * tensor.element_size()
                layout[name] = (size, nbytes)
                size += -(-nbytes // ALIGN) * ALIGN
        flat = torch.empty(size, dtype=torch.uint8)
        _pin(flat)
        self._flat = flat
        for name, tensor in tensors.items():
            if name not in layout:
                self.host[name] = tensor.data
                continue
            offset, nbytes = layout[name]
            view = flat[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
            view.copy_(tensor.data)
            self.host[name] = view
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        # Counted whatever the device, so the host budget means the same on a CPU node (where the
        # tensors were already in host memory and nothing was copied).
        self.nbytes = sum(t.numel() * t.element_size() for t in self.host.values())

    def restore(self, device: str) -> float:
        """Copy the host tensors to `device`; returns the seconds it took (synchronised)."""
        started = time.perf_counter()
        target = torch.device(device)
        for name, tensor in self._tensors().items():
            if tensor.device != target:
                tensor.data = self.host[name].to(target, non_blocking=True)
        if target.type == "cuda":
            torch.cuda.synchronize(target)
        return time.perf_counter() - started


@dataclass(frozen=True)
class Residency:
    """How many transformers one device keeps ready, from measured sizes."""

    device_gib: float
    shared_gib: float
    transformer_gib: float
    headroom_gib: float
    on_device: int
    parked: int


def plan(device_bytes: int, shared_bytes: int, transformer_bytes: int, headroom_bytes: int,
         host_bytes: int, models: int = 5) -> Residency:
    """Transformers (five: redux has none of its own) that fit next to the shared encoders, VAE and headroom."""
    free = device_bytes - shared_bytes - headroom_bytes
    on_device = max(0, min(models, free // transformer_bytes)) if transformer_bytes else models
    parked = max(0, min(models - on_device, host_bytes // transformer_bytes)) if transformer_bytes else 0
    return Residency(round(device_bytes / GIB, 1), round(shared_bytes / GIB, 2),
                     round(transformer_bytes / GIB, 2), round(headroom_bytes / GIB, 2), int(on_device), int(parked))
