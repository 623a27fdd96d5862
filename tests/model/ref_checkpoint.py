"""Writers of test checkpoints: original single-file layout (.safetensors / .ckpt), diffusers folders, and a
random full-size SD 1.5 file built from shared/reference/sd15_keys.json.

Test-only (imports diffusers for the folder writer).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from batchsd.model.stable_diffusion import ORIGINAL_PREFIX

SD15_KEYS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "sd15_keys.json"
TOKENIZER_DATA = Path(__file__).resolve().parents[2] / "batchsd" / "model" / "tokenizer_data"
DDPM_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
            torch.int32: "I32"}


def ddpm_buffers() -> dict[str, torch.Tensor]:
    """The LatentDiffusion schedule buffers of released SD 1.x files (scaled-linear betas, 1000 steps)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
    values = {
        "betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": torch.log(torch.clamp(posterior_variance, min=1e-20)),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - alphas_cumprod),
        "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
    }
    return {k: values[k].float() for k in DDPM_BUFFERS}


def extra_tensors(max_positions: int = 77) -> dict[str, torch.Tensor]:
    """Every non-model tensor a released file carries, plus one flattened EMA weight as community files have."""
    return {
        **ddpm_buffers(),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(470000, dtype=torch.int32),
        "model_ema.diffusion_modeltime_embed0bias": torch.zeros(8),
        ORIGINAL_PREFIX["text_encoder"] + "embeddings.position_ids": torch.arange(max_positions)[None],
    }


def compose_original(unet_sd: dict, vae_sd: dict, clip_sd: dict, dtype: torch.dtype,
                     extras: bool = True) -> dict[str, torch.Tensor]:
    """Component state dicts (keys below the original prefixes) -> one original-layout state dict."""
    out = {}
    for component, sd in (("unet", unet_sd), ("vae", vae_sd), ("text_encoder", clip_sd)):
        for key, value in sd.items():
            value = value.to(dtype) if value.is_floating_point() else value
            out[ORIGINAL_PREFIX[component] + key] = value.detach().contiguous().clone()
    if extras:
        out.update(extra_tensors())
    return out


def write_original_checkpoint(path: str | Path, unet_sd: dict, vae_sd: dict, clip_sd: dict,
                              dtype: torch.dtype = torch.float16, fmt: str = "safetensors", wrap: bool = False,
                              extras: bool = True) -> Path:
    """A single-file checkpoint in the original layout. `wrap` puts the tensors under `state_dict`
    (with `global_step`/`epoch` next to it, as training files have; .ckpt only)."""
    path = Path(path)
    sd = compose_original(unet_sd, vae_sd, clip_sd, dtype, extras)
    if fmt == "safetensors":
        assert not wrap, "safetensors files are flat"
        save_file(sd, str(path), metadata={"format": "pt"})
    elif fmt == "ckpt":
        torch.save({"state_dict": sd, "global_step": 470000, "epoch": 5} if wrap else sd, path)
    else:
        raise ValueError(fmt)
    return path


def write_diffusers_folder(path: str | Path, ref_unet, ref_vae, ref_clip, *, dtype: torch.dtype | None = None,
                           variant: str | None = None, text_model_level: bool | None = None,
                           max_shard_size: str | None = None) -> Path:
    """A full diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/) via save_pretrained. `text_model_level` True/False rewrites the text encoder file with /
    without the `text_model.` key level (None: as transformers saves it); `max_shard_size` (e.g. "1MB")
    shards the weight files with an index, as large models are saved."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from safetensors import safe_open
    from transformers import CLIPTokenizer

    path = Path(path)
    tokenizer = CLIPTokenizer(str(TOKENIZER_DATA / "vocab.json"), str(TOKENIZER_DATA / "merges.txt"),
                              model_max_length=77)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=ref_vae, text_encoder=ref_clip, tokenizer=tokenizer, unet=ref_unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if dtype is not None:
        pipe.to(dtype=dtype)
    pipe.save_pretrained(path, variant=variant, safe_serialization=True, max_shard_size=max_shard_size)
    if text_model_level is not None:
        name = "model.safetensors" if variant is None else f"model.{variant}.safetensors"
        file = path / "text_encoder" / name
        with safe_open(str(file), "pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
        bare = {k.removeprefix("text_model."): v for k, v in sd.items()}
        sd = {("text_model." + k if text_model_level else k): v for k, v in bare.items()}
        save_file(sd, str(file), metadata={"format": "pt"})
    return path


def sd15_shapes() -> dict[str, tuple[list[int], str]]:
    """Every tensor of a released SD 1.5 file: key -> (shape, dtype kind: "float" | "int64" | "int32")."""
    table = json.loads(SD15_KEYS.read_text())
    kinds = {"model_ema.num_updates": "int32", ORIGINAL_PREFIX["text_encoder"] + "embeddings.position_ids": "int64"}
    return {k: (list(v), kinds.get(k, "float")) for k, v in table.items()}


def random_sd15_checkpoint(path: str | Path, dtype: torch.dtype = torch.float16, fmt: str = "safetensors",
                           seed: int = 0, pool_size: int = 1 << 23) -> Path:
    """A full-size SD 1.5 single file with random model tensors (normal, std 0.05) and the real extra tensors.

    The safetensors file is written tensor by tensor from a `pool_size` pool of random values, so the
    writer holds no more than the pool in memory. A .ckpt is written by torch.save from that file's
    (mmap-backed) tensors.
    """
    path = Path(path)
    if fmt == "ckpt":
        from safetensors import safe_open
        staging = path.with_suffix(".staging.safetensors")
        random_sd15_checkpoint(staging, dtype, "safetensors", seed, pool_size)
        with safe_open(str(staging), "pt") as f:
            torch.save({"state_dict": {k: f.get_tensor(k) for k in f.keys()}, "global_step": 840000}, path)
        staging.unlink()
        return path
    assert fmt == "safetensors"
    shapes = sd15_shapes()
    extras = extra_tensors()
    header, offset, plan = {}, 0, []
    for key, (shape, kind) in shapes.items():
        tensor_dtype = {"float": dtype if key not in extras else torch.float32,
                        "int64": torch.int64, "int32": torch.int32}[kind]
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * tensor_dtype.itemsize
        header[key] = {"dtype": ST_DTYPE[tensor_dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        plan.append((key, tensor_dtype, numel))
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    # a pool of random values; each tensor is a run of it from a random start (wrapping around), so
    # tensors differ from each other without drawing a billion normals
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(pool_size, generator=gen).mul_(0.05).to(dtype)
    pool_bytes = torch.cat([pool, pool]).view(torch.uint8).numpy()  # doubled: any start has a full run
    item = dtype.itemsize
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for key, tensor_dtype, numel in plan:
            if key in extras:
                out.write(extras[key].to(tensor_dtype).contiguous().view(-1).view(torch.uint8).numpy())
                continue
            start = int(torch.randint(pool_size, (1,), generator=gen))
            for done in range(0, numel, pool_size):
                n = min(pool_size, numel - done)
                out.write(pool_bytes[start * item:(start + n) * item])
    return path
