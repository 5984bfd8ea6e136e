"""Which operators the compiled FP8 blocks run, in the node's order and in the other one (CPU, no GPU needed).

    pip install torchao==0.17.0      # not a test dependency: the 'fp8' extra
    python -m bench.fp8_graphs

Real Flux blocks (two double, two single, full head width, narrow), quantized by
`gpu_node.speed.quantize_fp8` and compiled by `compile_blocks` either way round: quantize then
compile (the node's order), or compile, run, then quantize in place (the order of the H200
run). The graphs AOT autograd hands the compiler are counted by operator. torchao refuses
float8 without a float8 GPU, so its hardware check is bypassed: only the graphs are compared,
nothing is timed.
"""

from __future__ import annotations

import collections
import sys
from typing import Any

import torch


def counts(order: str) -> collections.Counter:
    """Operator -> calls in the compiled graphs, for `order` "node" or "inplace"."""
    import torchao.float8.inference as inference
    import torchao.quantization.quant_api as quant_api
    from diffusers import FluxTransformer2DModel
    from torch._dynamo.backends.common import aot_autograd

    from gpu_node import speed

    inference._check_hardware_support = quant_api._check_hardware_support = lambda granularity: None
    ops: collections.Counter = collections.Counter()

    def compiler(gm: torch.fx.GraphModule, inputs: Any) -> Any:
        for node in gm.graph.nodes:
            if node.op == "call_function" and "sym_" not in str(node.target):
                ops[str(node.target)] += 1
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, out_channels=64, num_layers=2, num_single_layers=2,
                                   attention_head_dim=128, num_attention_heads=2, joint_attention_dim=256,
                                   pooled_projection_dim=64, guidance_embeds=True,
                                   axes_dims_rope=(16, 56, 56)).to(torch.bfloat16).requires_grad_(False)

    def forward() -> None:
        with torch.no_grad():
            model(hidden_states=torch.randn(1, 32, 64, dtype=torch.bfloat16),
                  encoder_hidden_states=torch.randn(1, 16, 256, dtype=torch.bfloat16),
                  pooled_projections=torch.randn(1, 64, dtype=torch.bfloat16), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(32, 3), txt_ids=torch.zeros(16, 3), guidance=torch.tensor([3.5]))

    backend = aot_autograd(fw_compiler=compiler)
    if order == "node":
        speed.quantize_fp8(model)
        speed.compile_blocks(model, backend)
    else:
        speed.compile_blocks(model, backend)
        forward()
        ops.clear()
        speed.quantize_fp8(model)
    forward()
    return ops


def main() -> int:
    """Print both orders' operator counts and whether they are the same."""
    node, inplace = counts("node"), counts("inplace")
    for op in sorted(set(node) | set(inplace)):
        print(f"{node[op]:4d} {inplace[op]:4d}  {op}")
    same = node == inplace
    print(f"node order vs in place: {'the same graphs' if same else 'DIFFERENT graphs'}; "
          f"{node['aten._scaled_mm.default']} float8 matmuls, "
          f"{sum(node[k] for k in ('aten.mm.default', 'aten.addmm.default', 'aten.bmm.default'))} other matmuls")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
