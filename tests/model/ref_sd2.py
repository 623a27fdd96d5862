"""Reference SD 2.x models for parity tests, and writers of their checkpoints.

Test-only (imports diffusers and transformers). The reference components are what diffusers runs
for SD 2.x: a transformers CLIPTextModel with hidden_act "gelu" (diffusers' conversion of the
OpenCLIP ViT-H encoder, without its last block), a UNet2DConditionModel with
use_linear_projection=True and 64-wide heads (diffusers' `attention_head_dim` holds the head COUNT
per level), an AutoencoderKL; the tokenizer pads with "!".

Writers:
- `write_sd2_single_file`: the original single-file layout as released SD 2.x files have it. The
  text encoder is renamed from transformers' names to OpenCLIP's by `openclip_state_dict`, written
  here independently of batchsd's loader (it is the oracle for diffusers_layout's folder mapping):
  q/k/v projections concatenated into `attn.in_proj_weight`/`in_proj_bias`, fc1/fc2 -> c_fc/c_proj,
  layer_norm1/2 -> ln_1/ln_2, position embedding -> `positional_embedding`, final_layer_norm ->
  `ln_final` (the inverse of diffusers' convert_open_clip_checkpoint). Like a released file it has
  one more block than diffusers runs (random: it must be ignored), `text_projection` and
  `logit_scale`. The UNet and VAE are renamed by batchsd's diffusers_layout (the mapping the SD 1.x
  parity tests prove).
- `write_sd2_folder`: a diffusers pipeline folder (save_pretrained), scheduler config with the
  prediction type.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from batchsd.model.config import CLIPTextConfig, SDConfig, UNetConfig, VAEConfig
from batchsd.model.diffusers_layout import diffusers_to_original
from batchsd.model.stable_diffusion import SD2_PREFIX

from ref_checkpoint import TOKENIZER_DATA, ddpm_buffers
from ref_clip import random_text_model
from ref_unet import diffusers_unet_config, randomize_
from ref_vae import build_reference_vae

# SD 2.x topology with small widths: 4 UNet levels (attention on the first 3 and the middle), 2 res
# blocks, 64-wide heads (1, 2, 4, 4 heads), linear projections; a 2-block GELU text encoder of width
# 64 (one 64-wide head) read as SD 2.x reads ViT-H (the file has a third, unused block); SD 1.x's VAE
# topology.
SD2_TEST = SDConfig(
    "custom",
    CLIPTextConfig(width=64, layers=2, heads=1, mlp_width=256, act="gelu"),
    VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 2)),
    UNetConfig(model_channels=64, channel_mult=(1, 2, 4, 4), head_channels=64, linear_proj=True, context_dim=64),
)
SD2_SCHEDULER = dict(   # stabilityai/stable-diffusion-2-1 scheduler_config.json (+ prediction_type per model)
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True,
)


def sd2_tokenizer() -> transformers.CLIPTokenizer:
    """The SD 2.x tokenizer as diffusers loads it (stabilityai/stable-diffusion-2-1/tokenizer): CLIP's
    BPE, pad_token "!"."""
    return transformers.CLIPTokenizer(str(TOKENIZER_DATA / "vocab.json"), str(TOKENIZER_DATA / "merges.txt"),
                                      model_max_length=77, pad_token="!")


def reference_text_config(cfg: CLIPTextConfig, layers: int | None = None) -> transformers.CLIPTextConfig:
    """As stabilityai/stable-diffusion-2-1/text_encoder/config.json, with cfg's widths."""
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.layers if layers is None else layers, num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions, hidden_act="gelu", layer_norm_eps=cfg.eps,
        projection_dim=512, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )


def build_reference_text_encoder(cfg: CLIPTextConfig, seed: int, layers: int | None = None) -> transformers.CLIPTextModel:
    """transformers CLIPTextModel (gelu, eager attention, fp32, eval) with seeded random weights."""
    return random_text_model(transformers.CLIPTextModel, reference_text_config(cfg, layers), seed)


def sd2_unet_config(cfg: UNetConfig, prediction_type: str) -> dict:
    """diffusers UNet config of an SD 2.x UNet of cfg's shapes (heads as counts per level)."""
    base = diffusers_unet_config(cfg)
    heads = tuple(cfg.heads_at(cfg.model_channels * m) for m in cfg.channel_mult)
    return {**base, "attention_head_dim": heads, "use_linear_projection": True,
            "upcast_attention": prediction_type == "v_prediction",        # as 2.1 (768-v) has it
            "sample_size": 96 if prediction_type == "v_prediction" else 64}


def build_reference_unet(cfg: UNetConfig, seed: int, prediction_type: str):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ref = UNet2DConditionModel(**sd2_unet_config(cfg, prediction_type))
    ref.to_empty(device="cpu")
    randomize_(ref, seed)
    return ref.eval()


