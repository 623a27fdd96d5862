"""Reference SDXL models for parity tests, their checkpoint writers and diffusers runs.

Test-only (imports diffusers and transformers). The reference components are what diffusers runs
for SDXL base: a transformers CLIPTextModel (QuickGELU, read at hidden_states[-2]), a
CLIPTextModelWithProjection (GELU, hidden_states[-2] and text_embeds), a UNet2DConditionModel with
addition_embed_type "text_time", an AutoencoderKL; tokenizer pads with <|endoftext|>, tokenizer_2
with "!".

Writers:
- `write_sdxl_single_file`: sgm's single-file layout (as A1111 and ComfyUI load it): the CLIP text
  encoder as is under `conditioner.embedders.0.transformer.text_model.` (its last layer and
  final_layer_norm included: SDXL does not run them), the OpenCLIP one under
  `conditioner.embedders.1.model.` renamed by ref_sd2's independent writer, its `text_projection`
  the transpose of transformers' Linear weight, plus `logit_scale`; UNet and VAE renamed by
  batchsd's diffusers_layout (what the SD 1.x parity tests prove).
- `write_sdxl_folder`: a diffusers SDXL pipeline folder (save_pretrained).
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

from batchsd.model.config import CLIPTextConfig, SDConfig, UNetConfig, VAEConfig
from batchsd.model.diffusers_layout import diffusers_to_original
from batchsd.model.stable_diffusion import SDXL_PREFIX

from ref_checkpoint import TOKENIZER_DATA, ddpm_buffers
from ref_clip import random_text_model, reference_clip_config
from ref_sd2 import SD2_SCHEDULER, openclip_state_dict, reference_text_config, sd2_tokenizer
from ref_unet import randomize_
from ref_vae import build_reference_vae

# SDXL's topology with small widths: 3 UNet levels, no attention on the first, 2 and 10 transformer
# blocks per spatial transformer on the others and 10 in the middle, 64-wide heads (2, 4), linear
# projections; two 64-wide text encoders (the CLIP one's file holds one more, unused, layer) and a
# 32-wide pooled projection; SDXL's VAE scaling.
SDXL_TEST = SDConfig(
    "custom",
    CLIPTextConfig(width=64, layers=2, heads=1, mlp_width=256, final_norm=False),
    VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 2), scaling_factor=0.13025, force_upcast=True),
    UNetConfig(model_channels=64, channel_mult=(1, 2, 4), attention_levels=(1, 2), transformer_depth=(0, 2, 10),
               middle_transformer_depth=10, head_channels=64, linear_proj=True, context_dim=128,
               adm_in_channels=32 + 6 * 256),
    clip2=CLIPTextConfig(width=64, layers=2, heads=1, mlp_width=256, act="gelu", projection_dim=32),
)
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json values
SDXL_SCHEDULER = {**SD2_SCHEDULER, "timestep_spacing": "leading", "interpolation_type": "linear"}


def sdxl_unet_config(cfg: UNetConfig) -> dict:
    """diffusers UNet config of an SDXL UNet of cfg's shapes (as the base model's unet/config.json)."""
    levels = range(len(cfg.channel_mult))
    return dict(
        sample_size=128, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if cfg.depth_at(lv) else "DownBlock2D" for lv in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if cfg.depth_at(lv) else "UpBlock2D" for lv in reversed(levels)),
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.res_blocks, cross_attention_dim=cfg.context_dim,
        attention_head_dim=tuple(max(1, cfg.model_channels * m // 64) for m in cfg.channel_mult),
        transformer_layers_per_block=tuple(max(1, cfg.depth_at(lv)) for lv in levels),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=cfg.adm_in_channels, norm_num_groups=cfg.groups,
        norm_eps=cfg.eps,
    )


def build_reference_unet(cfg: UNetConfig, seed: int):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ref = UNet2DConditionModel(**sdxl_unet_config(cfg))
    ref.to_empty(device="cpu")
    randomize_(ref, seed)
    return ref.eval()


def _clip_l(cfg: CLIPTextConfig, seed: int) -> transformers.CLIPTextModel:
    """diffusers' text_encoder: every layer of the file (one more than SDXL reads from)."""
    return random_text_model(transformers.CLIPTextModel, reference_clip_config(replace(cfg, layers=cfg.layers + 1)),
                             seed)


