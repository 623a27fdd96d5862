"""The Stable Diffusion 1.x and 2.x denoising UNet, written from scratch.

Module attribute paths equal the original CompVis checkpoint keys below `model.diffusion_model.`
(`time_embed`, `input_blocks`, `middle_block`, `output_blocks`, `out`), so a single-file checkpoint
loads by prefix strip + strict `load_state_dict`. The topology comes from `UNetConfig` alone:
one level per entry of `channel_mult`, `res_blocks` res blocks per level on the way down
(`res_blocks + 1` on the way up, each joining one skip connection), a spatial transformer after each
res block on `attention_levels` and in the middle block (`depth_at(level)` transformer blocks each),
a stride-2 downsample after every level but the last and a nearest-neighbour upsample after every level but the first on the way up.

Layout notes: every op here works on NCHW tensors of either memory format. The transformer moves
to token layout with permute + reshape (a free view for channels_last inputs) and applies its 1x1
`proj_in`/`proj_out` convolutions as matmuls on the [B, h*w, C] tokens; its output goes back as a
channels_last-strided view, so no `.contiguous()` is needed anywhere.

SDXL is the same network with 3 levels, deeper transformers (0/2/10 blocks per level, 10 in the
middle) and `label_emb`: an MLP of a conditioning vector y (pooled text + size/crop embeddings, built
by the family) added to the time embedding.

SD 2.x is the same network under other `UNetConfig` fields: `linear_proj` (Linear [C, C] proj_in /
proj_out, CompVis `use_linear_in_transformer`; the same matmul on the same tokens), `head_channels`
64 (heads = channels / 64) and a 1024-wide context. The 768-v UNet's `upcast_attention` needs no
field: diffusers' default attention processor (AttnProcessor2_0) calls
F.scaled_dot_product_attention in the compute dtype whatever that flag says (only the legacy
AttnProcessor upcasts q and k), and so does CrossAttention here; SDPA's fused kernels keep the
softmax in fp32 for fp16/bf16 inputs anyway.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from batchsd.model.config import UNetConfig
from batchsd.model.fast.fused_attention import fused_attention, supports
from batchsd.model.fast.fused_epilogues import add_after, fused_geglu, hooked, linear_add
from batchsd.model.fast.upsample import NearestUpsampleConv

# The GroupNorm in front of each spatial transformer uses eps 1e-6 in SD 1.x (CompVis Normalize()
# and diffusers Transformer2DModel); the res blocks and the output norm use cfg.eps (1e-5).
TRANSFORMER_GROUPNORM_EPS = 1e-6


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (possibly fractional) timesteps: [B] -> float32 [B, dim].

    Same as CompVis `timestep_embedding` and diffusers `Timesteps(flip_sin_to_cos=True,
    downscale_freq_shift=0)`: freqs_i = exp(-ln(max_period) * i / (dim/2)), i < dim/2.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / half)                                  # [half]
    args = timesteps[:, None].float() * freqs[None, :]                  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)         # [B, 2*half]
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding, GroupNorm-SiLU-conv, + (1x1-projected) input."""

    def __init__(self, cfg: UNetConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(cfg.groups, in_channels, eps=cfg.eps),
            nn.SiLU(inplace=True),  # on the GroupNorm's fresh output (in place: one buffer less, same values)
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(cfg.time_embed_dim, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(cfg.groups, out_channels, eps=cfg.eps),
            nn.SiLU(inplace=True),
            nn.Identity(),  # dropout in training; keeps the checkpoint index of the conv at 3
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if in_channels == out_channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: [B, Cin, h, w], emb: [B, time_embed_dim] -> [B, Cout, h, w]
        h = self.in_layers(x)
        h = h.add_(self.emb_layers(emb)[:, :, None, None])   # in place on the conv's fresh output
        h = self.out_layers(h)
        return h.add_(self.skip_connection(x))   # the conv's fresh output, in the layout the convs give


class CrossAttention(nn.Module):
    """Multi-head attention of x tokens over context tokens (self-attention when context is None).
    `fused` (set by fast/fused_attention.use_fused_attention): the products go through the fused bf16
    kernel where it takes the call, else through F.scaled_dot_product_attention."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.fused = False
        # id(context) -> (context, k, v) while fast/context_projections.reuse_context_projections holds
        self.context_cache: dict | None = None
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))  # index 1 was dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, N, dim], context: [B, M, context_dim] -> [B, N, dim] (+ residual [B, N, dim], added in
        # to_out's epilogue: fast/fused_epilogues.py)
        B, N, C = x.shape
        q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)        # [B, heads, N, d]
        if context is None or self.context_cache is None:
            k, v = self._keys_values(x if context is None else context)
        else:   # the text context, the same tensor at every step: its projections kept (context_projections.py)
            kept = self.context_cache.get(id(context))
            if kept is None or kept[0] is not context:
                kept = self.context_cache[id(context)] = (context, *self._keys_values(context))
            k, v = kept[1], kept[2]
        if self.fused and supports(q, k, v):
            h = fused_attention(q, k, v)                                   # [B, heads, N, d]
        else:
            h = F.scaled_dot_product_attention(q, k, v)                    # [B, heads, N, d]
        h = h.transpose(1, 2).reshape(B, N, C)
        return self.to_out(h) if residual is None else add_after(self.to_out[0], h, residual)

    def _keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # context: [B, M, context_dim] -> k, v: [B, heads, M, d]
        B, M = context.shape[:2]
        k = self.to_k(context).view(B, M, self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(B, M, self.heads, -1).transpose(1, 2)
        return k, v


class GEGLU(nn.Module):
    """Linear to 2*inner, split into value and gate: value * gelu(gate)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim * 2)
        self.fused_epilogue = False   # fast/fused_epilogues.py: gelu and the product in oneDNN linears

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_epilogue and not hooked(self.proj):
            return fused_geglu(x, self.proj.weight, self.proj.bias)
        value, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(value)   # gelu's fresh output multiplied in place: the same values


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # net.0 GEGLU, net.1 dropout, net.2 linear (checkpoint indices)
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        # residual: added in the last linear's epilogue (fast/fused_epilogues.py)
        return self.net(x) if residual is None else add_after(self.net[2], self.net[0](x), residual)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the text context, GEGLU feed-forward."""

    def __init__(self, cfg: UNetConfig, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=cfg.transformer_eps)
        heads = cfg.heads_at(dim)
        self.attn1 = CrossAttention(dim, dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.transformer_eps)
        self.attn2 = CrossAttention(dim, cfg.context_dim, heads)
        self.norm3 = nn.LayerNorm(dim, eps=cfg.transformer_eps)
        self.ff = FeedForward(dim)
        self.fused_epilogue = False   # fast/fused_epilogues.py: residuals added in the output linears

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: [B, N, dim], context: [B, M, context_dim]
        if self.fused_epilogue:
            x = self.attn1(self.norm1(x), residual=x)
            x = self.attn2(self.norm2(x), context, residual=x)
            return self.ff(self.norm3(x), residual=x)
        # residuals added in place to each sublayer's fresh output (x + h == h + x, one buffer less)
        x = self.attn1(self.norm1(x)).add_(x)
        x = self.attn2(self.norm2(x), context).add_(x)
        x = self.ff(self.norm3(x)).add_(x)
        return x


class SpatialTransformer(nn.Module):
    """GroupNorm, proj_in, transformer block(s) over the h*w tokens, proj_out, + input. proj_in and
    proj_out are 1x1 convolutions (SD 1.x) or Linear layers (cfg.linear_proj, SD 2.x): either way one
    matmul over the tokens, applied after the GroupNorm's move to token layout."""

    def __init__(self, cfg: UNetConfig, channels: int, depth: int):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.groups, channels, eps=TRANSFORMER_GROUPNORM_EPS)
        proj = (lambda: nn.Linear(channels, channels)) if cfg.linear_proj else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(cfg, channels) for _ in range(depth))
        self.proj_out = proj()
        self.fused_epilogue = False   # fast/fused_epilogues.py: the input added in proj_out's epilogue

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: [B, C, h, w], context: [B, M, context_dim] -> [B, C, h, w]
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)         # tokens [B, h*w, C]
        h = F.linear(h, self.proj_in.weight.view(C, C), self.proj_in.bias)  # 1x1 conv as matmul
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.fused_epilogue and x.is_contiguous(memory_format=torch.channels_last):
            tokens = x.permute(0, 2, 3, 1).reshape(B, H * W, C)              # a view of x's NHWC memory
            h = linear_add(h, self.proj_out.weight.view(C, C), self.proj_out.bias, tokens)
            return h.view(B, H, W, C).permute(0, 3, 1, 2)                     # [B, C, h, w] channels_last
        h = F.linear(h, self.proj_out.weight.view(C, C), self.proj_out.bias)
        h = h.view(B, H, W, C).permute(0, 3, 1, 2)                          # [B, C, h, w] channels_last view
        return x + h  # x first: the sum takes x's memory format (NCHW in, NCHW out)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (padding 1): h -> ceil(h/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(NearestUpsampleConv):
    """Nearest-neighbour resize to the size of the skip connection it joins, then 3x3 conv `conv`
    (as one folded 2x2 conv when that size is exactly 2x: fast/upsample.py)."""


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers that routes the time embedding, the context and the upsample size."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                upsample_size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        levels = len(cfg.channel_mult)

        self.time_embed = nn.Sequential(
            nn.Linear(mc, cfg.time_embed_dim), nn.SiLU(), nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim)
        )
        if cfg.adm_in_channels:
            # CompVis num_classes="sequential": label_emb.0 is the MLP (keys label_emb.0.0, label_emb.0.2)
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(cfg.adm_in_channels, cfg.time_embed_dim), nn.SiLU(),
                nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim)))

        # down path; skip_channels records the channels of every skip connection, in push order
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        self.input_levels = [0]           # resolution level (0: the latent's, levels-1: the lowest) per block
        skip_channels = [mc]
        ch = mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.res_blocks):
                layers = [ResBlock(cfg, ch, mc * mult)]
                ch = mc * mult
                if cfg.depth_at(level):
                    layers.append(SpatialTransformer(cfg, ch, cfg.depth_at(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.input_levels.append(level)
                skip_channels.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                self.input_levels.append(level)
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(cfg, ch, ch), SpatialTransformer(cfg, ch, cfg.middle_transformer_depth), ResBlock(cfg, ch, ch)
        )

        # up path: each block concatenates one skip connection (popped in reverse order)
        self.output_blocks = nn.ModuleList()
        self.output_levels = []           # the level a block runs at (its upsample, if any, leads to level-1)
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.res_blocks + 1):
                layers = [ResBlock(cfg, ch + skip_channels.pop(), mc * mult)]
                ch = mc * mult
                if cfg.depth_at(level):
                    layers.append(SpatialTransformer(cfg, ch, cfg.depth_at(level)))
                if level != 0 and i == cfg.res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self.output_levels.append(level)

        self.out = nn.Sequential(
            nn.GroupNorm(cfg.groups, ch, eps=cfg.eps), nn.SiLU(inplace=True), nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        )

    def blocks_by_level(self) -> list[tuple[int, nn.Module]]:
        """(resolution level, block) for every input block, the middle block and every output block:
        level l runs at 1/2^l of the latent's side (the middle block at the lowest, levels-1)."""
        return (list(zip(self.input_levels, self.input_blocks)) + [(len(self.cfg.channel_mult) - 1, self.middle_block)]
                + list(zip(self.output_levels, self.output_blocks)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, in_channels, h, w] (any h, w >= 1), timesteps: float [B] (or a scalar),
        # context: [B, M, context_dim], y: [B, adm_in_channels] when cfg.adm_in_channels
        # -> eps: [B, out_channels, h, w]
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.cfg.model_channels).to(x.dtype)  # [B, mc]
        emb = self.time_embed(t_emb)                                               # [B, 4*mc]
        if self.cfg.adm_in_channels:
            if y is None or y.shape != (x.shape[0], self.cfg.adm_in_channels):
                raise ValueError(f"this UNet needs y [{x.shape[0]}, {self.cfg.adm_in_channels}], got "
                                 f"{None if y is None else tuple(y.shape)}")
            emb = emb + self.label_emb(y.to(emb.dtype))                            # [B, 4*mc]

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # an upsample (last block of a level) resizes to the next skip connection's size
            upsample_size = tuple(skips[-1].shape[-2:]) if skips else None
            h = block(h, emb, context, upsample_size)
        return self.out(h)
