"""Shared pieces of the benchmarks: the random SD 1.5 checkpoint, the local diffusers config folder,
timing, peak-RSS and the matmul roof.

Nothing here is collected by pytest (tests/conftest.py ignores the bench/ folder).
"""
from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
# the reference key list; $BATCHSD_BENCH_KEYS names a copy where ../shared is not there (the GPU
# machine of device_gpu.sh gets the repository alone)
KEYS_JSON = Path(os.environ.get("BATCHSD_BENCH_KEYS", REPO.parent / "shared" / "reference" / "sd15_keys.json"))
CACHE = Path(os.environ.get("BATCHSD_BENCH_CACHE", Path.home() / ".cache" / "batchsd-bench"))
for _path in (REPO, REPO / "tests" / "model"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from ref_checkpoint import ddpm_buffers  # noqa: E402  (the DDPM buffers released files carry)
from batchsd.model.tokenizer import TOKENIZER_DATA  # noqa: E402


# ---------------------------------------------------------------- checkpoint
def _build_random_sd15(path: Path, dtype: torch.dtype, seed: int = 0) -> None:
    """Every key and shape of sd15_keys.json, random: 1-D weights are norm scales (1 + 0.1*randn),
    their biases 0.1*randn, other biases 0.05*randn, other weights randn / sqrt(fan_in)."""
    from safetensors.torch import save_file

    shapes = json.loads(KEYS_JSON.read_text())
    buffers = ddpm_buffers()
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if key in buffers:
            tensors[key] = buffers[key]
        elif key.endswith("position_ids"):
            tensors[key] = torch.arange(shape[-1], dtype=torch.int64).view(shape)
        elif key == "model_ema.decay":
            tensors[key] = torch.tensor(0.9999)
        elif key == "model_ema.num_updates":
            tensors[key] = torch.tensor(0, dtype=torch.int32)
        else:
            noise = torch.randn(shape, generator=g, dtype=torch.float32)
            stem = key.rsplit(".", 1)[0]
            norm_like = len(shapes.get(stem + ".weight", [0, 0])) == 1
            if len(shape) == 1 and norm_like:
                t = 1 + 0.1 * noise if key.endswith(".weight") else 0.1 * noise
            elif len(shape) == 1:
                t = 0.05 * noise
            else:
                t = noise / math.sqrt(math.prod(shape[1:]))
            tensors[key] = t.to(dtype)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def random_checkpoint(dtype: torch.dtype = torch.float16) -> Path:
    """A cached random-weight SD 1.5 single-file checkpoint (original layout) in CACHE.

    Built by `_build_random_sd15`, not tests/model/ref_checkpoint.random_sd15_checkpoint: that one draws
    every tensor with one std (fine for loader tests), while timings want weights scaled by fan-in
    so that activations stay O(1) through the whole UNet (no overflow, no denormals)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    name = {torch.float16: "fp16", torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    path = CACHE / f"sd15-random-{name}.safetensors"
    if path.exists():
        return path
    t0 = time.perf_counter()
    _build_random_sd15(path, dtype)
    how = "tests/bench/bench_common._build_random_sd15"
    print(f"# built {path} ({path.stat().st_size / 2**30:.2f} GiB) with {how} in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return path


# ---------------------------------------------------------------- diffusers config folder
SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}
SD15_TEXT = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
    "hidden_size": 768, "intermediate_size": 3072, "max_position_embeddings": 77, "num_attention_heads": 12,
    "num_hidden_layers": 12, "vocab_size": 49408, "layer_norm_eps": 1e-05, "projection_dim": 768,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "attention_dropout": 0.0, "dropout": 0.0,
    "initializer_factor": 1.0, "initializer_range": 0.02, "torch_dtype": "float32",
}
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "trained_betas": None,
}
SD15_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
    "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
    "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def diffusers_config_folder() -> Path:
    """A local diffusers folder with the SD 1.5 configs (no weights) for from_single_file(config=...)."""
    root = CACHE / "sd15-diffusers-config"
    files = {
        "model_index.json": SD15_INDEX,
        "unet/config.json": SD15_UNET,
        "vae/config.json": SD15_VAE,
        "text_encoder/config.json": SD15_TEXT,
        "scheduler/scheduler_config.json": SD15_SCHEDULER,
        "tokenizer/tokenizer_config.json": {
            "model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True,
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "errors": "replace", "add_prefix_space": False,
        },
        "tokenizer/special_tokens_map.json": {
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
        },
    }
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(content, indent=2)
        if not p.exists() or p.read_text() != text:
            p.write_text(text)
    for name in ("vocab.json", "merges.txt"):
        src, dst = TOKENIZER_DATA / name, root / "tokenizer" / name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            dst.write_bytes(src.read_bytes())
    return root


def load_diffusers(path: Path, dtype: torch.dtype, scheduler: str = "euler"):
    """StableDiffusionPipeline.from_single_file offline, safety checker off, the given scheduler."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as dlogging

    dlogging.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(diffusers_config_folder()), torch_dtype=dtype,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True,
    )
    if scheduler == "euler":
        sched = dict(SD15_SCHEDULER)
        sched.pop("_class_name")
        sched.pop("skip_prk_steps")
        pipe.scheduler = EulerDiscreteScheduler.from_config(sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_batchsd(path: Path, dtype: str, **options):
    """batchsd's Pipeline.load on the CPU, as shipped (options: Pipeline.load's, e.g. compile)."""
    from batchsd import Pipeline

    return Pipeline.load(path, device="cpu", dtype=dtype, **options)


def dtype_name(dtype: torch.dtype) -> str:
    """"fp32", "fp16" or "bf16": the name batchsd's --dtype option gives a torch dtype."""
    from batchsd.model.devices import DTYPES

    return {v: k for k, v in DTYPES.items()}[dtype]


def cpu_description() -> str:
    """What decides the CPU figures: the ISA torch dispatches to and whether AMX tiles are there
    (bf16 matmuls are several times faster than fp32 with AMX, and no faster without it)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    from batchsd.model.devices import cpu_model

    return f"CPU capability {torch.backends.cpu.get_cpu_capability()}, AMX {'yes' if amx else 'no'}, " \
           f"avx512-bf16 {'yes' if bf16 else 'no'}, {os.cpu_count()} cores, {cpu_model()}"


# ---------------------------------------------------------------- measuring
def git_state() -> str:
    """HEAD commit, and whether batchsd/ differs from it (modules still being written are measured as they are)."""
    import subprocess

    try:
        head = subprocess.run(["git", "log", "-1", "--format=%h"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "batchsd"], cwd=REPO, capture_output=True, text=True).stdout
        return head + (" + uncommitted batchsd/ changes" if dirty.strip() else "")
    except OSError:
        return "unknown"

def peak_rss_gib(own: bool = False) -> float:
    """This process's peak resident set size so far, GiB.

    own=True reads VmHWM from /proc/self/status: the peak of this process's own address space.
    ru_maxrss (the default) also carries the peak of the parent's address space at fork time
    across exec on Linux, so a child forked from a big process reads the parent's size."""
    if own:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
        except OSError:
            pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_child(script: str, *args: str, what: str) -> object:
    """Run `python script args` in a fresh process and return the JSON of the last stdout line that
    starts with "CHILD " (how the benchmarks' child processes report); raises with the child's
    stderr tail if it failed or printed none."""
    import subprocess

    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("CHILD "):])