def _clip_g(cfg: CLIPTextConfig, seed: int) -> transformers.CLIPTextModelWithProjection:
    """diffusers' text_encoder_2: OpenCLIP ViT-bigG converted (GELU, a text projection without bias)."""
    config = reference_text_config(cfg)
    config.projection_dim = cfg.projection_dim
    return random_text_model(transformers.CLIPTextModelWithProjection, config, seed)


def sdxl_tokenizers() -> tuple[transformers.CLIPTokenizer, transformers.CLIPTokenizer]:
    """tokenizer (<|endoftext|> padding) and tokenizer_2 ("!" padding), as SDXL base's folders hold them."""
    first = transformers.CLIPTokenizer(str(TOKENIZER_DATA / "vocab.json"), str(TOKENIZER_DATA / "merges.txt"),
                                       model_max_length=77)
    return first, sd2_tokenizer()


def build_reference_sdxl(cfg: SDConfig = SDXL_TEST, seed: int = 60) -> dict:
    tokenizer, tokenizer_2 = sdxl_tokenizers()
    return dict(text_encoder=_clip_l(cfg.clip, seed), text_encoder_2=_clip_g(cfg.clip2, seed + 1),
                unet=build_reference_unet(cfg.unet, seed + 2), vae=build_reference_vae(cfg.vae, seed + 3),
                tokenizer=tokenizer, tokenizer_2=tokenizer_2)


def write_sdxl_single_file(path: str | Path, ref: dict, dtype: torch.dtype = torch.float32) -> Path:
    """The reference as an SDXL base single file in sgm's layout (DDPM buffers included). Tensors already
    in `dtype` are written as they are, not copied (tests/tools/sdxl_full_width_parity.py writes the
    full-width model with it: a copy would be another 7 GB)."""
    path = Path(path)
    second = ref["text_encoder_2"]
    openclip = openclip_state_dict(second, extras=False)
    openclip["text_projection"] = second.text_projection.weight.detach().t()      # x @ P, not a Linear
    openclip["logit_scale"] = torch.tensor(math.log(100.0))
    parts = {"unet": diffusers_to_original("unet", ref["unet"].state_dict()),
             "vae": diffusers_to_original("vae", ref["vae"].state_dict()),
             "text_encoder": {k.removeprefix("text_model."): v for k, v in ref["text_encoder"].state_dict().items()},
             "text_encoder_2": openclip}
    sd = {SDXL_PREFIX[c] + k: v.to(dtype).detach().contiguous() for c, p in parts.items() for k, v in p.items()}
    sd.update(ddpm_buffers())
    save_file(sd, str(path), metadata={"format": "pt"})
    return path


def reference_scheduler(cls, **extra):
    return cls.from_config({**SDXL_SCHEDULER, "prediction_type": "epsilon", **extra})


def write_sdxl_folder(path: str | Path, ref: dict) -> Path:
    """A diffusers SDXL base pipeline folder, its scheduler Euler with SDXL's config."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(scheduler=reference_scheduler(EulerDiscreteScheduler), **ref)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def sdxl_run(ref: dict, scheduler, row, original_size=None, crop=(0, 0)) -> tuple[np.ndarray, torch.Tensor]:
    """`row` through diffusers' StableDiffusionXL(Img2Img)Pipeline: (uint8 HWC image, latents). An empty
    negative prompt is passed as None (force_zeros_for_empty_prompt: zero conditioning)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    common = dict(prompt=row.prompt, negative_prompt=row.negative_prompt or None, num_inference_steps=row.steps,
                  guidance_scale=row.cfg_scale, generator=torch.Generator("cpu").manual_seed(row.seed),
                  output_type="latent", crops_coords_top_left=crop)
    if row.init_image is None:
        pipe = StableDiffusionXLPipeline(scheduler=scheduler, **ref)
        size = dict(width=row.width, height=row.height)
        if original_size is not None:
            size["original_size"] = original_size
        pipe.set_progress_bar_config(disable=True)
        latents = pipe(**size, **common).images
    else:
        pipe = StableDiffusionXLImg2ImgPipeline(scheduler=scheduler, requires_aesthetics_score=False, **ref)
        pipe.set_progress_bar_config(disable=True)
        latents = pipe(image=row.init_image, strength=row.strength, **common).images
    with torch.no_grad():
        pixels = ref["vae"].decode(latents / ref["vae"].config.scaling_factor).sample
    image = pipe.image_processor.postprocess(pixels, output_type="np")[0]
    return (image * 255).round().astype("uint8"), latents
