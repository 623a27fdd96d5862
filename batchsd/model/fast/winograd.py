"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3), on the CPU: 2.25x fewer multiply-adds.

The output is cut into 2x2 tiles; each reads a 4x4 input tile d (stride 2). With the constant
matrices B (4x4), G (4x3), A (4x2) of Lavin & Gray (2015),

    y_tile = A^T [ (G g G^T) (.) (B^T d B) ] A        (.) elementwise over the 4x4 positions

and summed over input channels, position by position, that is 16 matrix products
[tiles, C_in] x [C_in, C_out] (one `bmm`) instead of 36 multiply-adds per output pixel and channel
pair. The input and output transforms are only additions (B and A hold 0 and +-1), and G's halves
are exact in binary: results differ from the direct convolution by rounding only, no more than the
direct convolution's own error against a float64 reference (tests/model/test_winograd.py).

Where it pays: the transforms cost memory passes in proportion to C * h * w, the products
C_in * C_out * h * w, so it wins on wide layers and loses to oneDNN's direct kernel on narrow ones.
Hence `use_winograd` takes only convolutions with at least `MIN_CHANNELS` input channels, and
`use_winograd_in_model` leaves out the UNet's lowest-resolution level, where the products are bound
by reading the weights (figures: docs/performance.md). Memory: the transformed weight is 16/9 of the
3x3 weight, kept beside it (the plain weight stays the exact checkpoint tensor).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from batchsd.model.fast.packed_conv import KeepsDerivedWeight, onednn_available, PackedConv2d

MIN_CHANNELS = 640          # input channels from which Winograd beats the direct kernel (docs/performance.md)

def _g_taps(t: list[torch.Tensor]) -> list[torch.Tensor]:
    """G (4x3, rows (1,0,0), (1/2,1/2,1/2), (1/2,-1/2,1/2), (0,0,1)) applied along one axis to its 3
    taps: (t0, (t0 + t1 + t2) / 2, (t0 - t1 + t2) / 2, t2). B^T and A^T are written out the same way."""
    outer = t[0] + t[2]
    return [t[0], (outer + t[1]).mul_(0.5), (outer - t[1]).mul_(0.5), t[2]]


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """[Co, Ci, 3, 3] -> U [16, Co, Ci] (position 4a + b of G g G^T), summed in fp32 at least.
    G goes along the kernel's rows, then along its columns; each position is written into its slot
    of U, so beside U only [Co, Ci] slices are alive, about one weight's worth in all. Pipeline
    builds every U at load (packed_conv.pack_now); a conv called before that builds its own."""
    co, ci = weight.shape[:2]
    acc = torch.promote_types(weight.dtype, torch.float32)
    u = torch.empty((16, co, ci), dtype=weight.dtype, device=weight.device)
    cols = [_g_taps([weight[:, :, y, x].to(acc) for y in range(3)]) for x in range(3)]   # [x][a]: [Co, Ci]
    for a in range(4):
        for b, tap in enumerate(_g_taps([cols[x][a] for x in range(3)])):
            u[4 * a + b].copy_(tap)
    return u


def _bt(r: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """B^T applied along one axis to its 4 taps: (d0 - d2, d1 + d2, d2 - d1, d1 - d3)."""
    return r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]


