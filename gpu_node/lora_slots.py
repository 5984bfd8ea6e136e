"""Resident LoRA slots: a job's LoRA set is copied into one adapter that never leaves the model.

Loading a LoRA the usual way injects new layers into the transformer, which costs a
recompilation when the transformer is compiled, and unloading removes them again. Here the
transformer gets, once, a zero adapter of rank ``R`` (the slot capacity) on every linear
layer. A job's LoRAs are then *packed* into it: for LoRAs ``i`` with matrices ``A_i``
(rank x in) and ``B_i`` (out x rank), scale ``s_i = weight_i * alpha_i / rank_i``,

    sum_i s_i B_i A_i  =  [s_1 B_1 | ... | s_n B_n] @ [A_1; ...; A_n]

so the slot holds any set whose ranks add up to at most ``R`` on every layer, up to the
request limit of 8 LoRAs, exactly. Swapping is an in-place copy of a few megabytes: the
module tree, the adapter's scaling and every tensor's shape stay the same, so nothing
recompiles. Layers the previous set used and this one does not are zeroed.

A set that does not fit (ranks summing past ``R``, a layer shape the slot lacks, text
encoder weights, biases, DoRA) is loaded the usual way next to the slot and deleted after
the job; the job's metadata says which path ran and how long it took.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

ADAPTER = "genserve_slots"
PREFIX = "transformer."


class DoesNotFit(Exception):
    """The LoRA set cannot be packed into the slot; the caller loads it the usual way."""


@dataclass(frozen=True)
class LoraWeights:
    """One LoRA already converted to diffusers' transformer keys, with its request weight."""

    state: dict[str, torch.Tensor]
    alphas: dict[str, Any]
    weight: float


def _linear_names(transformer: torch.nn.Module) -> list[str]:
    return [name for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]


class LoraSlots:
    """The resident adapter on one transformer and the set currently packed into it."""

    def __init__(self, transformer: Any, rank: int) -> None:
        from peft import LoraConfig

        self.rank = rank
        self.transformer = transformer
        names = _linear_names(transformer)
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=names,
                                           init_lora_weights=True), adapter_name=ADAPTER)
        self.layers: dict[str, Any] = {}
        for name, module in transformer.named_modules():
            if hasattr(module, "lora_A") and ADAPTER in module.lora_A:
                self.layers[name] = module
                module.requires_grad_(False)
        self._used: set[str] = set()
        self.current: tuple | None = ()  # the packed set's key; None = unknown (after a restore)
        self.label = ""  # the packed set as the broker names it (genserve.spec.lora_set_key); "" for none
        self.clear()
        transformer._genserve_slots = self
        log.info("LoRA slots of rank %d on %d layers", rank, len(self.layers))

    def clear(self) -> None:
        """Zero every slot layer (no LoRA)."""
        with torch.no_grad():
            for module in self.layers.values():
                module.lora_A[ADAPTER].weight.zero_()
                module.lora_B[ADAPTER].weight.zero_()
        self._used = set()
        self.current = ()
        self.label = ""

    def pack(self, loras: list[LoraWeights]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Layer name -> (A, B) of the whole set, scales folded into B; DoesNotFit if it cannot be held."""
        parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for lora in loras:
            for layer, (a, b, alpha) in self._pairs(lora).items():
                scale = lora.weight * (float(alpha) / a.shape[0] if alpha is not None else 1.0)
                parts.setdefault(layer, []).append((a, b * scale))
        packed = {}
        for layer, pairs in parts.items():
            module = self.layers[layer]
            rank = sum(a.shape[0] for a, _ in pairs)
            if rank > self.rank:
                raise DoesNotFit(f"{layer}: ranks add up to {rank}, over the slot's {self.rank}")
            base = module.base_layer
            for a, b in pairs:
                if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                    raise DoesNotFit(f"{layer}: LoRA shape {tuple(b.shape)}x{tuple(a.shape)} does not fit")
            packed[layer] = (torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs], dim=1))
        return packed

    def _pairs(self, lora: LoraWeights) -> dict[str, tuple[torch.Tensor, torch.Tensor, Any]]:
        out: dict[str, list] = {}
        for key, tensor in lora.state.items():
            if not key.startswith(PREFIX):
                raise DoesNotFit(f"{key.split('.', 1)[0]} weights (only the transformer's fit the slot)")
            body = key[len(PREFIX):]
            for kind in ("lora_A", "lora_B"):
                marker = f".{kind}.weight"
                if body.endswith(marker):
                    layer = body[: -len(marker)]
                    break
            else:
                raise DoesNotFit(f"unsupported LoRA tensor {key}")
            if layer not in self.layers:
                raise DoesNotFit(f"no slot on layer {layer}")
            if tensor.dim() != 2:
                raise DoesNotFit(f"{key} is not a linear LoRA")
            out.setdefault(layer, [None, None, None])[0 if kind == "lora_A" else 1] = tensor
        pairs = {}
        for layer, (a, b, _) in out.items():
            if a is None or b is None or a.shape[0] != b.shape[1]:
                raise DoesNotFit(f"{layer}: lora_A and lora_B do not pair")
            alpha = lora.alphas.get(f"{PREFIX}{layer}.alpha")
            pairs[layer] = (a, b, alpha)
        return pairs

    def load(self, key: tuple, loras: list[LoraWeights], label: str = "") -> None:
        """Pack `loras` (named `label`) and copy them into the slot in place; a no-op if `key` is already there."""
        if key == self.current:
            return
        packed = self.pack(loras)  # raises before anything changes
        self.current, self.label = None, ""  # until every layer is written: a failure leaves nothing trusted
        self._used |= set(packed)
        with torch.no_grad():
            for layer in self._used - set(packed):
                module = self.layers[layer]
                module.lora_A[ADAPTER].weight.zero_()
                module.lora_B[ADAPTER].weight.zero_()
            for layer, (a, b) in packed.items():
                module = self.layers[layer]
                slot_a, slot_b = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
                rank = a.shape[0]
                slot_a[:rank].copy_(a, non_blocking=True)
                slot_a[rank:].zero_()
                slot_b[:, :rank].copy_(b, non_blocking=True)
                slot_b[:, rank:].zero_()
        self._used = set(packed)
        self.current, self.label = key, label


def slots_of(pipe: Any) -> LoraSlots | None:
    """The slots installed on a pipeline's transformer, if any."""
    return getattr(getattr(pipe, "transformer", None), "_genserve_slots", None)
