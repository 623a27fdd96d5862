"""Frozen model configurations: the SD 1.x, SD 2.x and SDXL shapes and a tiny preset with the SD 1.x topology.

Every model module takes its config dataclass whole; nothing about widths is hard-coded in the
modules. `tiny` keeps the SD 1.x topology (4 UNet levels, 2 res blocks, attention on the first
3 levels and the middle block, 4 VAE levels) with small widths, for tests and dry runs.

SD 2.x (`SD21`) differs from SD 1.x by configuration only, besides its text encoder's module layout
(OpenCLIP, openclip.py): a GELU (not QuickGELU) text encoder of width 1024 read after 23 of its 24
blocks, a UNet with linear `proj_in`/`proj_out`, 64-wide attention heads and a 1024-wide context.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768           # hidden size
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072      # MLP hidden width
    eps: float = 1e-5          # LayerNorm eps
    act: str = "quick_gelu"    # MLP activation: "quick_gelu" (CLIP ViT-L, SD 1.x) or "gelu" (OpenCLIP, SD 2.x)
    # the model's output is final_layer_norm/ln_final of the last block run (SD 1.x, SD 2.x); False: the
    # last block's raw output (SDXL reads both encoders' penultimate hidden states, before any final norm)
    final_norm: bool = True
    projection_dim: int = 0    # > 0: a pooled, projected output too (SDXL's OpenCLIP ViT-bigG `text_projection`)


@dataclass(frozen=True)
class VAEConfig:
    image_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)   # one level each; 3 downsamples -> factor 8
    res_blocks: int = 2
    groups: int = 32
    eps: float = 1e-6          # GroupNorm eps (the VAE uses 1e-6, the UNet 1e-5)
    scaling_factor: float = 0.18215
    # fp16 overflows in this VAE (SDXL's): it runs in fp32 when the model's dtype is fp16 (diffusers'
    # `force_upcast`; a fixed fp16 VAE's folder config says false)
    force_upcast: bool = False


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels with a spatial transformer (+ middle)
    # transformer blocks in each spatial transformer, per level (empty: 1 on every attention level;
    # SDXL: (0, 2, 10)), and in the middle block's
    transformer_depth: tuple[int, ...] = ()
    middle_transformer_depth: int = 1
    adm_in_channels: int = 0   # > 0: `label_emb` adds a projection of a [B, adm_in_channels] vector y to the
                               # time embedding (SDXL: pooled text + size/crop embeddings, 2816)
    heads: int = 8             # attention heads of every spatial transformer (when head_channels is 0)
    head_channels: int = 0     # > 0: heads of width head_channels instead, channels // head_channels (SD 2.x: 64)
    linear_proj: bool = False  # proj_in/proj_out are Linear [C, C] (SD 2.x) instead of 1x1 convolutions
    context_dim: int = 768     # text-state width (CLIP width)
    groups: int = 32
    eps: float = 1e-5          # GroupNorm eps
    transformer_eps: float = 1e-5  # LayerNorm eps inside transformer blocks; transformer GroupNorm uses 1e-6

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def depth_at(self, level: int) -> int:
        """Transformer blocks of each spatial transformer at `level` (0: none there)."""
        if level not in self.attention_levels:
            return 0
        return self.transformer_depth[level] if self.transformer_depth else 1

    def heads_at(self, channels: int) -> int:
        """Attention heads of a spatial transformer of `channels` channels."""
        if self.head_channels:
            if channels % self.head_channels:
                raise ValueError(f"{channels} channels are not a multiple of {self.head_channels}-wide heads")
            return channels // self.head_channels
        return self.heads


@dataclass(frozen=True)
class SDConfig:
    name: str
    clip: CLIPTextConfig
    vae: VAEConfig
    unet: UNetConfig
    clip2: CLIPTextConfig | None = None   # the second text encoder (SDXL's OpenCLIP ViT-bigG), if any

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.channel_mult) - 1)


SD15 = SDConfig("sd15", CLIPTextConfig(), VAEConfig(), UNetConfig())

TINY = SDConfig(
    "tiny",
    CLIPTextConfig(width=64, layers=2, heads=4, mlp_width=256),
    VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 2)),
    UNetConfig(model_channels=32, channel_mult=(1, 2, 4, 4), heads=8, context_dim=64),
)

# SDXL base 1.0: CLIP ViT-L (12 layers, penultimate) + OpenCLIP ViT-bigG (32 layers, penultimate and
# pooled/projected) -> a 2048-wide context; 3 UNet levels, no attention on the first, 2 and 10
# transformer blocks per spatial transformer on the others and 10 in the middle; 64-wide heads, linear
# projections, `label_emb` for pooled text + size/crop; the VAE's scaling 0.13025, fp32 under fp16.
SDXL_CLIP_L = CLIPTextConfig(layers=11, final_norm=False)
SDXL_OPENCLIP_G = CLIPTextConfig(width=1280, layers=32, heads=20, mlp_width=5120, act="gelu", projection_dim=1280)
SDXL = SDConfig(
    "sdxl",
    SDXL_CLIP_L,
    VAEConfig(scaling_factor=0.13025, force_upcast=True),
    UNetConfig(channel_mult=(1, 2, 4), attention_levels=(1, 2), transformer_depth=(0, 2, 10),
               middle_transformer_depth=10, head_channels=64, linear_proj=True, context_dim=2048,
               adm_in_channels=2816),
    clip2=SDXL_OPENCLIP_G,
)

SD21 = SDConfig(
    "sd21",
    CLIPTextConfig(width=1024, layers=23, heads=16, mlp_width=4096, act="gelu"),
    VAEConfig(),
    UNetConfig(context_dim=1024, head_channels=64, linear_proj=True),
)

TINY_MODEL = "tiny"              # what Pipeline.load and --model take for the TINY preset (no file)
TINY_MODEL_NAME = "tiny-random"  # the name it gets in results and PNG metadata

PRESETS = {"sd15": SD15, "tiny": TINY}       # SD 1.x presets (config_inference.infer_sd1_config)
SD2_PRESETS = {"sd21": SD21}                 # SD 2.x presets (2.0 and 2.1, base and 768-v share shapes)
SDXL_PRESETS = {"sdxl": SDXL}                # SDXL presets
