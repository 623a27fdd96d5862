"""The configuration of a checkpoint, read from its tensor shapes: `infer_sd1_config`, `infer_sd2_config`.

Widths, depths, level counts and attention levels are all visible in the shapes of the original
(CompVis) layout; head counts are not. A state dict whose shapes match a preset (config.PRESETS:
SD15, TINY; config.SD2_PRESETS: SD21) gets that preset whole, name included; any other one gets a
config named "custom" with its family's head rules (SD 1.x: UNet 8 heads, CLIP width / 64; SD 2.x:
64-wide heads in the UNet and the text encoder). The model families (family.py) read checkpoints
through these.

A diffusers folder's config.json files, when present, are authoritative over those rules
(`apply_diffusers_configs`): head counts (unet `attention_head_dim` / `num_attention_heads`, per
level or one for all; text encoder `num_attention_heads`), the text encoder's activation, LayerNorm
eps and layer count, the UNet's linear projections and norms, the VAE's scaling factor and norm
groups. A value the weights cannot run with (heads or groups that do not divide the channels, a
scale <= 0) is a CheckpointError naming the file and key.

SD 2.x single files carry all 24 OpenCLIP ViT-H blocks, of which SD 2.x runs 23 (the penultimate
layer's output): a width-1024 text encoder runs 23 blocks whether the file has 24 (released files)
or 23 (converted from a diffusers folder); other widths (test models) run all but the file's last
block. A diffusers folder's text encoder runs all its layers (diffusers' 23-layer CLIPTextModel).
"""
from __future__ import annotations

import math

import re
from dataclasses import replace
from typing import Iterable, Mapping

from batchsd.errors import CheckpointError
from batchsd.model.config import (PRESETS, SD2_PRESETS, SDXL_PRESETS, CLIPTextConfig, SDConfig, UNetConfig,
                                  VAEConfig)
from batchsd.model.stable_diffusion import (CLIP_PREFIX, OPENCLIP_PREFIX, ORIGINAL_PREFIX, SD2_PREFIX,
                                            SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX, SDXL_PREFIX, UNET_PREFIX,
                                            VAE_PREFIX)

OPENCLIP_H_WIDTH = 1024    # OpenCLIP ViT-H/14: 24 blocks, SD 2.x runs the first 23
OPENCLIP_H_USED_LAYERS = 23

COMPONENT_NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder": "CLIP text encoder"}


def _need(shapes: Mapping[str, tuple[int, ...]], prefix: str, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"cannot infer the {what} configuration: tensor {prefix}{key} is missing")
    return shapes[key]