def pixel_diff(a, b) -> dict:
    """Mean and max |pixel difference| (0-255) of two PIL images, as RGB: the benchmarks' check that
    both sides made the same image."""
    import numpy as np

    a, b = (np.asarray(im.convert("RGB"), dtype=np.float32) for im in (a, b))
    return {"mean_abs_pixel_diff": float(np.abs(a - b).mean()), "max_abs_pixel_diff": float(np.abs(a - b).max())}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed2(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this whole process, all threads). While other processes load
    the machine the wall time stretches; the CPU time much less (it still grows a little with
    cache sharing and OpenMP spin-waits), so it is the steadier figure for a comparison."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


class _unfolded:
    """Within: the upsamples computed as interpolate + 3x3 conv (NearestUpsampleConv.fold off)."""

    def __init__(self, cls):
        self.cls = cls

    def __enter__(self):
        self.cls.fold = False

    def __exit__(self, *exc):
        self.cls.fold = True


def unet_tflop(size: int) -> float:
    """TFLOP (2 x MACs) of one SD 1.5 UNet forward on a CFG pair at size x size, counted with
    torch's FlopCounterMode on the meta device (no compute). 1.607 at 512; at 256 it is 0.360,
    less than the pixel-count scaling (0.402) because attention is quadratic in tokens. These are the
    direct computation's FLOPs (upsample as interpolate + 3x3 conv): batchsd's folded upsamples and
    Winograd convolutions do fewer, so its TFLOP/s is an effective rate and can pass the roof."""
    from torch.utils.flop_counter import FlopCounterMode

    from batchsd.model.config import SD15
    from batchsd.model.unet import UNetModel
    from batchsd.model.fast.upsample import NearestUpsampleConv

    with torch.device("meta"), _unfolded(NearestUpsampleConv):
        unet = UNetModel(SD15.unet)
        x = torch.zeros(2, 4, size // 8, size // 8)
        ctx = torch.zeros(2, 77, 768)
        t = torch.zeros(2)
        with FlopCounterMode(display=False) as counter:
            unet(x, t, ctx)
    return counter.get_total_flops() / 1e12


@torch.inference_mode()
def matmul_roof(dtype: torch.dtype, n: int = 4096, reps: int = 3) -> float:
    """Practical roof: TFLOP/s of torch.mm on n x n matrices (best of reps, after a warm-up)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    times = [timed(lambda: torch.mm(a, b)) for _ in range(reps)]
    return 2 * n ** 3 / min(times) / 1e12
