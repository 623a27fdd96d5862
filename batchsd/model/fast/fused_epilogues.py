"""Elementwise work of the UNet's transformer blocks done in the epilogues of oneDNN linears
(torch.ops.mkldnn._linear_pointwise, the op torch's inductor fuses linears into on the CPU), so that
it makes no separate pass through memory:

- the GEGLU (unet.GEGLU: value * gelu(gate), the two halves of one linear's output) as two linears:
  gelu on the gate linear's accumulators, the product with that on the value linear's. The
  2*inner-wide projection is never written, and torch's bf16 gelu, slow on the CPU, is not called;
- the residual adds after each sublayer's output linear (attention's to_out, the feed-forward's
  last linear) and after the transformer's proj_out (`linear_add`).

Rounding: torch's ops round each linear's output to the dtype, then gelu's, then the product or
the sum; here gelu (erf), the product and the sum are computed on the fp32 accumulators and
rounded once. Not the same bits; as accurate (tests/model/test_fused_epilogues.py measures
both against float64). `auto` uses them on CPUs with AMX in bf16 (devices.default_fused_epilogues),
where they were measured (docs/performance.md).

A linear with a forward hook (a LoRA's side path, lora.py, adds to the output of the module's call)
is called as a module instead (`hooked`), so that its hook runs; weights a LoRA swaps for the
owner's call (proj_out) are read as the owner reads them, and merged LoRAs are in the weights.
"""
from __future__ import annotations

import torch
from torch import nn


def available() -> bool:
    """Whether this torch build has oneDNN's fused linear (CPU builds with mkldnn do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def hooked(module: nn.Module) -> bool:
    """Whether `module` has forward hooks (a LoRA's side path): then it must be called, not bypassed."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def fused_geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """value * gelu(gate) for x [..., C], weight [2I, C] (value rows, then gate rows), bias [2I] -> [..., I]."""
    inner = weight.shape[0] // 2
    # row slices of a contiguous weight are contiguous: no copy
    gate = torch.ops.mkldnn._linear_pointwise(x, weight[inner:], bias[inner:], "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise.binary(x, gate, weight[:inner], bias[:inner], "mul")


def linear_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """x @ weight.T + bias + residual, for x [..., C], weight [D, C], residual [..., D] -> a new [..., D]."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")


def add_after(linear: nn.Linear, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """linear(x) + residual: in the linear's epilogue, or, where a forward hook is on it (`hooked`), by
    calling the module and adding after it (torch's ops, so its hook runs)."""
    if hooked(linear):
        return linear(x).add_(residual)
    return linear_add(x, linear.weight, linear.bias, residual)


def use_fused_epilogues(unet: nn.Module) -> int:
    """Marks every module of `unet` with a `fused_epilogue` attribute (unet.GEGLU,
    BasicTransformerBlock, SpatialTransformer) to run these; returns how many."""
    if not available():
        raise RuntimeError("this torch build has no oneDNN fused linear (torch.ops.mkldnn._linear_pointwise)")
    marked = [m for m in unet.modules() if hasattr(m, "fused_epilogue")]
    for m in marked:
        m.fused_epilogue = True
    return len(marked)
