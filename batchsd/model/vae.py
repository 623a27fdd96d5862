"""The SD 1.x VAE (AutoencoderKL), written to the original CompVis ldm layout.

Attribute paths equal the single-file checkpoint keys after `first_stage_model.`:
`encoder.down.{i}.block.{j}`, `encoder.mid.attn_1.q`, `decoder.up.{i}.upsample.conv`, ...
Level i counts from the full-resolution level (0) down to the lowest resolution (n-1) in both the
encoder and the decoder; the decoder runs its levels from up.{n-1} to up.0.

Shapes in comments use the SD 1.5 widths (base 128, mult (1,2,4,4), 4 latent channels) with an
image of H x W; nothing depends on them, the TINY preset runs through the same code.

No scaling factor in here: the pipeline multiplies latents by `cfg.scaling_factor` after `encode`
and divides before `decode`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from batchsd.model.config import VAEConfig
from batchsd.model.fast.upsample import NearestUpsampleConv


def group_norm(cfg: VAEConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=cfg.groups, num_channels=channels, eps=cfg.eps, affine=True)


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv3x3, twice, plus a shortcut (1x1 conv `nin_shortcut` when the width changes)."""

    def __init__(self, cfg: VAEConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(cfg, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(cfg, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,Cin,h,w] -> [B,Cout,h,w]
        h = self.conv1(F.silu(self.norm1(x), inplace=True))  # in place on the norm's fresh output
        h = self.conv2(F.silu(self.norm2(h), inplace=True))  # dropout is 0 in SD: nothing to do
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h.add_(shortcut)   # in place on conv2's fresh output


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, residual.

    q, k, v and proj_out are stored as 1x1 convolutions ([C,C,1,1]) as in the original checkpoint;
    they are applied as linear maps over the token axis (same arithmetic, one matmul each).
    Attention itself goes through scaled_dot_product_attention, which on CPU and GPU picks a
    memory-efficient kernel instead of materializing the (h*w)^2 score matrix.
    """

    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.norm = group_norm(cfg, channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    @staticmethod
    def _linear(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
        # a 1x1 conv [C_out,C_in,1,1] applied to tokens [B,N,C_in] -> [B,N,C_out]
        return F.linear(tokens, conv.weight.flatten(1), conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,C,h,w] -> [B,C,h,w]
        B, C, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B,h*w,C]
        q = self._linear(self.q, tokens).unsqueeze(1)  # [B,1,h*w,C]: one head of width C
        k = self._linear(self.k, tokens).unsqueeze(1)
        v = self._linear(self.v, tokens).unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, [B,1,h*w,C]
        out = self._linear(self.proj_out, out.squeeze(1))  # [B,h*w,C]
        return x + out.transpose(1, 2).reshape(B, C, h, w)


class Downsample(nn.Module):
    """Pad right and bottom by one, then a stride-2 3x3 conv without padding: [B,C,h,w] -> [B,C,h/2,w/2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # (left, right, top, bottom)
        return self.conv(x)


class Upsample(NearestUpsampleConv):
    """Nearest-neighbour x2 then the 3x3 conv `conv`: [B,C,h,w] -> [B,C,2h,2w], computed as one folded
    2x2 conv of [B,C,h,w] (fast/upsample.py)."""


class MidBlock(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution (keys mid.block_1/attn_1/block_2)."""

    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels)
        self.attn_1 = AttnBlock(cfg, channels)
        self.block_2 = ResnetBlock(cfg, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class EncoderLevel(nn.Module):
    """One resolution of the encoder: `block` (res_blocks ResnetBlocks), then `downsample` unless last."""

    def __init__(self, cfg: VAEConfig, in_channels: int, out_channels: int, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(cfg, in_channels if j == 0 else out_channels, out_channels) for j in range(cfg.res_blocks)
        )
        if downsample:
            self.downsample = Downsample(out_channels)
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class DecoderLevel(nn.Module):
    """One resolution of the decoder: `block` (res_blocks+1 ResnetBlocks), then `upsample` unless level 0."""

    def __init__(self, cfg: VAEConfig, in_channels: int, out_channels: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(cfg, in_channels if j == 0 else out_channels, out_channels)
            for j in range(cfg.res_blocks + 1)
        )
        if upsample:
            self.upsample = Upsample(out_channels)
        else:
            self.upsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """image [B,3,H,W] -> moments [B,2*latent,H/8,W/8] (mean and logvar, before quant_conv)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]  # [128,256,512,512]
        levels = len(widths)
        self.conv_in = nn.Conv2d(cfg.image_channels, widths[0], kernel_size=3, padding=1)
        self.down = nn.ModuleList(
            EncoderLevel(cfg, widths[max(i - 1, 0)], widths[i], downsample=i != levels - 1) for i in range(levels)
        )
        self.mid = MidBlock(cfg, widths[-1])
        self.norm_out = group_norm(cfg, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, kernel_size=3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(image)  # [B,128,H,W]
        for level in self.down:  # H -> H/2 -> H/4 -> H/8 (the last level keeps its size)
            x = level(x)
        x = self.mid(x)  # [B,512,H/8,W/8]
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))  # [B,8,H/8,W/8]


class Decoder(nn.Module):
    """latent [B,latent,h,w] (after post_quant_conv) -> image [B,3,8h,8w]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]  # [128,256,512,512]
        levels = len(widths)
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[-1], kernel_size=3, padding=1)
        self.mid = MidBlock(cfg, widths[-1])
        # up.{i} is built for level i; its input is the output of up.{i+1} (or of mid for the lowest level)
        self.up = nn.ModuleList(
            DecoderLevel(cfg, widths[min(i + 1, levels - 1)], widths[i], upsample=i != 0) for i in range(levels)
        )
        self.norm_out = group_norm(cfg, widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.image_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)  # [B,512,h,w]
        x = self.mid(x)
        for level in reversed(self.up):  # up.3 first: h -> 2h -> 4h -> 8h (up.0 keeps its size)
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))  # [B,3,8h,8w]


class AutoencoderKL(nn.Module):
    """The KL-regularized autoencoder of SD 1.x: image <-> latent, factor 2**(levels-1) per side."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, kernel_size=1)

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B,3,H,W] in [-1,1] -> (mean, logvar), each [B,4,H/8,W/8]; logvar clamped to [-30, 20]."""
        moments = self.quant_conv(self.encoder(image))  # [B,8,H/8,W/8]
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,4,h,w] (already divided by scaling_factor) -> image [B,3,8h,8w], about [-1,1]."""
        return self.decoder(self.post_quant_conv(z))
