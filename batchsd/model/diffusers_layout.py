"""Rename diffusers-format state dicts to the original (CompVis / LDM) single-file layout.

The original layout is what batchsd's modules use, so a diffusers folder loads through the same
strict `load_state_dict` as a single-file checkpoint once its keys are renamed here. Keys come out
relative to the original component prefixes (`stable_diffusion.ORIGINAL_PREFIX`):

    unet          diffusers UNet2DConditionModel  -> below `model.diffusion_model.`
    vae           diffusers AutoencoderKL         -> below `first_stage_model.`
    text_encoder  transformers CLIPTextModel      -> below `cond_stage_model.transformer.text_model.` (SD 1.x)
    text_encoder_openclip  the same, of SD 2.x    -> OpenCLIP names below `cond_stage_model.model.` (SD 2.x)
                  and SDXL's text_encoder_2 (CLIPTextModelWithProjection) -> below `conditioner.embedders.1.model.`

The correspondence is the inverse of diffusers' `convert_ldm_unet_checkpoint` /
`convert_ldm_vae_checkpoint` (loaders/single_file_utils.py). It is rule-based: the number of
levels, res blocks per level and which levels have attention are read from the keys present, so
any SD 1.x-shaped model (including the tiny preset) maps through the same code.

Besides renaming, the tensor changes are the VAE mid-block attention (diffusers stores its q/k/v/out
projections as Linear weights [C, C], the original as 1x1 convolutions [C, C, 1, 1]) and, for SD
2.x, OpenCLIP's fused attention input projection: transformers' separate q_proj/k_proj/v_proj
become the row blocks 0/1/2 of one `attn.in_proj_weight` [3D, D] (`in_proj_bias` [3D]). The key
map names each block `<original key>::<i>` (FUSED_PART); the loader reads the blocks into one
tensor (checkpoint_files), `diffusers_to_original` concatenates them.
Keys no rule recognises are passed through unchanged, so a loader's strict check names them.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch

# ResBlock parameter names inside one block, diffusers -> original.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",    # SDXL's size/crop + pooled text conditioning
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # norm1/conv1/norm2/conv2 keep their names
# VAE mid attention: current diffusers names and the pre-0.14 ones (query/key/value/proj_attn).
_VAE_ATTN = {
    "group_norm": "norm",
    "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out",
}
_VAE_ATTN_PROJ = ("q.weight", "k.weight", "v.weight", "proj_out.weight")


def _rename_head(rest: str, table: Mapping[str, str]) -> str:
    """Rename the leading module path of `rest` (e.g. "conv1.weight") by `table`."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _max_index(keys: Iterable[str], pattern: str) -> int:
    """Largest integer captured by `pattern` over keys, -1 if none match."""
    rx = re.compile(pattern)
    found = [int(m.group(1)) for k in keys if (m := rx.match(k))]
    return max(found, default=-1)


def unet_key_map(keys: Iterable[str]) -> dict[str, str]:
    """diffusers UNet2DConditionModel key -> original key below `model.diffusion_model.`."""
    keys = list(keys)
    res_per_level = _max_index(keys, r"down_blocks\.\d+\.resnets\.(\d+)\.") + 1  # L
    blocks_per_level = res_per_level + 1  # L res blocks + the downsampler (input) / L+1 (output)
    up_with_attention = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}

    out = {}
    for key in keys:
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = 1 + level * blocks_per_level + j
            new = (f"input_blocks.{index}.0.{_rename_head(rest, _UNET_RESNET)}" if kind == "resnets"
                   else f"input_blocks.{index}.1.{rest}")
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            index = 1 + int(m[1]) * blocks_per_level + res_per_level
            new = f"input_blocks.{index}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_rename_head(m[2], _UNET_RESNET)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = level * blocks_per_level + j
            new = (f"output_blocks.{index}.0.{_rename_head(rest, _UNET_RESNET)}" if kind == "resnets"
                   else f"output_blocks.{index}.1.{rest}")
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            level = int(m[1])
            index = level * blocks_per_level + res_per_level
            slot = 2 if level in up_with_attention else 1  # after the res block (and the attention)
            new = f"output_blocks.{index}.{slot}.conv.{m[2]}"
        else:
            new = _rename_head(key, _UNET_TOP)
        out[key] = new
    return out


def vae_key_map(keys: Iterable[str]) -> dict[str, str]:
    """diffusers AutoencoderKL key -> original key below `first_stage_model.`."""
    keys = list(keys)
    decoder_levels = _max_index(keys, r"decoder\.up_blocks\.(\d+)\.") + 1  # diffusers counts up from the bottom
    out = {}
    for key in keys:
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{_rename_head(m[3], _VAE_RESNET)}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            level = decoder_levels - 1 - int(m[1])
            new = f"decoder.up.{level}.block.{m[2]}.{_rename_head(m[3], _VAE_RESNET)}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            level = decoder_levels - 1 - int(m[1])
            new = f"decoder.up.{level}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_head(m[3], _VAE_RESNET)}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            new = f"{m[1]}.mid.attn_1.{_rename_head(m[2], _VAE_ATTN)}"
        elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        else:  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
            new = key
        out[key] = new
    return out


