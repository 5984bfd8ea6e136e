"""Speed options applied to a loaded Flux transformer: FP8 weights, regional compilation, step cache.

Order matters and is fixed here (`prepare`): LoRA slots are injected first (they change the
module tree), then the base linears are quantized (never the LoRA matrices), then each
repeated block's ``forward`` is compiled on its own.

Compilation is per block and *below* diffusers' hooks: ``block.forward`` is replaced by its
compiled version, so the First Block Cache hooks, which diffusers installs around
``forward``, stay in eager Python. Turning the cache on or off for one request then adds or
removes a Python wrapper and never touches a compiled graph. Shapes are dynamic (one graph
for every image size, no size buckets) and duck sizing is off, so that a size whose token
count happens to equal another dimension does not specialise the graph.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch

from gpu_node.config import SpeedError, SpeedOptions

log = logging.getLogger(__name__)

FP8_CAPABILITY = (8, 9)  # Ada and Hopper: float8 matrix units


def check_device(options: SpeedOptions, device: str) -> None:
    """Refuse, before any model loads, an option the device cannot run."""
    if options.quantize != "fp8":
        return
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise SpeedError(f"--quantize fp8 needs a CUDA GPU with float8 support (compute capability "
                         f"{FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]}+); this node's device is {device}")
    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < FP8_CAPABILITY:
        raise SpeedError(f"--quantize fp8 needs compute capability {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]}+; "
                         f"{torch.cuda.get_device_name(torch.device(device))} has {capability[0]}.{capability[1]}")
    try:
        import torchao  # noqa: F401
    except ImportError as exc:
        raise SpeedError("--quantize fp8 needs torchao (pip install 'genserve[fp8]')") from exc


def blocks(transformer: Any) -> list[torch.nn.Module]:
    """The transformer's repeated blocks (what regional compilation compiles one by one)."""
    names = getattr(transformer, "_repeated_blocks", ()) or ()
    return [m for m in transformer.modules() if type(m).__name__ in names]


def quantize_fp8(transformer: Any) -> None:
    """torchao float8 weights and dynamic float8 activations on every base linear (LoRA matrices stay)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    def wanted(module: torch.nn.Module, name: str) -> bool:
        return (isinstance(module, torch.nn.Linear) and "lora_" not in name
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=wanted)


def compile_blocks(transformer: Any, backend: str = "inductor") -> int:
    """Compile each repeated block's forward with dynamic shapes; returns how many blocks."""
    import torch.fx.experimental._config as fx_config

    fx_config.use_duck_shape = False
    found = blocks(transformer)
    for block in found:
        block._genserve_eager = block.forward
        compiled = torch.compile(block.forward, fullgraph=True, dynamic=True, backend=backend)
        block.forward = block._genserve_compiled = _contiguous_inputs(compiled)
    return len(found)


def _contiguous_inputs(compiled: Any) -> Any:
    """Call `compiled` with every tensor argument in standard row-major strides (see `_dense`).

    A single-stream block returns its text and image parts as slices of the joint sequence, so
    every block but the first of its kind would get strided inputs, fail the first graph's stride
    guard and compile the block a second time (minutes with FP8). With one image per call the
    slices only need their batch stride restated (no copy); a batched call copies them (tens of MB
    per block at 1024x1024, microseconds on a GPU), far less than a recompilation.
    """

    def forward(*args: Any, **kwargs: Any) -> Any:
        return compiled(*(_dense(a) for a in args), **{k: _dense(v) for k, v in kwargs.items()})

    return forward


def _dense(value: Any) -> Any:
    """`value` as a non-view tensor with the standard row-major strides, copied only when it must be.

    A dimension of size 1 may carry any stride (``is_contiguous()`` ignores it, the compiled graph's
    guards do not), so such a stride is set to the standard one without a copy; a view is detached
    from its base, which the guards also inspect. Other layouts are copied.
    """
    if not isinstance(value, torch.Tensor):
        return value
    expected, step = [], 1
    for size in reversed(value.shape):
        expected.append(step)
        step *= max(size, 1)
    expected.reverse()
    stride = value.stride()
    if stride != tuple(expected):
        if any(s != e and n != 1 for s, e, n in zip(stride, expected, value.shape)):
            return value.clone(memory_format=torch.contiguous_format)
        value = value.as_strided(value.shape, expected, value.storage_offset())
    return value.detach() if value._base is not None else value


@contextlib.contextmanager
def eager_blocks(transformer: Any) -> Iterator[None]:
    """Run the blocks uncompiled for a while (a job whose extra LoRA layers would force recompilations).

    The step cache's hooks hold the forward they wrap, so they are removed first and again at the
    end; the next job installs them over the compiled forward.
    """
    found = [b for b in blocks(transformer) if hasattr(b, "_genserve_compiled")]
    if not found:
        yield
        return
    set_cache(transformer, False, 1.0)
    for block in found:
        block.forward = block._genserve_eager
    try:
        yield
    finally:
        try:
            set_cache(transformer, False, 1.0)
        finally:  # the compiled forwards come back even if removing the hooks failed
            for block in found:
                block.forward = block._genserve_compiled


def set_cache(transformer: Any, enabled: bool, threshold: float) -> None:
    """Install or remove First Block Cache hooks (a no-op when already in that state)."""
    from diffusers.hooks import FirstBlockCacheConfig

    active = getattr(transformer, "_genserve_cache", None)  # the installed hooks' threshold, or None
    wanted = threshold if enabled else None
    if wanted == active:
        return
    if active is not None:
        transformer._genserve_cache = "unknown"  # a failure below leaves a state the next call repairs
        transformer.disable_cache()
        transformer._genserve_cache = None
    if wanted is not None:
        transformer._genserve_cache = "unknown"
        try:
            transformer.enable_cache(FirstBlockCacheConfig(threshold=wanted))
        except Exception:
            transformer.disable_cache()  # diffusers may have registered some hooks before failing
            transformer._genserve_cache = None
            raise
    transformer._genserve_cache = wanted


@contextlib.contextmanager
def full_passes(transformer: Any) -> Iterator[list[int]]:
    """Count calls of the last block's own forward (inside the cache's hooks): passes the cache did not skip."""
    last = blocks(transformer)[-1]
    calls = [0]
    inner = last.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return inner(*args, **kwargs)

    last.forward = counted
    try:
        yield calls
    finally:
        if last.forward is counted:  # hooks installed meanwhile wrap `counted`: they stay, counting on
            last.forward = inner


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (a recompilation raises it)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def prepare(pipe: Any, options: SpeedOptions) -> None:
    """Apply the node's options to a new pipeline's transformer, once: slots, then FP8, then compile."""
    from gpu_node.lora_slots import LoraSlots

    transformer = getattr(pipe, "transformer", None)
    if transformer is None or getattr(transformer, "_genserve_prepared", False):
        return  # the redux prior has no transformer; a shared transformer is prepared once
    transformer.requires_grad_(False)  # inference only; a flag that flips later would fail compiled guards
    if options.lora_rank:
        LoraSlots(transformer, options.lora_rank)
    if options.quantize == "fp8":
        quantize_fp8(transformer)
    if options.compile:
        count = compile_blocks(transformer, options.compile_backend)
        log.info("compiling %d transformer blocks with %s (dynamic shapes)", count, options.compile_backend)
    transformer._genserve_prepared = True