def winograd_conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(x, weight, bias, padding=1) for x [B, Ci, H, W] and u = transform_weight(weight):
    -> [B, Co, H, W], channels_last. Any H, W (odd sizes are padded to even, the extra row/column cut)."""
    b, ci, h, w = x.shape
    co = u.shape[1]
    h2, w2 = (h + 1) // 2, (w + 1) // 2                                   # tiles per column / row
    xh = x.permute(0, 2, 3, 1)                                            # [B, H, W, Ci] (a view if NHWC)
    xp = F.pad(xh, (0, 0, 1, 1 + w % 2, 1, 1 + h % 2))                    # [B, 2*h2+2, 2*w2+2, Ci]
    rows = _bt([xp[:, k:k + 2 * h2:2] for k in range(4)])                 # 4 x [B, h2, 2*w2+2, Ci]
    v = x.new_empty((4, 4, b, h2, w2, ci))
    for a, r in enumerate(rows):                                          # B^T along the columns
        cols = [r[:, :, k:k + 2 * w2:2] for k in range(4)]
        torch.sub(cols[0], cols[2], out=v[a, 0])
        torch.add(cols[1], cols[2], out=v[a, 1])
        torch.sub(cols[2], cols[1], out=v[a, 2])
        torch.sub(cols[1], cols[3], out=v[a, 3])
    m = torch.bmm(v.view(16, b * h2 * w2, ci), u.transpose(1, 2)).view(4, 4, b, h2, w2, co)   # 16 products
    y = x.new_empty((b, 2 * h2, 2 * w2, co))                              # A^T . A, then + bias
    for a, r in enumerate((m[0] + m[1] + m[2], m[1] - m[2] - m[3])):      # A^T along the rows
        for c, out in enumerate((r[0] + r[1] + r[2], r[1] - r[2] - r[3])):  # and the columns
            if bias is not None:
                out = out.add_(bias)
            y[:, a::2, c::2] = out
    if h % 2 or w % 2:
        y = y[:, :h, :w].contiguous()
    return y.permute(0, 3, 1, 2)                                          # [B, Co, H, W], NHWC in memory


class WinogradConv2d(KeepsDerivedWeight, PackedConv2d):
    """A PackedConv2d (same attributes and state dict) that `use_winograd` marked: its calls on CPU
    float inputs go through `winograd_conv3x3`, whatever the shape (so a row's result never depends
    on what ran before it). Unmarked instances (e.g. a folded upsample conv derived from a marked
    one, fast/upsample.py) take PackedConv2d's path; under torch.compile or off the CPU, the plain
    nn.Conv2d path."""

    winograd = False                                          # set by use_winograd on eligible convs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.winograd:
            return super().forward(x)
        if x.device.type != "cpu" or torch.compiler.is_compiling() or self.weight.dtype != x.dtype:
            return nn.Conv2d.forward(self, x)
        return winograd_conv3x3(x, self.transformed_weight(), self.bias)

    def transformed_weight(self) -> torch.Tensor:
        """U of the current weight (packed_conv.KeepsDerivedWeight: again after a load, cast or move)."""
        return self.derived(lambda: transform_weight(self.weight), self.weight)


def winograd_eligible(conv: nn.Module, min_channels: int = MIN_CHANNELS) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and conv.in_channels >= min_channels)


def use_winograd(module: nn.Module, min_channels: int = MIN_CHANNELS) -> int:
    """Turn every eligible plain (or packed) nn.Conv2d inside `module` into a WinogradConv2d in place
    (attribute paths and checkpoint keys unchanged); returns how many."""
    if not onednn_available():
        return 0
    count = 0
    for m in module.modules():
        if type(m) in (nn.Conv2d, PackedConv2d) and winograd_eligible(m, min_channels):
            if isinstance(m, PackedConv2d):
                m.unpack()
            m.__class__ = WinogradConv2d
            m.winograd = True
            count += 1
    return count


def use_winograd_in_model(model: nn.Module, min_channels: int = MIN_CHANNELS) -> int:
    """The rule `Pipeline` applies: `use_winograd` on the UNet's blocks above its lowest resolution
    level, and on the VAE; returns how many convs. The lowest level (1/8 of the latent's side, the
    middle block among them) is left direct: its maps are so small (4x4 at 512x512 images) that the
    products are bound by reading the transformed weights, which are 16/9 of the plain ones; leaving
    it out costs little speed and about halves the transformed weights' memory (figures:
    docs/performance.md). A fixed property of the model, so a row's result does not depend on the
    batch it ran in."""
    lowest = len(model.unet.cfg.channel_mult) - 1
    unet = sum(use_winograd(block, min_channels) for level, block in model.unet.blocks_by_level() if level < lowest)
    return unet + use_winograd(model.vae, min_channels)
