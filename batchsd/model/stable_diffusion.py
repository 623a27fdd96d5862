"""The whole Stable Diffusion 1.x model in the original single-file (CompVis) attribute layout.

    model.diffusion_model.*                       UNetModel
    first_stage_model.*                           AutoencoderKL
    cond_stage_model.transformer.text_model.*     CLIPTextModel

so `StableDiffusionModel(cfg).state_dict()` has exactly the model keys of a released checkpoint and
loading one is a strict `load_state_dict` after dropping the non-model tensors.
"""
from __future__ import annotations

import torch
from torch import nn

from batchsd.model.clip import CLIPTextModel
from batchsd.model.config import SDConfig
from batchsd.model.unet import UNetModel
from batchsd.model.vae import AutoencoderKL

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."


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
