"""Nearest-neighbour 2x upsample then a 3x3 convolution, computed as one 2x2 convolution of the
low-resolution input (the sub-pixel form): the same function with 2.25x fewer multiply-adds.

The UNet's three upsamples and the VAE decoder's three use it; in the decoder they are ~28% of
the multiply-adds (its 3x3 convs at 128, 256 and 512 pixels after each upsample).

Derivation, in 1-D (the 2-D kernel is the outer product): up[y] = x[y // 2], so output row
2i + a of the 3x3 conv (taps w0, w1, w2 on up rows 2i+a-1, 2i+a, 2i+a+1) is

    a = 0:  w0 * x[i-1] + (w1 + w2) * x[i]
    a = 1:  (w0 + w1) * x[i] + w2 * x[i+1]

Each of the 4 output phases (a, b) is a 2x2 conv of x with summed taps. One conv with 4*C_out
output channels and padding 1 computes all four on an (h+1) x (w+1) grid, where grid position p
covers x rows p-1 and p; phase (a, b) is channel block 2a+b of the grid shifted by (a, b):

    x [B,C,h,w] -> grid [B,4C,h+1,w+1] -> y [B,C,2h,2w],  y[..., 2i+a, 2j+b] = grid[k=2a+b][..., i+a, j+b]

MACs per output channel and input channel: 36*h*w for interpolate + 3x3, 16*(h+1)*(w+1) here.
The summed taps change the floating-point rounding only (fp32: ~1e-5 of the output scale; tests).
The checkpoint's 3x3 weight stays the module's parameter (keys unchanged); the folded weight is
derived from it at the first call and kept (16/9 of that weight's memory), rebuilt after a load,
cast or move.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from batchsd.model.fast.packed_conv import KeepsDerivedWeight

# [phase a][tap p of the 2x2 kernel]: the rows (or columns) of the 3x3 kernel that tap sums
_TAPS = (((0,), (1, 2)), ((0, 1), (2,)))


def fold_weight(weight: torch.Tensor, bias: torch.Tensor | None,
                memory_format: torch.memory_format = torch.contiguous_format
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """3x3 conv weight [Co,Ci,3,3] (+ bias [Co]) -> the 2x2 weight [4*Co,Ci,2,2] of its four phases,
    block k = 2a + b (+ bias [4*Co]), in `memory_format`. Taps are summed in fp32 at least, then cast
    to the weight's dtype. Each of the 16 taps is written into its place: beside the result, at most
    one [Co,Ci] sum is alive (the fold runs at first use, when the peak RSS is made)."""
    co, ci = weight.shape[:2]
    acc = torch.promote_types(weight.dtype, torch.float32)
    w4 = torch.empty((4 * co, ci, 2, 2), dtype=weight.dtype, device=weight.device, memory_format=memory_format)
    for a in (0, 1):
        for b in (0, 1):
            block = w4[(2 * a + b) * co:(2 * a + b + 1) * co]
            for p, rows in enumerate(_TAPS[a]):
                for q, cols in enumerate(_TAPS[b]):
                    taps = [weight[:, :, y, x] for y in rows for x in cols]
                    total = taps[0].to(acc, copy=True)
                    for t in taps[1:]:
                        total += t
                    block[:, :, p, q] = total
    return w4, None if bias is None else bias.repeat(4)


def assemble_phases(grid: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """grid [B,4C,h+1,w+1] (phase blocks k = 2a + b) -> y [B,C,2h,2w] in `memory_format`."""
    b, c4, h1, w1 = grid.shape
    c, h, w = c4 // 4, h1 - 1, w1 - 1
    y = torch.empty((b, c, 2 * h, 2 * w), dtype=grid.dtype, device=grid.device, memory_format=memory_format)
    for a in (0, 1):
        for bb in (0, 1):
            k = 2 * a + bb
            y[:, :, a::2, bb::2] = grid[:, k * c:(k + 1) * c, a:a + h, bb:bb + w]
    return y


class NearestUpsampleConv(KeepsDerivedWeight, nn.Module):
    """x [B,C,h,w] -> conv3x3(nearest upsample of x to `size`) [B,C,H,W]; size defaults to (2h, 2w).

    Exactly 2x goes through the folded 2x2 conv (module docstring); any other size (the UNet's up
    path on latents whose side is not a multiple of 8) interpolates then convolves. `fold = False`
    (on the class) turns the folded path off, for benchmarks and tests.
    """

    fold = True

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        if not self.fold or (size is not None and tuple(size) != (2 * h, 2 * w)):
            up = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
            return self.conv(up)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        fmt = torch.channels_last if channels_last else torch.contiguous_format      # y's: that of x
        if torch.compiler.is_compiling():     # traced: the fold is part of the graph (inductor folds it)
            weight, bias = fold_weight(self.conv.weight, self.conv.bias)
            return assemble_phases(F.conv2d(x, weight, bias, padding=1), fmt)
        return assemble_phases(self.folded_conv()(x), fmt)

    def folded_conv(self) -> nn.Conv2d:
        """The 2x2 conv of the four phases, of the 3x3 conv's class (a PackedConv2d stays packed on
        the CPU); kept, not a submodule (packed_conv.KeepsDerivedWeight: again after a load, cast or move)."""
        if self.conv.weight is None:          # a PackedConv2d that the other path packed: plain again
            self.conv.unpack()
        return self.derived(self._fold, self.conv.weight, self.conv.bias)

    def _fold(self) -> nn.Conv2d:
        weight, bias = self.conv.weight, self.conv.bias
        fmt = torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format                              # the 3x3 weight's layout
        w4, b4 = fold_weight(weight, bias, fmt)
        conv = type(self.conv)(w4.shape[1], w4.shape[0], 2, padding=1, bias=bias is not None, device="meta")
        conv.weight = nn.Parameter(w4, requires_grad=False)
        if b4 is not None:
            conv.bias = nn.Parameter(b4, requires_grad=False)
        return conv
