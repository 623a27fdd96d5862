"""Convolutions whose weights are reordered once, not on every call, on the CPU: `PackedConv2d`.

Eager PyTorch reorders each convolution's weight into oneDNN's blocked layout on every call, and
for large fp32 weights each reorder also costs fresh zeroed pages. `pack_convolutions` turns the
convolutions of a module into `PackedConv2d`, which keeps the weight in that layout after its first
call (for that input's shape): the same kernels on the same data, so the same results
(bit-identical for channels_last inputs; tests/model/test_runtime.py). `pack_now` packs the large
ones at load instead, largest first, so that each packed copy reuses the pages a plain weight has
just freed rather than fresh ones (Pipeline does this; figures: docs/performance.md).

`KeepsDerivedWeight`, the mixin of modules that keep a tensor computed from their own weights
(Winograd-transformed, upsample-folded), lives here too: PackedConv2d and those modules combine.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from batchsd.model.fast.allocator import release_free_memory


def onednn_available() -> bool:
    """Whether this torch has the oneDNN (mkldnn) convolution ops that PackedConv2d uses."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class KeepsDerivedWeight:
    """Mixin for modules that keep a tensor computed from their own weights (a folded or transformed
    copy; not in the state dict): `derived(build, *tensors)` returns it, built again when the tensors
    are other tensors than last time; `.to()`/casts and `load_state_dict` (which writes in place)
    drop it. (Writing into a weight in place by hand is not seen.)"""

    _derived: tuple | None = None           # (identity of the tensors it was built from, the result)

    def derived(self, build, *tensors: torch.Tensor | None):
        key = tuple((id(t), t.data_ptr(), t.dtype, t.device) for t in tensors if t is not None)
        if self._derived is None or self._derived[0] != key:
            self._derived = None                                  # free the old one first
            with torch.no_grad():
                self._derived = (key, build())
        return self._derived[1]

    def _load_from_state_dict(self, *args, **kwargs):
        self._derived = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._derived = None
        return super()._apply(fn, recurse)


class PackedConv2d(nn.Conv2d):
    """An nn.Conv2d (same attributes, same state dict) whose weight, on the CPU, is kept in oneDNN's
    blocked layout after its first call instead of being reordered on every call.

    The plain weight is dropped once packed (no second copy in memory) and rebuilt exactly
    (`to_dense`) when the module is moved or cast (`.to()`), or its state dict is read; it is packed
    again at the next call. Inputs other than CPU float tensors take nn.Conv2d's path. The output is
    channels_last (oneDNN's native layout), which every op of the models accepts.
    """

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.padding_mode != "zeros":
            return super().forward(x)
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous(memory_format=torch.channels_last)  # oneDNN reads NCHW or NHWC strides only
        if self.packed is None:
            if self.weight.dtype != x.dtype:
                return super().forward(x)     # let nn.Conv2d raise its dtype error
            self.pack(x.shape)
            release_free_memory()             # the plain weight's pages, not kept for reuse (RSS)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.packed, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "none", [], "")

    def pack(self, input_shape: Sequence[int]) -> None:
        """Reorder the weight into oneDNN's blocked layout for inputs of `input_shape` [B, C, H, W] and
        drop the plain one (forward does this at the first call, for that call's shape)."""
        self.packed = torch.ops.mkldnn._reorder_convolution_weight(
            self.weight.detach(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
            list(input_shape))
        self.weight = None

    def unpack(self) -> None:
        """Back to a plain weight Parameter (exactly the one packed)."""
        if self.packed is not None:
            self.weight = nn.Parameter(self.packed.to_dense(), requires_grad=False)
            self.packed = None

    def _apply(self, fn, recurse=True):
        self.unpack()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.unpack()
        super()._save_to_state_dict(destination, prefix, keep_vars)


def pack_convolutions(module: nn.Module) -> int:
    """Turn every plain nn.Conv2d inside `module` into a PackedConv2d in place (attribute paths and
    checkpoint keys unchanged); returns how many. Convolutions whose weight other code reads directly
    (1x1 projections applied as matmuls) keep working: a module that is never called is never packed."""
    if not onednn_available():
        return 0
    count = 0
    for m in module.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = PackedConv2d
            count += 1
    return count


def pack_now(*modules: nn.Module, input_hw: tuple[int, int] = (64, 64)) -> int:
    """Prepare now, largest weight first, the PackedConv2d inside `modules` that forward calls as
    convolutions: the 3x3 ones are packed, or, where Winograd marked them (fast/winograd.py), their
    transformed weight is built; and the folded 2x2 conv of each upsample
    (fast.upsample.NearestUpsampleConv, built here) is packed, whose own 3x3 conv is only folded. The
    1x1 ones stay to their first call (some modules read those weights as matrices). Then the freed
    pages go back once; returns how many.

    Why (start-up): packing at the first call, in forward order, writes every packed copy into fresh
    pages, since the weights grow along the UNet's encoder and no weight freed before fits the next
    one. Largest first, each copy mostly lands in memory that a plain weight freed just before. The
    Winograd transforms' fp32 temporaries reuse one another's pages here, where at the first call
    the 1x1 convs' packing (which gives freed pages back) sat between them. A weight packed for one
    input size gives the same output bits at other sizes and batches, at the same speed, so
    `input_hw` is a nominal shape (figures: docs/performance.md)."""
    if not onednn_available():
        return 0
    convs: list[nn.Module] = []
    folded_from: set[int] = set()
    for m in (m for module in modules for m in module.modules()):
        if hasattr(m, "folded_conv"):                        # its own conv is folded, never called
            folded_from.add(id(m.conv))
            if isinstance(m.conv, PackedConv2d):
                convs.append(m.folded_conv())
        elif isinstance(m, PackedConv2d) and m.kernel_size != (1, 1):
            convs.append(m)
    convs = [c for c in convs if isinstance(c, PackedConv2d) and id(c) not in folded_from
             and c.packed is None and c.weight is not None and c.weight.device.type == "cpu"]
    for conv in sorted(convs, key=lambda c: c.weight.numel(), reverse=True):
        if getattr(conv, "winograd", False):
            conv.transformed_weight()                     # kept by the conv (KeepsDerivedWeight)
        else:
            conv.pack((1, conv.in_channels, *input_hw))
    release_free_memory()
    return len(convs)
