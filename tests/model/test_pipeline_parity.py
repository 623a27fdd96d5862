"""End to end: batchsd's Pipeline against diffusers' StableDiffusion(Img2Img)Pipeline on the same
random tiny weights, for every sampler, text-to-image and image-to-image, several seeds and sizes.

The weights travel the way users' do: reference diffusers/transformers models are written as an
original-layout single-file checkpoint and loaded by `Pipeline.load(path)`.

Tolerances (the issue's): images within 1/255 on at least 99.9% of pixels; final latents within
1e-3 relative (max abs diff / max abs of the reference).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)

from batchsd import GenerationRow, Pipeline  # noqa: E402
from batchsd.model.config import TINY  # noqa: E402
from batchsd.model.diffusers_layout import diffusers_to_original  # noqa: E402
from batchsd.model.tokenizer import load_tokenizer  # noqa: E402

from image_parity import assert_image_parity  # noqa: E402
from ref_checkpoint import write_original_checkpoint  # noqa: E402
from ref_clip import build_reference_clip  # noqa: E402
from ref_unet import build_reference_unet  # noqa: E402
from ref_vae import build_reference_vae  # noqa: E402

SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon",
)
REFERENCE_SCHEDULERS = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
}
LATENT_REL_TOL = 1e-3


def reference_scheduler(sampler: str):
    cls, extra = REFERENCE_SCHEDULERS[sampler]
    return cls.from_config({**SD15_SCHEDULER, **extra})


def build_models(tmp_dir) -> dict:
    """Reference tiny models, written as an original-layout checkpoint and loaded by batchsd."""
    clip = build_reference_clip(TINY.clip, seed=11)
    vae = build_reference_vae(TINY.vae, seed=12)
    unet = build_reference_unet(TINY.unet, seed=13)
    path = Path(tmp_dir) / "tiny-ref.safetensors"
    write_original_checkpoint(
        path,
        diffusers_to_original("unet", unet.state_dict()),
        diffusers_to_original("vae", vae.state_dict()),
        diffusers_to_original("text_encoder", clip.state_dict()),
        dtype=torch.float32,
    )
    ours = Pipeline.load(path, device="cpu", dtype="fp32")
    return dict(clip=clip, vae=vae, unet=unet, tokenizer=load_tokenizer(), ours=ours)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("ckpt"))


def reference_run(models, sampler: str, row: GenerationRow) -> tuple[np.ndarray, torch.Tensor]:
    """diffusers at batch 1 with generator=torch.Generator("cpu").manual_seed(seed): (uint8 HWC image, latents)."""
    parts = dict(vae=models["vae"], text_encoder=models["clip"], tokenizer=models["tokenizer"],
                 unet=models["unet"], scheduler=reference_scheduler(sampler), safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    return diffusers_run(parts, row)


def diffusers_run(parts: dict, row: GenerationRow, **extra) -> tuple[np.ndarray, torch.Tensor]:
    """`row` through diffusers' StableDiffusion(Img2Img)Pipeline built from `parts`: (uint8 HWC image, latents).
    `extra`: more pipeline call arguments (e.g. clip_skip)."""
    common = dict(prompt=row.prompt, negative_prompt=row.negative_prompt, num_inference_steps=row.steps,
                  guidance_scale=row.cfg_scale, generator=torch.Generator("cpu").manual_seed(row.seed),
                  output_type="latent", **extra)
    if row.init_image is None:
        pipe = StableDiffusionPipeline(**parts)
        pipe.set_progress_bar_config(disable=True)
        latents = pipe(width=row.width, height=row.height, **common).images
    else:
        pipe = StableDiffusionImg2ImgPipeline(**parts)
        pipe.set_progress_bar_config(disable=True)
        latents = pipe(image=row.init_image, strength=row.strength, **common).images
    with torch.no_grad():
        pixels = parts["vae"].decode(latents / parts["vae"].config.scaling_factor).sample
    image = pipe.image_processor.postprocess(pixels, output_type="np")[0]
    return (image * 255).round().astype("uint8"), latents


def assert_close(image_ours: Image.Image, latents_ours: torch.Tensor, image_ref: np.ndarray, latents_ref: torch.Tensor):
    return assert_image_parity("", image_ours, latents_ours, image_ref, latents_ref, LATENT_REL_TOL)


def init_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 7.0 + y / 5.0)], -1)
    noisy = np.clip(base + 0.05 * rng.standard_normal(base.shape), 0, 1)
    return Image.fromarray((noisy * 255).astype("uint8"))


SAMPLERS = list(REFERENCE_SCHEDULERS)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("seed,size,steps", [(0, (64, 64), 6), (1234, (96, 64), 4)])
def test_txt2img_matches_diffusers(models, sampler, seed, size, steps):
    row = GenerationRow("a red cube on a table", negative_prompt="blurry", seed=seed, steps=steps,
                        cfg_scale=7.5, sampler=sampler, width=size[0], height=size[1])
    out = models["ours"].generate([row])
    image_ref, latents_ref = reference_run(models, sampler, row)
    assert_close(out.images[0], out.latents, image_ref, latents_ref)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("seed,strength,steps", [(7, 0.75, 8), (99, 0.5, 5)])
def test_img2img_matches_diffusers(models, sampler, seed, strength, steps):
    row = GenerationRow("a watercolor landscape", seed=seed, steps=steps, cfg_scale=5.0, sampler=sampler,
                        init_image=init_image(72, 64, seed), strength=strength)
    out = models["ours"].generate([row])
    image_ref, latents_ref = reference_run(models, sampler, row)
    assert out.images[0].size == (72, 64)
    assert_close(out.images[0], out.latents, image_ref, latents_ref)


def test_img2img_default_size_rounds_down_like_diffusers(models):
    """A 75x70 init image is made at 72x64 (rounded down to /8, Lanczos resize), as diffusers does."""
    row = GenerationRow("a watercolor landscape", seed=3, steps=4, cfg_scale=4.0, sampler="euler",
                        init_image=init_image(75, 70, 3), strength=0.8)
    out = models["ours"].generate([row])
    image_ref, latents_ref = reference_run(models, "euler", row)
    assert out.images[0].size == (72, 64)
    assert_close(out.images[0], out.latents, image_ref, latents_ref)


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_karras", "ddpm"])
def test_batch_of_four_equals_batch_of_one(models, sampler):
    rows = [GenerationRow(p, negative_prompt=n, seed=s, steps=5, cfg_scale=c, sampler=sampler, width=64, height=96)
            for p, n, s, c in [("a cat", "", 1, 7.5), ("a dog", "ugly", 2, 1.0),
                               ("a cat", "dark", 3, 3.0), ("a house by a lake at dawn", "", 4, 12.0)]]
    batch = models["ours"].generate(rows)
    for i, row in enumerate(rows):
        single = models["ours"].generate([row])
        ref_image = np.asarray(single.images[0])
        assert_close(batch.images[i], batch.latents[i:i + 1], ref_image, single.latents)


def test_cfg_one_row_matches_diffusers_without_guidance(models):
    """cfg_scale 1 runs no unconditional pass; diffusers does the same (guidance_scale <= 1)."""
    row = GenerationRow("a cat", seed=5, steps=4, cfg_scale=1.0, sampler="ddim", width=64, height=64)
    out = models["ours"].generate([row])
    image_ref, latents_ref = reference_run(models, "ddim", row)
    assert_close(out.images[0], out.latents, image_ref, latents_ref)


def test_mixed_batch_keys_are_an_input_error(models):
    from batchsd.errors import InputError

    rows = [GenerationRow("a", steps=4, width=64, height=64), GenerationRow("b", steps=5, width=64, height=64)]
    with pytest.raises(InputError, match="share"):
        models["ours"].generate(rows)


def test_strength_leaving_no_steps_is_an_input_error(models):
    from batchsd.errors import InputError

    row = GenerationRow("a", steps=3, init_image=init_image(64, 64), strength=0.2)
    with pytest.raises(InputError, match="strength"):
        models["ours"].generate([row])
