"""The UNet's GEGLU (unet.GEGLU: value * gelu(gate), the two halves of one linear's output) as two
oneDNN linears that do the elementwise work in their epilogues: gelu on the gate linear's
accumulators, the product with that on the value linear's. Neither the 2*inner-wide projection nor
gelu's output makes a separate pass through memory, and torch's bf16 gelu, which is slow on the
CPU, is not called.

Rounding: torch's path rounds the projection to bf16, then gelu's output, then the product; this one
computes gelu (erf) on the fp32 accumulators and rounds the gate once, then the product once. Not
the same bits; no less accurate (tests/model/test_fused_geglu.py measures both against float64).
The op is torch.ops.mkldnn._linear_pointwise, the one torch's inductor fuses linears into on the CPU.
`auto` uses it on CPUs with AMX in bf16 (devices.default_fused_geglu), where it was measured.
"""
from __future__ import annotations

import torch
from torch import nn


def available() -> bool:
    """Whether this torch build has oneDNN's fused linear (CPU builds with mkldnn do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def fused_geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """value * gelu(gate) for x [..., C], weight [2I, C] (value rows, then gate rows), bias [2I] -> [..., I]."""
    inner = weight.shape[0] // 2
    # row slices of a contiguous weight are contiguous: no copy
    gate = torch.ops.mkldnn._linear_pointwise(x, weight[inner:], bias[inner:], "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise.binary(x, gate, weight[:inner], bias[:inner], "mul")


def use_fused_geglu(unet: nn.Module) -> int:
    """Marks every GEGLU of `unet` (modules with a `fused_epilogue` attribute) to run `fused_geglu`;
    returns how many."""
    if not available():
        raise RuntimeError("this torch build has no oneDNN fused linear (torch.ops.mkldnn._linear_pointwise)")
    marked = 0
    for m in unet.modules():
        if hasattr(m, "fused_epilogue"):
            m.fused_epilogue = True
            marked += 1
    return marked