def text_encoder_key_map(keys: Iterable[str]) -> dict[str, str]:
    """transformers CLIPTextModel key (with or without `text_model.`) -> key below `...text_model.`."""
    return {k: k[len("text_model."):] if k.startswith("text_model.") else k for k in keys}


FUSED_PART = "::"  # "<original key>::<i>": row block i of a tensor that the original layout fuses
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def openclip_text_encoder_key_map(keys: Iterable[str]) -> dict[str, str]:
    """transformers CLIPTextModel key (with or without `text_model.`) -> OpenCLIP key below
    `cond_stage_model.model.` (SD 2.x); q/k/v projections -> `attn.in_proj_*::<0|1|2>`.
    `embeddings.position_ids` -> `position_ids` and `text_projection.weight` -> `text_projection`
    (transposed, `is_transposed`; SD 2.x ignores both, SDXL's ViT-bigG uses the projection)."""
    out = {}
    for key in keys:
        k = key[len("text_model."):] if key.startswith("text_model.") else key
        if m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv]_proj)\.(weight|bias)$", k):
            new = f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}{FUSED_PART}{_QKV[m[2]]}"
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.+)", k):
            new = f"transformer.resblocks.{m[1]}.{_rename_head(m[2], _OPENCLIP_LAYER)}"
        elif k == "embeddings.token_embedding.weight":
            new = "token_embedding.weight"
        elif k == "embeddings.position_embedding.weight":
            new = "positional_embedding"
        elif k == "embeddings.position_ids":
            new = "position_ids"
        elif k.startswith("final_layer_norm."):
            new = "ln_final." + k[len("final_layer_norm."):]
        elif k == "text_projection.weight":
            new = "text_projection"
        else:
            new = k
        out[key] = new
    return out


def fused_groups(keys: Iterable[str]) -> dict[str, list[str]]:
    """The `<key>::<i>` keys among `keys`, grouped by `<key>` in block order; ValueError when a group's
    blocks are not 0..n-1."""
    groups: dict[str, dict[int, str]] = {}
    for key in keys:
        if FUSED_PART in key:
            base, index = key.split(FUSED_PART)
            groups.setdefault(base, {})[int(index)] = key
    for base, blocks in groups.items():
        if sorted(blocks) != list(range(len(blocks))):
            raise ValueError(f"the parts of {base} are blocks {sorted(blocks)}, not 0..{len(blocks) - 1}")
    return {base: [blocks[i] for i in range(len(blocks))] for base, blocks in groups.items()}


KEY_MAPS = {"unet": unet_key_map, "vae": vae_key_map, "text_encoder": text_encoder_key_map,
            "text_encoder_openclip": openclip_text_encoder_key_map}


def is_transposed(layout: str, original_key: str) -> bool:
    """Whether the original tensor is the transpose of the diffusers one: OpenCLIP's `text_projection`
    (applied as x @ P) is transformers' `text_projection.weight` (a Linear, x @ W.T)."""
    return layout == "text_encoder_openclip" and original_key.endswith("text_projection")


def original_shape(component: str, original_key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of a renamed tensor: VAE attention Linear [C, C] (or old conv1d [C, C, 1]) -> 1x1 conv [C, C, 1, 1]."""
    shape = tuple(shape)
    if component == "vae" and ".mid.attn_1." in original_key and original_key.endswith(_VAE_ATTN_PROJ):
        return shape + (1,) * (4 - len(shape))
    return shape


def to_original_tensor(component: str, original_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor change that goes with a rename (a view, never a copy): see `original_shape`."""
    shape = original_shape(component, original_key, tuple(tensor.shape))
    return tensor if shape == tuple(tensor.shape) else tensor.view(shape)


def diffusers_to_original(component: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers-format component state dict to original keys (relative to
    stable_diffusion.ORIGINAL_PREFIX[component]; "text_encoder_openclip": SD2_PREFIX["text_encoder"]),
    fused tensors concatenated."""
    if component not in KEY_MAPS:
        raise ValueError(f"unknown component {component!r}; expected one of {sorted(KEY_MAPS)}")
    key_map = KEY_MAPS[component](state_dict.keys())
    out: dict[str, torch.Tensor] = {}
    for old, new in key_map.items():
        if new in out:
            raise ValueError(f"{component}: two diffusers keys map to {new!r} (one is {old!r})")
        tensor = state_dict[old]
        out[new] = tensor.t() if is_transposed(component, new) else to_original_tensor(component, new, tensor)
    for base, parts in fused_groups(list(out)).items():
        if base in out:
            raise ValueError(f"{component}: {base!r} is both whole and in parts")
        out[base] = torch.cat([out.pop(part) for part in parts])
    return out