def build_reference_sd2(cfg: SDConfig, prediction_type: str, seed: int = 20) -> dict:
    """Reference components: text_encoder (cfg.clip.layers layers, what diffusers runs), unused_block
    (a random state dict of one more layer, the last block of a released file), unet, vae, tokenizer."""
    text = build_reference_text_encoder(cfg.clip, seed)
    extra = build_reference_text_encoder(replace(cfg.clip, layers=1), seed + 100)
    unused = {k.split("layers.0.", 1)[1]: v for k, v in extra.state_dict().items() if ".layers.0." in f".{k}"}
    return dict(text_encoder=text, unused_block=unused,
                unet=build_reference_unet(cfg.unet, seed + 1, prediction_type),
                vae=build_reference_vae(cfg.vae, seed + 2), tokenizer=sd2_tokenizer())


# ----------------------------------------------------------------------------- single file

_LAYER = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "self_attn.out_proj.": "attn.out_proj.",
          "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}


def _openclip_layer(layer_sd: dict, index: int) -> dict[str, torch.Tensor]:
    """One transformers encoder layer (keys after `encoder.layers.N.`) -> OpenCLIP resblock keys."""
    out = {}
    for kind in ("weight", "bias"):
        out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat(
            [layer_sd[f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
    for key, value in layer_sd.items():
        if key.startswith("self_attn.") and not key.startswith("self_attn.out_proj."):
            continue
        new = next(new + key[len(old):] for old, new in _LAYER.items() if key.startswith(old))
        out[f"transformer.resblocks.{index}.{new}"] = value
    return out


def openclip_state_dict(text_encoder: transformers.CLIPTextModel, unused_block: dict | None = None,
                        extras: bool = True) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel's weights under OpenCLIP's names (keys after `cond_stage_model.model.`),
    `unused_block` appended as the last block, and (extras) `text_projection` / `logit_scale`."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"]}
    layers = text_encoder.config.num_hidden_layers
    blocks = [{k[len(f"encoder.layers.{i}."):]: v for k, v in sd.items() if k.startswith(f"encoder.layers.{i}.")}
              for i in range(layers)]
    if unused_block is not None:
        blocks.append(unused_block)
    for i, block in enumerate(blocks):
        out.update(_openclip_layer(block, i))
    if extras:
        width = text_encoder.config.hidden_size
        g = torch.Generator().manual_seed(5)
        out["text_projection"] = torch.randn(width, width, generator=g) / math.sqrt(width)
        out["logit_scale"] = torch.tensor(4.6052)
    return out


def write_sd2_single_file(path: str | Path, ref: dict, dtype: torch.dtype = torch.float32) -> Path:
    """The reference as a released-style SD 2.x single file (original keys, DDPM buffers included)."""
    path = Path(path)
    parts = {"unet": diffusers_to_original("unet", ref["unet"].state_dict()),
             "vae": diffusers_to_original("vae", ref["vae"].state_dict()),
             "text_encoder": openclip_state_dict(ref["text_encoder"], ref["unused_block"])}
    sd = {SD2_PREFIX[c] + k: v.to(dtype).detach().contiguous().clone() for c, p in parts.items() for k, v in p.items()}
    sd.update(ddpm_buffers())
    save_file(sd, str(path), metadata={"format": "pt"})
    return path


def write_ldm_yaml(path: str | Path, prediction_type: str | None) -> Path:
    """An A1111-style config beside a checkpoint (the head of stabilityai's v2-inference(-v).yaml)."""
    parameterization = '    parameterization: "v"\n' if prediction_type == "v_prediction" else ""
    Path(path).write_text(
        "model:\n"
        "  base_learning_rate: 1.0e-4\n"
        "  target: ldm.models.diffusion.ddpm.LatentDiffusion\n"
        "  params:\n"
        f"{parameterization}"
        "    linear_start: 0.00085\n"
        "    linear_end: 0.0120\n"
        "    num_timesteps_cond: 1\n"
        "    log_every_t: 200\n"
        "    timesteps: 1000\n"
        "    first_stage_key: \"jpg\"\n"
        "    unet_config:\n"
        "      target: ldm.modules.diffusionmodules.openaimodel.UNetModel\n"
        "      params:\n"
        "        use_checkpoint: True\n"
        "        num_head_channels: 64 # need to fix for flash-attn\n"
        "        use_linear_in_transformer: True\n"
        "        parameterization: \"x0\"   # not model.params: must not count\n"
        "    cond_stage_config:\n"
        "      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder\n"
        "      params:\n"
        "        freeze: True\n"
        "        layer: \"penultimate\"\n")
    return Path(path)


# ----------------------------------------------------------------------------- diffusers folder

def reference_scheduler(cls, prediction_type: str, **extra):
    return cls.from_config({**SD2_SCHEDULER, "prediction_type": prediction_type, **extra})


def write_sd2_folder(path: str | Path, ref: dict, prediction_type: str) -> Path:
    """A diffusers SD 2.x pipeline folder, scheduler DDIM with the prediction type (as 2.1's)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=ref["vae"], text_encoder=ref["text_encoder"], tokenizer=ref["tokenizer"],
                                   unet=ref["unet"], scheduler=reference_scheduler(DDIMScheduler, prediction_type),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)
