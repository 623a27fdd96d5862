"""Load Stable Diffusion 1.x checkpoints into StableDiffusionModel, safely and without doubling memory.

Accepted inputs (read by checkpoint_files.py):
- a single file in the original (CompVis) layout: `.safetensors` (JSON header, then each tensor read
  with pread straight into its destination) or `.ckpt`/`.pt`/`.bin` read with
  `torch.load(weights_only=True, mmap=True)`: a pickle that needs anything beyond tensors and plain
  containers is refused (CheckpointError), never executed. Tensors at the top level or under `state_dict`.
- a diffusers folder (`unet/`, `vae/`, `text_encoder/`, each with `*.safetensors`, `.fp16` variants
  or a sharded index), renamed to the original layout by `diffusers_layout`.

Loading: shapes -> `infer_config` -> StableDiffusionModel built on the meta device -> our own strict
key/shape check (a CheckpointError names missing, mis-shaped and unexpected tensors) -> tensors copied
one by one into freshly allocated tensors of the target dtype/device -> `load_state_dict(assign=True)`.
No file is mapped for safetensors; for .ckpt each tensor's pages are dropped from the mapping once
copied (madvise), so the peak resident memory is the model's bytes plus about one tensor, whatever the
source dtype (tests/measure_load_memory.py measures it).

This module holds the model side: `infer_config` (SDConfig from shapes), `check_keys`, the
file hash (`checkpoint_sha256`), and the public `load_model` / `inspect_checkpoint`.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch.overrides import TorchFunctionMode

from batchsd.model.config import PRESETS, CLIPTextConfig, SDConfig, UNetConfig, VAEConfig
from batchsd.model.checkpoint_files import SourceTensor, materialize, open_checkpoint
from batchsd.model.diffusers_layout import ORIGINAL_PREFIX
from batchsd.errors import CheckpointError
from batchsd.model.stable_diffusion import StableDiffusionModel

log = logging.getLogger(__name__)

UNET_PREFIX = ORIGINAL_PREFIX["unet"]          # model.diffusion_model.
VAE_PREFIX = ORIGINAL_PREFIX["vae"]            # first_stage_model.
CLIP_PREFIX = ORIGINAL_PREFIX["text_encoder"]  # cond_stage_model.transformer.text_model.
MODEL_PREFIXES = (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)

# Non-model tensors released SD 1.x files carry (see shared/reference/sd15_keys.json): the DDPM
# schedule buffers of the training wrapper and CLIP's constant position ids. Ignored by name.
IGNORED_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
    CLIP_PREFIX + "embeddings.position_ids",
})
# EMA copies: `model_ema.decay`, `model_ema.num_updates` and, in full training files, the EMA weights
# under flattened names (`model_ema.diffusion_modelinput_blocks00weight`).
IGNORED_PREFIXES = ("model_ema.",)

SHOW_KEYS = 10  # how many key names an error message lists


# ----------------------------------------------------------------------------- config inference

def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


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
    return UNetConfig(
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


def _infer_clip(s: Mapping[str, tuple[int, ...]]) -> CLIPTextConfig:
    need = lambda key: _need(s, CLIP_PREFIX, key, "CLIP text encoder")  # noqa: E731
    vocab_size, width = need("embeddings.token_embedding.weight")
    return CLIPTextConfig(
        vocab_size=vocab_size, width=width, max_positions=need("embeddings.position_embedding.weight")[0],
        layers=len(_indices(s, r"encoder\.layers\.(\d+)\.")), mlp_width=need("encoder.layers.0.mlp.fc1.weight")[0],
        heads=width // 64 if width % 64 == 0 else 1,  # not visible in shapes; CLIP uses 64-wide heads
    )


def _component(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def infer_config(state_dict: Mapping[str, Any]) -> SDConfig:
    """SDConfig from tensor shapes (original-layout keys; values: tensors or shapes).

    Head counts are not visible in shapes: a state dict whose shapes match a preset (SD15, TINY) gets
    that preset whole (name included); otherwise the config is named "custom" with SD 1.x head rules
    (UNet 8 heads, CLIP width/64).
    """
    shapes = {k: _shape(v) for k, v in state_dict.items()}
    keys = shapes.keys()
    if not any(k.startswith(CLIP_PREFIX) for k in keys):
        hint = ""
        if any(k.startswith("cond_stage_model.model.") for k in keys):
            hint = " (it has an OpenCLIP text encoder: a Stable Diffusion 2.x checkpoint, not supported)"
        elif any(k.startswith("conditioner.") for k in keys):
            hint = " (it looks like an SDXL checkpoint, not supported)"
        elif any(k.startswith(UNET_PREFIX) for k in keys):
            hint = " (a UNet-only file? batchsd needs the full model: UNet, VAE and text encoder)"
        raise CheckpointError(f"no CLIP text encoder tensors under {CLIP_PREFIX}{hint}")
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
            return preset
    return cfg


# ----------------------------------------------------------------------------- checking

@dataclass
class KeyReport:
    """How a checkpoint's tensors compare with the model its shapes describe."""
    model: list[str] = field(default_factory=list)       # tensors the model has (loaded when all is well)
    missing: list[str] = field(default_factory=list)     # the model needs them, the file lacks them
    mis_shaped: dict[str, tuple[tuple, tuple]] = field(default_factory=dict)  # key -> (file, model) shapes
    not_float: dict[str, str] = field(default_factory=dict)                   # key -> the file's dtype
    unexpected: list[str] = field(default_factory=list)  # under a model prefix, but not in the model
    ignored: list[str] = field(default_factory=list)     # known non-model tensors (IGNORED_*)
    extra: list[str] = field(default_factory=list)       # anything else: reported, not loaded
    problem: str | None = None                           # why it cannot be loaded, if it cannot


