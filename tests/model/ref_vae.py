"""Reference VAE for parity tests: diffusers' AutoencoderKL built from a VAEConfig, seeded random weights,
and its state dict mapped to the original CompVis key layout (keys after `first_stage_model.`).

`vae_state_dict_original` uses the project's one runtime mapping, batchsd/model/diffusers_layout.py.
`independent_vae_state_dict_original` is a second, test-side mapping written from the diffusers and
ldm sources, kept only as an oracle: tests/model/test_vae.py checks that the two agree.
"""
from __future__ import annotations

import re

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from batchsd.model.config import VAEConfig
from batchsd.model.diffusers_layout import diffusers_to_original


def reference_vae_on_meta(cfg: VAEConfig) -> DiffusersAutoencoderKL:
    """diffusers AutoencoderKL with cfg's shapes, on the meta device (no weights, no init cost)."""
    levels = len(cfg.channel_mult)
    with torch.device("meta"):
        return DiffusersAutoencoderKL(
            in_channels=cfg.image_channels,
            out_channels=cfg.image_channels,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult),
            layers_per_block=cfg.res_blocks,
            act_fn="silu",
            latent_channels=cfg.latent_channels,
            norm_num_groups=cfg.groups,
            scaling_factor=cfg.scaling_factor,
        )


def build_reference_vae(cfg: VAEConfig, seed: int) -> DiffusersAutoencoderKL:
    """diffusers AutoencoderKL with cfg's shapes, in eval mode, every parameter drawn from `seed`.

    Norm weights 1 + 0.1*randn and all biases 0.1*randn (so a swapped or mis-mapped norm shows);
    conv/linear weights randn / sqrt(fan_in) so activations stay O(1).
    """
    ref = reference_vae_on_meta(cfg)  # diffusers' own (slow) init is skipped: every parameter is drawn below
    assert not list(ref.buffers()), "buffers would stay uninitialized"
    ref = ref.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():  # named_parameters order is deterministic
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith(".bias"):
                p.copy_(0.1 * noise)
            elif p.ndim == 1:  # GroupNorm weight
                p.copy_(1.0 + 0.1 * noise)
            else:  # conv [out,in,kh,kw] or linear [out,in]
                fan_in = p[0].numel()
                p.copy_(noise / fan_in**0.5)
    return ref.eval()


_RESNET_RENAME = {"conv_shortcut": "nin_shortcut"}
_ATTN_RENAME = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _diffusers_key_to_original(key: str, levels: int) -> str:
    """One diffusers AutoencoderKL key -> the original key (after `first_stage_model.`)."""
    rules = [
        # encoder levels keep their index
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)$", lambda m: f"encoder.down.{m[1]}.downsample.{m[2]}"),
        # decoder levels are reversed: diffusers' up_blocks.0 (lowest resolution, applied first) is up.{levels-1}
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)$",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"),
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)$", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.*)$", lambda m: f"{m[1]}.mid.attn_1.{m[2]}"),
        (r"^(encoder|decoder)\.conv_norm_out\.(.*)$", lambda m: f"{m[1]}.norm_out.{m[2]}"),
    ]
    out = key
    for pattern, repl in rules:
        m = re.match(pattern, key)
        if m:
            out = repl(m)
            break
    for old, new in {**_RESNET_RENAME, **_ATTN_RENAME}.items():
        out = out.replace(f".{old}.", f".{new}.")
    return out


def vae_state_dict_original(ref: DiffusersAutoencoderKL) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL -> original-layout state dict (keys after `first_stage_model.`), by the runtime mapping."""
    return diffusers_to_original("vae", ref.state_dict())


def independent_vae_state_dict_original(ref: DiffusersAutoencoderKL) -> dict[str, torch.Tensor]:
    """The same conversion written independently of batchsd (the cross-check oracle).

    The mid attention's q/k/v/proj_out are Linear [C,C] in diffusers and 1x1 convs [C,C,1,1] in the
    original checkpoint: they are reshaped, not transposed.
    """
    levels = len(ref.config.block_out_channels)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in ref.state_dict().items():
        new_key = _diffusers_key_to_original(key, levels)
        if ".mid.attn_1." in new_key and new_key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        assert new_key not in out, f"two diffusers keys map to {new_key}"
        out[new_key] = tensor.detach()  # shares storage with ref
    return out
