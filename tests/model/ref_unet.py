"""Reference diffusers UNet for parity tests: built from a UNetConfig, randomized, and its state dict
renamed to the original (CompVis) layout below `model.diffusion_model.`.

Test-only (imports diffusers). The rename is the project's one mapping,
batchsd.model.diffusers_layout.diffusers_to_original.
"""
from __future__ import annotations

import math

import torch
from diffusers import UNet2DConditionModel

from batchsd.model.config import UNetConfig
from batchsd.model.diffusers_layout import diffusers_to_original


def diffusers_unet_config(cfg: UNetConfig) -> dict:
    levels = range(len(cfg.channel_mult))
    down = ["CrossAttnDownBlock2D" if lv in cfg.attention_levels else "DownBlock2D" for lv in levels]
    up = ["CrossAttnUpBlock2D" if lv in cfg.attention_levels else "UpBlock2D" for lv in reversed(levels)]
    return dict(
        sample_size=64,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.res_blocks,
        cross_attention_dim=cfg.context_dim,
        attention_head_dim=cfg.heads,  # SD 1.x diffusers configs put the head COUNT here
        norm_num_groups=cfg.groups,
        norm_eps=cfg.eps,
    )


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (seeded): norm weights 1 + 0.1*randn, norm biases 0.1*randn, other
    biases 0.05*randn, other weights randn / sqrt(fan_in) so that activations stay O(1).

    The unit normals come from one seeded pool, each tensor from its own random window of it
    (different tensors of one shape get different values), which keeps the full-width SD 1.5
    UNet (860 M parameters) at a memcpy's cost instead of 860 M normal draws.
    """
    g = torch.Generator().manual_seed(seed)
    norm_params = set()
    for module in model.modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            norm_params.update(id(p) for p in module.parameters(recurse=False))
    params = sorted(model.named_parameters())
    windows = 1 << 22
    pool = torch.randn(windows + max(p.numel() for _, p in params), generator=g)
    for name, p in params:
        offset = int(torch.randint(windows, (), generator=g))
        noise = pool[offset:offset + p.numel()].view(p.shape)
        if id(p) in norm_params:
            p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
        elif p.ndim == 1:
            p.copy_(0.05 * noise)
        else:
            p.copy_(noise / math.sqrt(p[0].numel()))


def build_reference_unet(cfg: UNetConfig, seed: int) -> UNet2DConditionModel:
    with torch.device("meta"):  # skip diffusers' own init: every parameter is overwritten below
        ref = UNet2DConditionModel(**diffusers_unet_config(cfg))
    ref.to_empty(device="cpu")
    assert not list(ref.buffers()), "to_empty would leave buffers uninitialized"
    randomize_(ref, seed)
    return ref.eval()


def unet_state_dict_original(ref: UNet2DConditionModel) -> dict:
    """The reference's state dict under original keys (those after `model.diffusion_model.`)."""
    return diffusers_to_original("unet", ref.state_dict())