class _SkipInit(TorchFunctionMode):
    """Skips the in-place initialisers of torch.nn.init (the modules' reset_parameters) while a model
    is built on the meta device, where they have nothing to fill. Not only wasted: nn.Embedding's
    `normal_` on meta runs a Python decomposition whose first use imports torch._dynamo (~1.2 s of
    every start-up). A torch function mode, so it holds for this thread only."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if getattr(func, "__module__", None) == "torch.nn.init" and name.endswith("_") and not name.startswith("_"):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def build_on_meta(cfg: SDConfig) -> StableDiffusionModel:
    """StableDiffusionModel(cfg) on the meta device: shapes only, no memory, no init cost."""
    try:
        with torch.device("meta"), _SkipInit():
            return StableDiffusionModel(cfg)
    except (ValueError, AssertionError, RuntimeError) as e:
        raise CheckpointError(f"the inferred configuration cannot be built: {e} ({cfg})") from e


def _listing(keys: list[str], describe: Callable[[str], str] = str) -> str:
    shown = ", ".join(describe(k) for k in keys[:SHOW_KEYS])
    more = f", ... ({len(keys) - SHOW_KEYS} more)" if len(keys) > SHOW_KEYS else ""
    return f"{len(keys)}: {shown}{more}"


def check_keys(tensors: Mapping[str, SourceTensor], cfg: SDConfig | None,
               expected: Mapping[str, tuple[int, ...]]) -> KeyReport:
    """Sort every tensor into model / ignored / unexpected / extra and find what is missing or wrong."""
    r = KeyReport()
    for key, t in tensors.items():
        if key in expected:
            r.model.append(key)
            if t.shape != expected[key]:
                r.mis_shaped[key] = (t.shape, expected[key])
            elif not t.dtype.is_floating_point:
                r.not_float[key] = str(t.dtype).removeprefix("torch.")
        elif key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
            r.ignored.append(key)
        elif key.startswith(MODEL_PREFIXES) and cfg is not None:
            r.unexpected.append(key)
        else:
            r.extra.append(key)
    r.missing = [k for k in expected if k not in tensors]
    problems = []
    if r.missing:
        problems.append(f"missing tensors {_listing(r.missing)}")
    if r.mis_shaped:
        problems.append("mis-shaped tensors " + _listing(
            list(r.mis_shaped), lambda k: f"{k} {list(r.mis_shaped[k][0])} (model needs {list(r.mis_shaped[k][1])})"))
    if r.not_float:
        problems.append("non-float tensors " + _listing(list(r.not_float), lambda k: f"{k} ({r.not_float[k]})"))
    if r.unexpected:
        problems.append(f"tensors the model does not have {_listing(r.unexpected)}")
    if problems:
        r.problem = f"does not match the {cfg.name} model inferred from its shapes: {'; '.join(problems)}"
    elif cfg is not None and cfg.unet.in_channels != cfg.vae.latent_channels:
        r.problem = (f"the UNet takes {cfg.unet.in_channels} input channels, not the {cfg.vae.latent_channels} "
                     f"latent channels (an inpainting or other variant model): not supported")
    return r


# ----------------------------------------------------------------------------- hashing

_hash_cache: dict[tuple, str] = {}


def checkpoint_sha256(files: list[Path]) -> str:
    """sha256 of the files' bytes in the given order, streamed; cached per (path, size, mtime)."""
    stamp = tuple((os.path.realpath(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if stamp not in _hash_cache:
        digest = hashlib.sha256()
        buffer = bytearray(8 << 20)
        view = memoryview(buffer)
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buffer):
                    digest.update(view[:n])
        _hash_cache[stamp] = digest.hexdigest()
    return _hash_cache[stamp]


# ----------------------------------------------------------------------------- public API

@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    format: str                 # "safetensors" | "ckpt" | "diffusers"
    layout: str                 # "single-file" | "diffusers"
    dtype: str                  # the file's model-tensor dtype(s), e.g. "float16" or "float16+float32"
    config_name: str            # "sd15", "tiny" or "custom"
    config: SDConfig
    sha256: str                 # of the file; of a folder's weight files in sorted order
    extra_keys: tuple[str, ...] = ()    # unknown non-model tensors, not loaded
    ignored_count: int = 0              # known non-model tensors (EMA, DDPM buffers, position_ids)

    @property
    def short_hash(self) -> str:
        """First 10 hex digits of sha256: the A1111 "Model hash"."""
        return self.sha256[:10]


def _dtype_summary(tensors: Mapping[str, SourceTensor], keys: Iterable[str]) -> str:
    counts = Counter(str(tensors[k].dtype).removeprefix("torch.") for k in keys)
    return "+".join(name for name, _ in counts.most_common()) or "none"


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               memory_format: torch.memory_format = torch.contiguous_format,
               ) -> tuple[StableDiffusionModel, CheckpointInfo]:
    """Load a single-file checkpoint or diffusers folder into an eval-mode StableDiffusionModel.
    4-D tensors (convolution weights) are written straight in `memory_format` (Pipeline: channels_last),
    so no second copy is made to change their layout.

    Raises CheckpointError (missing / mis-shaped / unexpected tensors named, unsafe pickle, unsupported
    model). The file's sha256 is computed on a second thread while the tensors load.
    """
    device = torch.device(device)
    with open_checkpoint(path) as source, ThreadPoolExecutor(1) as pool:
        cfg = infer_config({k: t.shape for k, t in source.tensors.items()})
        model = build_on_meta(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        report = check_keys(source.tensors, cfg, expected)
        if report.problem:
            raise CheckpointError(f"{source.path}: {report.problem}")
        if report.extra:
            log.warning("%s: ignoring unknown tensors %s", source.path, _listing(report.extra))
        sha256 = pool.submit(checkpoint_sha256, source.files)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # copies are memory-bound; extra threads only contend (page faults)
        try:
            state_dict = {key: materialize(source, key, dtype, device, memory_format) for key in expected}
        finally:
            torch.set_num_threads(threads)
        model.load_state_dict(state_dict, strict=True, assign=True)
        del state_dict
        left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left_on_meta:  # a module with a non-persistent buffer would need computing after the load
            raise RuntimeError(f"tensors not materialized by the checkpoint: {left_on_meta[:SHOW_KEYS]}")
        info = CheckpointInfo(
            path=source.path, format=source.format, layout=source.layout,
            dtype=_dtype_summary(source.tensors, report.model), config_name=cfg.name, config=cfg,
            sha256=sha256.result(), extra_keys=tuple(report.extra), ignored_count=len(report.ignored))
    return model.eval().requires_grad_(False), info


def inspect_checkpoint(path: str | Path, hash: bool = True) -> dict:
    """A JSON-friendly description of a checkpoint, for `batchsd inspect`; reads no tensor data.

    Raises CheckpointError only when the file cannot be read at all (unsafe pickle, not a checkpoint);
    a readable file that cannot be loaded has "loadable": False and the reason in "error".
    """
    with open_checkpoint(path) as source:
        tensors = source.tensors
        try:
            cfg = infer_config({k: t.shape for k, t in tensors.items()})
            report = check_keys(tensors, cfg, {k: tuple(v.shape) for k, v in build_on_meta(cfg).state_dict().items()})
            error = report.problem
        except CheckpointError as e:  # no config: every tensor is extra or ignored
            cfg, error = None, str(e)
            report = check_keys(tensors, None, {})
        out = {
            "path": str(source.path), "format": source.format, "layout": source.layout,
            "files": [str(f) for f in source.files], "size_bytes": sum(f.stat().st_size for f in source.files),
            "config": cfg.name if cfg else None, "config_detail": asdict(cfg) if cfg else None,
            "loadable": error is None, "error": error,
            "tensors": len(tensors),
            "dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())),
            "model_dtype": _dtype_summary(tensors, report.model),
            "model_tensors": len(report.model),
            "parameters": sum(math.prod(tensors[k].shape) for k in report.model),
            "components": {name: sum(k.startswith(p) for k in report.model) for name, p in ORIGINAL_PREFIX.items()},
            "ignored": len(report.ignored), "extra": report.extra, "missing": report.missing,
            "unexpected": report.unexpected,
            "mis_shaped": {k: [list(a), list(b)] for k, (a, b) in report.mis_shaped.items()},
            "not_float": report.not_float, "non_tensor_entries": source.skipped,
        }
        files = source.files
    if hash:
        out["sha256"] = checkpoint_sha256(files)
        out["short_hash"] = out["sha256"][:10]
    return out
