"""The whole Stable Diffusion 1.x / 2.x / XL model in the original single-file (CompVis / sgm) attribute layout.

    model.diffusion_model.*                       UNetModel
    first_stage_model.*                           AutoencoderKL
    cond_stage_model.transformer.text_model.*     CLIPTextModel          (SD 1.x: StableDiffusionModel)
    cond_stage_model.model.*                      OpenCLIPTextModel      (SD 2.x: StableDiffusion2Model)
    conditioner.embedders.0.transformer.text_model.*  CLIPTextModel      (SDXL: StableDiffusionXLModel,
    conditioner.embedders.1.model.*               OpenCLIPTextModel       CLIP ViT-L and OpenCLIP ViT-bigG)

so `StableDiffusionModel(cfg).state_dict()` has exactly the model keys of a released checkpoint and
loading one is a strict `load_state_dict` after dropping the non-model tensors. The prefixes are
written once, here (`UNET_PREFIX`, `VAE_PREFIX`, `CLIP_PREFIX`, `OPENCLIP_PREFIX`, `SDXL_CLIP_PREFIX`,
`SDXL_OPENCLIP_PREFIX`, `ORIGINAL_PREFIX`, `SD2_PREFIX`, `SDXL_PREFIX`): checkpoint reading and the diffusers renaming import them.
"""
from __future__ import annotations

import torch
from torch import nn

from batchsd.model.clip import CLIPTextModel
from batchsd.model.config import SDConfig
from batchsd.model.openclip import OpenCLIPTextModel
from batchsd.model.unet import UNetModel
from batchsd.model.vae import AutoencoderKL

# checkpoint key prefix of each component: its attribute path below, in the one place it is written
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."
ORIGINAL_PREFIX = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": CLIP_PREFIX}  # by diffusers component
SD2_PREFIX = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": OPENCLIP_PREFIX}   # the same for SD 2.x
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_PREFIX = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": SDXL_CLIP_PREFIX,
               "text_encoder_2": SDXL_OPENCLIP_PREFIX}


class _Holder(nn.Module):
    """An empty level of the original attribute path (`model`, `cond_stage_model.transformer`)."""


class StableDiffusionModel(nn.Module):
    def __init__(self, cfg: SDConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _Holder()
        self.model.diffusion_model = UNetModel(cfg.unet)
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.cond_stage_model = _Holder()
        self._add_text_encoder(cfg)

    def _add_text_encoder(self, cfg: SDConfig) -> None:
        self.cond_stage_model.transformer = _Holder()
        self.cond_stage_model.transformer.text_model = CLIPTextModel(cfg.clip)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> CLIPTextModel:
        return self.cond_stage_model.transformer.text_model

    @classmethod
    def random(cls, cfg: SDConfig, seed: int = 0) -> "StableDiffusionModel":
        """Deterministic random weights (PyTorch default init under a fixed seed): the `tiny` preset.

        The images such a model makes are noise; it exists to try the tool and to test it.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(cfg)
        return model.eval().requires_grad_(False)


class StableDiffusion2Model(StableDiffusionModel):
    """SD 2.x: the same UNet and VAE modules (other config), OpenCLIP text encoder under
    `cond_stage_model.model.`."""

    def _add_text_encoder(self, cfg: SDConfig) -> None:
        self.cond_stage_model.model = OpenCLIPTextModel(cfg.clip)

    @property
    def text_encoder(self) -> OpenCLIPTextModel:
        return self.cond_stage_model.model


class StableDiffusionXLModel(StableDiffusionModel):
    """SDXL: the UNet and VAE modules (SDXL config), two text encoders under sgm's
    `conditioner.embedders.{0,1}.` (`text_encoder`: CLIP ViT-L, `text_encoder_2`: OpenCLIP ViT-bigG)."""

    def _add_text_encoder(self, cfg: SDConfig) -> None:
        del self.cond_stage_model
        if cfg.clip2 is None:
            raise ValueError("an SDXL model needs cfg.clip2 (the OpenCLIP ViT-bigG text encoder's config)")
        first, second = _Holder(), _Holder()
        first.transformer = _Holder()
        first.transformer.text_model = CLIPTextModel(cfg.clip)
        second.model = OpenCLIPTextModel(cfg.clip2)
        self.conditioner = _Holder()
        self.conditioner.embedders = nn.ModuleList([first, second])

    @property
    def text_encoder(self) -> CLIPTextModel:
        return self.conditioner.embedders[0].transformer.text_model

    @property
    def text_encoder_2(self) -> OpenCLIPTextModel:
        return self.conditioner.embedders[1].model