def _indices(shapes: Iterable[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def _infer_unet(s: Mapping[str, tuple[int, ...]]) -> UNetConfig:
    need = lambda key: _need(s, UNET_PREFIX, key, "UNet")  # noqa: E731
    model_channels, in_channels = need("input_blocks.0.0.weight")[:2]  # conv_in [mc, in, 3, 3]
    out_channels = need("out.2.weight")[0]
    # input_blocks 1..: per level `res_blocks` res blocks (+ a spatial transformer), then a downsampler
    level_channels: list[list[int]] = [[]]
    attention_levels = set()
    for i in _indices(s, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in s:
            level_channels.append([])
            continue
        level_channels[-1].append(need(f"input_blocks.{i}.0.out_layers.3.weight")[0])
        if f"input_blocks.{i}.1.proj_in.weight" in s:
            attention_levels.add(len(level_channels) - 1)
    res_blocks = len(level_channels[0])
    if res_blocks == 0 or any(len(ch) != res_blocks or len(set(ch)) != 1 for ch in level_channels):
        raise CheckpointError(f"unsupported UNet layout: res block channels per level {level_channels}")
    if any(ch[0] % model_channels for ch in level_channels):
        raise CheckpointError(f"unsupported UNet layout: level channels {level_channels} are not multiples "
                              f"of {model_channels}")
    context = [v for k, v in s.items() if k.endswith(".attn2.to_k.weight")]  # [inner, context_dim]
    proj_in = [v for k, v in s.items() if k.endswith(".proj_in.weight")]   # conv [C, C, 1, 1] or linear [C, C]
    # transformer blocks per spatial transformer: each attention level's first one, and the middle's
    depths = []
    for level in range(len(level_channels)):
        first = 1 + level * (res_blocks + 1)
        depths.append(len(_indices(s, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")))
    middle_depth = len(_indices(s, r"middle_block\.1\.transformer_blocks\.(\d+)\.")) or 1
    plain = all(d == 1 for lv, d in enumerate(depths) if lv in attention_levels) and middle_depth == 1
    label_emb = s.get("label_emb.0.0.weight")                                # [time_embed_dim, adm_in]
    return UNetConfig(
        transformer_depth=() if plain else tuple(depths), middle_transformer_depth=middle_depth,
        adm_in_channels=label_emb[1] if label_emb else 0,
        linear_proj=bool(proj_in) and len(proj_in[0]) == 2,
        in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
        channel_mult=tuple(ch[0] // model_channels for ch in level_channels), res_blocks=res_blocks,
        attention_levels=tuple(sorted(attention_levels)),
        context_dim=context[0][1] if context else UNetConfig.context_dim,
        heads=UNetConfig.heads,  # not visible in shapes; SD 1.x uses 8 heads everywhere
    )


def _infer_vae(s: Mapping[str, tuple[int, ...]]) -> VAEConfig:
    need = lambda key: _need(s, VAE_PREFIX, key, "VAE")  # noqa: E731
    base_channels, image_channels = need("encoder.conv_in.weight")[:2]  # [base, 3, 3, 3]
    latent_channels = need("decoder.conv_in.weight")[1]                 # [C, latent, 3, 3]
    levels = _indices(s, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise CheckpointError(f"cannot infer the VAE configuration: no {VAE_PREFIX}encoder.down.* tensors")
    level_channels = [need(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in levels]
    if any(ch % base_channels for ch in level_channels):
        raise CheckpointError(f"unsupported VAE layout: level channels {level_channels} vs base {base_channels}")
    return VAEConfig(
        image_channels=image_channels, latent_channels=latent_channels, base_channels=base_channels,
        channel_mult=tuple(ch // base_channels for ch in level_channels),
        res_blocks=len(_indices(s, r"encoder\.down\.0\.block\.(\d+)\.")),
    )


def _infer_clip(s: Mapping[str, tuple[int, ...]], prefix: str = CLIP_PREFIX) -> CLIPTextConfig:
    need = lambda key: _need(s, prefix, key, "CLIP text encoder")  # noqa: E731
    vocab_size, width = need("embeddings.token_embedding.weight")
    return CLIPTextConfig(
        vocab_size=vocab_size, width=width, max_positions=need("embeddings.position_embedding.weight")[0],
        layers=len(_indices(s, r"encoder\.layers\.(\d+)\.")), mlp_width=need("encoder.layers.0.mlp.fc1.weight")[0],
        heads=width // 64 if width % 64 == 0 else 1,  # not visible in shapes; CLIP uses 64-wide heads
    )


def _component(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


COMPONENT_NAMES["text_encoder_2"] = "second (OpenCLIP) text encoder"


def _need_all(shapes: Mapping[str, tuple[int, ...]], prefixes: Mapping[str, str], family: str) -> None:
    for component, prefix in prefixes.items():
        if not any(k.startswith(prefix) for k in shapes):
            raise CheckpointError(f"no {COMPONENT_NAMES[component]} tensors under {prefix}: an {family} checkpoint "
                                  f"needs the UNet, the VAE and the text encoder")


def _finish(cfg: SDConfig, presets: Mapping[str, SDConfig], configs: Mapping[str, Mapping]) -> SDConfig:
    """The diffusers configs applied, then the preset of equal shapes and heads, if any."""
    applied = apply_diffusers_configs(cfg, configs)
    for preset in presets.values():
        if replace(applied, name=preset.name) == preset:
            return preset
    return applied if applied == cfg else replace(applied, name="custom")


def infer_sd1_config(shapes: Mapping[str, tuple[int, ...]], configs: Mapping[str, Mapping] | None = None) -> SDConfig:
    """SDConfig from tensor shapes (original-layout keys -> shape tuples) and a diffusers folder's
    `configs` (component -> config.json; authoritative); CheckpointError naming the component, and
    the tensor, that is missing or does not fit the SD 1.x topology."""
    _need_all(shapes, ORIGINAL_PREFIX, "SD 1.x")
    cfg = SDConfig(
        "custom",
        clip=_infer_clip(_component(shapes, CLIP_PREFIX)),
        vae=_infer_vae(_component(shapes, VAE_PREFIX)),
        unet=_infer_unet(_component(shapes, UNET_PREFIX)),
    )
    for preset in PRESETS.values():
        same_heads = replace(cfg, name=preset.name, clip=replace(cfg.clip, heads=preset.clip.heads),
                             unet=replace(cfg.unet, heads=preset.unet.heads))
        if same_heads == preset:
            cfg = preset
            break
    cfg = _finish(cfg, PRESETS, configs or {})
    if cfg.clip.act != "quick_gelu":
        raise CheckpointError(f"an SD 1.x (CLIP ViT-L) text encoder with activation {cfg.clip.act!r} is not supported")
    return cfg


def _infer_openclip(s: Mapping[str, tuple[int, ...]], layout: str, prefix: str = OPENCLIP_PREFIX) -> CLIPTextConfig:
    need = lambda key: _need(s, prefix, key, "OpenCLIP text encoder")  # noqa: E731
    vocab_size, width = need("token_embedding.weight")
    blocks = len(_indices(s, r"transformer\.resblocks\.(\d+)\."))
    if layout == "diffusers":
        layers = blocks                         # diffusers' text encoder: every layer is run
    elif width == OPENCLIP_H_WIDTH:
        if blocks not in (OPENCLIP_H_USED_LAYERS, OPENCLIP_H_USED_LAYERS + 1):
            raise CheckpointError(f"unsupported OpenCLIP ViT-H text encoder: {blocks} blocks under "
                                  f"{OPENCLIP_PREFIX}transformer.resblocks (SD 2.x has 24, of which it runs 23)")
        layers = OPENCLIP_H_USED_LAYERS
    else:
        if blocks < 2:
            raise CheckpointError(f"unsupported OpenCLIP text encoder: {blocks} blocks (SD 2.x runs all but the last)")
        layers = blocks - 1                     # the penultimate layer's output
    return CLIPTextConfig(
        vocab_size=vocab_size, width=width, max_positions=need("positional_embedding")[0], layers=layers,
        mlp_width=need("transformer.resblocks.0.mlp.c_fc.weight")[0],
        heads=width // 64 if width % 64 == 0 else 1, act="gelu",  # 64-wide heads, as OpenCLIP's
    )


def infer_sd2_config(shapes: Mapping[str, tuple[int, ...]], layout: str = "single-file",
                     configs: Mapping[str, Mapping] | None = None) -> SDConfig:
    """SD 2.x SDConfig from tensor shapes (original-layout keys, the text encoder under
    `cond_stage_model.model.`), the source's layout ("single-file" | "diffusers": which text encoder
    blocks are run, see above) and a diffusers folder's `configs` (authoritative)."""
    _need_all(shapes, SD2_PREFIX, "SD 2.x")
    unet = _infer_unet(_component(shapes, UNET_PREFIX))
    cfg = SDConfig(
        "custom",
        clip=_infer_openclip(_component(shapes, OPENCLIP_PREFIX), layout),
        vae=_infer_vae(_component(shapes, VAE_PREFIX)),
        unet=replace(unet, head_channels=64),     # SD 2.x: 64-wide heads (CompVis num_head_channels 64)
    )
    return _finish(cfg, SD2_PRESETS, configs or {})


def infer_sdxl_config(shapes: Mapping[str, tuple[int, ...]], configs: Mapping[str, Mapping] | None = None) -> SDConfig:
    """SDXL SDConfig from tensor shapes (original keys, the encoders under `conditioner.embedders.{0,1}.`)
    and a diffusers folder's `configs` (authoritative). Both encoders are read at their penultimate
    layer: the CLIP ViT-L runs all but its last block and no final norm (the file's last block and
    final_layer_norm are left unused, in a single file and in a folder alike: diffusers reads
    hidden_states[-2]); the OpenCLIP ViT-bigG runs every block (the last one feeds the pooled output)."""
    _need_all(shapes, SDXL_PREFIX, "SDXL")
    clip = _infer_clip(_component(shapes, SDXL_CLIP_PREFIX), SDXL_CLIP_PREFIX)
    if clip.layers < 2:
        raise CheckpointError(f"unsupported SDXL CLIP text encoder: {clip.layers} layers (SDXL reads the penultimate)")
    second = _component(shapes, SDXL_OPENCLIP_PREFIX)
    clip2 = _infer_openclip(second, "diffusers", SDXL_OPENCLIP_PREFIX)   # every block is run
    projection = _need(second, SDXL_OPENCLIP_PREFIX, "text_projection", "OpenCLIP text encoder")
    if projection[0] != clip2.width:
        raise CheckpointError(f"{SDXL_OPENCLIP_PREFIX}text_projection has shape {list(projection)}: the "
                              f"first dimension must be the encoder's width {clip2.width}")
    unet = _infer_unet(_component(shapes, UNET_PREFIX))
    if not unet.adm_in_channels:
        raise CheckpointError(f"an SDXL UNet needs the size/crop conditioning tensors {UNET_PREFIX}label_emb.0.0.*")
    cfg = SDConfig(
        "custom",
        clip=replace(clip, layers=clip.layers - 1, final_norm=False),
        clip2=replace(clip2, projection_dim=projection[1]),
        vae=replace(_infer_vae(_component(shapes, VAE_PREFIX)), scaling_factor=0.13025, force_upcast=True),
        unet=replace(unet, head_channels=64),     # SDXL: 64-wide heads (sgm num_head_channels 64)
    )
    return _finish(cfg, SDXL_PRESETS, configs or {})


def _unet_heads(unet: UNetConfig, config: Mapping) -> UNetConfig:
    """Head counts from a diffusers UNet config (`num_attention_heads`, else `attention_head_dim`, which
    diffusers' SD configs use for the head COUNT: one for all levels or one per level) as UNetConfig's
    `heads` (one count) or `head_channels` (one width)."""
    counts = config.get("num_attention_heads") or config.get("attention_head_dim")
    if counts is None:
        return unet
    levels = len(unet.channel_mult)
    given = counts
    counts = [counts] * levels if isinstance(counts, int) else list(counts) if isinstance(counts, list) else None
    if counts is None or len(counts) != levels or not all(type(c) is int and c > 0 for c in counts):
        raise CheckpointError(f"unet/config.json: attention heads {given!r} do not fit the {levels} levels of the "
                              "UNet (one whole number, or one per level)")
    used = [(unet.model_channels * unet.channel_mult[lv], counts[lv]) for lv in unet.attention_levels]
    used.append((unet.model_channels * unet.channel_mult[-1], counts[-1]))   # the middle block's
    if bad := [(ch, c) for ch, c in used if ch % c]:
        raise CheckpointError(f"unet/config.json: {bad[0][1]} attention heads do not divide the {bad[0][0]} channels "
                              f"of a level of the weights; fix attention_head_dim / num_attention_heads")
    if len({c for _, c in used}) == 1:
        return replace(unet, heads=used[0][1], head_channels=0)
    widths = {ch // c for ch, c in used if ch % c == 0}
    if len(widths) == 1 and all(ch % c == 0 for ch, c in used):
        return replace(unet, head_channels=widths.pop())
    raise CheckpointError(f"unet/config.json: attention heads {counts} are neither one count nor one width "
                          f"per level: not supported")


def apply_diffusers_configs(cfg: SDConfig, configs: Mapping[str, Mapping]) -> SDConfig:
    """`cfg` with what a diffusers folder's config.json files say (those present) put in."""
    clip, clip2, unet, vae = cfg.clip, cfg.clip2, cfg.unet, cfg.vae
    if text := configs.get("text_encoder"):
        clip = _text_config(clip, text, "text_encoder")
    if clip2 is not None and (text := configs.get("text_encoder_2")):
        clip2 = _text_config(clip2, text, "text_encoder_2")
    if unet_config := configs.get("unet"):
        unet_channels = [unet.model_channels * m for m in unet.channel_mult]   # each level's
        _agrees_with_weights(unet_config, "unet", {
            "in_channels": unet.in_channels, "out_channels": unet.out_channels,
            "cross_attention_dim": unet.context_dim, "block_out_channels": unet_channels})
        unet = _unet_heads(unet, unet_config)
        unet = replace(unet, linear_proj=bool(unet_config.get("use_linear_projection", unet.linear_proj)),
                       eps=_positive(unet_config, "norm_eps", unet.eps, "unet"),
                       groups=_groups(unet_config, unet.groups, unet_channels, "unet"))
    if vae_config := configs.get("vae"):
        vae_channels = [vae.base_channels * m for m in vae.channel_mult]
        _agrees_with_weights(vae_config, "vae", {"latent_channels": vae.latent_channels,
                                                 "block_out_channels": vae_channels})
        # force_upcast: only a family whose VAE upcasts (SDXL's; diffusers' SD 1.x/2.x pipelines never
        # do, whatever the config says) reads it, and a false there (a fixed fp16 VAE) turns it off
        vae = replace(vae, groups=_groups(vae_config, vae.groups, vae_channels, "vae"),
                      scaling_factor=_positive(vae_config, "scaling_factor", vae.scaling_factor, "vae"),
                      force_upcast=vae.force_upcast and bool(vae_config.get("force_upcast", True)))
    return replace(cfg, clip=clip, clip2=clip2, unet=unet, vae=vae)


def _text_config(clip: CLIPTextConfig, text: Mapping, name: str) -> CLIPTextConfig:
    """A text encoder's config.json over `clip`: heads, activation, LayerNorm eps; the layer count when
    the model runs them all (an encoder read at its penultimate layer without a final norm, SDXL's
    CLIP ViT-L, runs one fewer than the folder's model has)."""
    act = text.get("hidden_act", clip.act)
    if act not in ("gelu", "quick_gelu"):
        raise CheckpointError(f"{name}/config.json: hidden_act {act!r} is not supported (gelu, quick_gelu)")
    layers = int(text.get("num_hidden_layers", clip.layers + (not clip.final_norm)))
    heads = text.get("num_attention_heads", clip.heads)
    if type(heads) is not int or heads < 1 or clip.width % heads:
        raise CheckpointError(f"{name}/config.json: num_attention_heads {heads!r} does not divide the encoder's "
                              f"width {clip.width}")
    return replace(clip, heads=heads, act=act,
                   eps=_positive(text, "layer_norm_eps", clip.eps, name), layers=layers - (not clip.final_norm))


def _agrees_with_weights(config: Mapping, name: str, from_weights: Mapping) -> None:
    """The config's shape-visible values (those present) equal what the weights' shapes say: a folder
    whose config contradicts its weights is damaged or mixed from two models (diffusers would fail
    on it), so it is refused rather than read by one of the two."""
    for key, actual in from_weights.items():
        stated = config.get(key)
        if stated is not None and (list(stated) if isinstance(stated, (list, tuple)) else stated) != actual:
            raise CheckpointError(f"{name}/config.json: {key} {stated!r} disagrees with the weights ({actual!r}); "
                                  "the folder's config and weights come from different models")


def _groups(config: Mapping, default: int, channels: list[int], name: str) -> int:
    """config["norm_num_groups"] (default when absent): a whole number dividing every level's channels."""
    groups = config.get("norm_num_groups", default)
    if type(groups) is not int or groups < 1 or any(c % groups for c in channels):
        raise CheckpointError(f"{name}/config.json: norm_num_groups {groups!r} does not divide the channels of "
                              f"every level ({', '.join(map(str, channels))})")
    return groups


def _positive(config: Mapping, key: str, default: float, name: str) -> float:
    """config[key] (default when absent) as a finite number > 0; CheckpointError naming the file otherwise."""
    value = config.get(key, default)
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{name}/config.json: {key} {value!r} must be a number > 0")
    return float(value)
