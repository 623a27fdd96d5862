"""Evidence for the speed levers, on batchsd's own modules (no diffusers): what each would buy.

    python tests/bench/bench_levers.py                       # all cheap experiments (~3-5 min idle, 2 cores)
    python tests/bench/bench_levers.py --only threads,norm   # a subset
    python tests/bench/bench_levers.py --compile             # also torch.compile of the whole UNet (slow to compile)

Experiments
  stages   FLOP shares of one image: text encoder, UNet steps (CFG), VAE decode, at 256 and 512
           (counted with FlopCounterMode on the meta device, no compute).
  norm     GroupNorm + SiLU of the res blocks: eager (two passes over memory) against a compiled
           fused kernel, on the largest SD 1.5 shape (2 x 320 x 64 x 64), fp32/bf16, both layouts.
  layout   one full UNet CFG step at --size, --dtype (default 256x256 bf16): contiguous against channels_last weights+input.
  vae      batchsd's VAE decode of 2 latents at 256x256 bf16: as Pipeline runs it (NCHW) against
           channels_last weights + input; diffusers' decoder runs channels_last already (its
           attention returns a channels_last view that the residual add carries on).
  threads  the same step at 1 and 2 threads (wall and CPU time).
  batch    CPU seconds per image-step against the number of images per forward (CFG pairs of
           1, 2, 4, 8 images): a large per-forward fixed cost (weight reorders/packing for oneDNN
           convolutions and AMX matmuls, done on every call in eager mode) shows as a per-image cost
           that falls steeply with batch.
  pack     a full UNet CFG step and a VAE decode (1 latent) at --size, fp32 and bf16, channels_last:
           plain nn.Conv2d (oneDNN reorders each weight on every call) against packed_conv.PackedConv2d
           (reordered once), interleaved; minor page faults per call beside the times.
  fold     the same UNet step and VAE decode at --size, fp32 and bf16, packed, channels_last: each
           upsample as interpolate + 3x3 conv against the folded 2x2 conv of batchsd/model/fast/upsample.py
           (NearestUpsampleConv.fold), interleaved; max |diff| between the two beside the times.
  wino     the same UNet step at --size, fp32 and bf16, channels_last: packed convs against Winograd
           F(2x2,3x3) on the convs with >= 640 input channels, on every level (winograd.use_winograd)
           and without the lowest-resolution level (use_winograd_in_model, shipped), interleaved; the
           transformed weights' memory beside the times. (The VAE has no convs that wide.)
  packnow  (--only packnow) load + first image (256x256, 4 steps, fp32 and bf16), each in a fresh
           process as `batchsd run` starts: convs packed at their first call against packed_conv.pack_now
           at load (shipped), alternating; times and minor page faults of each phase.
  packshape (--only packshape) one conv at several input shapes, fp32 and bf16: weight packed for
           that shape against packed for a 64x64 and an 8x8 map (pack_now packs for a nominal shape).
  alloc    (--only alloc) the same UNet step and VAE decode at 512x512 fp32, each in a fresh process,
           with glibc's default malloc against allocator.tune_cpu_allocator (heap only, freed memory
           kept); peak RSS beside the times.
  compile  (--compile) torch.compile(unet) at --size, --dtype, channels_last, with inductor's
           `freezing` on (weights constant-folded and pre-packed for oneDNN) and off: compile time,
           step time.

Wall times on a shared machine stretch with other processes' load; CPU time (process, all
threads) is printed beside them as the steadier figure.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def best(fn, reps: int = 3) -> tuple[float, float]:
    """(min wall, min CPU) over reps after one warm-up."""
    fn()
    runs = [bc.timed2(fn) for _ in range(reps)]
    return min(w for w, _ in runs), min(c for _, c in runs)


# ---------------------------------------------------------------- stages
def stages() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from batchsd.model.clip import CLIPTextModel
    from batchsd.model.config import SD15
    from batchsd.model.vae import AutoencoderKL

    with torch.device("meta"):
        vae, clip = AutoencoderKL(SD15.vae), CLIPTextModel(SD15.clip)
        with FlopCounterMode(display=False) as fc:
            clip(torch.zeros(1, 77, dtype=torch.long))
        text = fc.get_total_flops() / 1e12
        log("| size | steps | text (2 prompts) | UNet (CFG) | VAE decode | VAE share |")
        log("|---|---|---|---|---|---|")
        for size in (256, 512):
            with FlopCounterMode(display=False) as fc:
                vae.decode(torch.zeros(1, 4, size // 8, size // 8))
            dec = fc.get_total_flops() / 1e12
            step = bc.unet_tflop(size)
            for steps in (4, 25):
                total = 2 * text + steps * step + dec
                log(f"| {size} | {steps} | {2 * text:.3f} TFLOP | {steps * step:.2f} TFLOP | {dec:.2f} TFLOP | {dec / total:.0%} |")


# ---------------------------------------------------------------- norm
@torch.inference_mode()
def norm_fusion() -> None:
    gn = torch.nn.GroupNorm(32, 320, eps=1e-5)

    def eager(x):
        return F.silu(gn(x))

    fused = torch.compile(eager, dynamic=False)
    log("| dtype | layout | eager GN+SiLU ms | compiled fused ms | eager / fused | eager GN alone ms |")
    log("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        gn.to(dtype)
        for layout in ("contig", "cl"):
            x = torch.randn(2, 320, 64, 64).to(dtype)
            if layout == "cl":
                x = x.contiguous(memory_format=torch.channels_last)
            t0 = time.perf_counter()
            fused(x)
            compile_s = time.perf_counter() - t0
            e, _ = best(lambda: eager(x), 10)
            f, _ = best(lambda: fused(x), 10)
            g, _ = best(lambda: gn(x), 10)
            log(f"| {str(dtype)[6:]} | {layout} | {e * 1e3:.2f} | {f * 1e3:.2f} (compile {compile_s:.0f} s) | "
                f"{e / f:.2f} | {g * 1e3:.2f} |")


# ---------------------------------------------------------------- VAE layout
def sd15_vae(dtype: torch.dtype):
    from safetensors import safe_open

    from batchsd.model.config import SD15
    from batchsd.model.vae import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(SD15.vae)
    prefix = "first_stage_model."
    with safe_open(str(bc.random_checkpoint()), "pt") as f:
        sd = {k[len(prefix):]: f.get_tensor(k).to(dtype) for k in f.keys() if k.startswith(prefix)}
    vae.load_state_dict(sd, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


@torch.inference_mode()
def vae_layout(size: int) -> None:
    vae = sd15_vae(torch.bfloat16)
    z = torch.randn(2, 4, size // 8, size // 8).to(torch.bfloat16)
    ref = vae.decode(z)
    log(f"| VAE decode, 2 latents, {size}x{size}, bf16 | wall s (best of 3) | CPU s | max |diff| vs NCHW |")
    log("|---|---|---|---|")
    for layout in ("contig", "cl", "contig", "cl"):
        fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
        vae.to(memory_format=fmt)
        zin = z.contiguous(memory_format=fmt)
        w, c = best(lambda: vae.decode(zin))
        diff = (vae.decode(zin).float() - ref.float()).abs().max().item()
        log(f"| {layout} | {w:.2f} | {c:.2f} | {diff:.3f} |")


# ---------------------------------------------------------------- packed weights, allocator
def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed_faults(fn, reps: int = 2) -> tuple[float, float, int]:
    """(min wall, min CPU, page faults of the fastest call) over reps after one warm-up."""
    fn()
    runs = []
    for _ in range(reps):
        f0 = minor_faults()
        wall, cpu = bc.timed2(fn)
        runs.append((wall, cpu, minor_faults() - f0))
    return min(runs)


def set_packed(module: torch.nn.Module, packed: bool) -> None:
    from batchsd.model.fast.packed_conv import pack_convolutions, PackedConv2d

    if packed:
        pack_convolutions(module)
        return
    for m in module.modules():
        if isinstance(m, PackedConv2d):
            m.unpack()
            m.__class__ = torch.nn.Conv2d


@torch.inference_mode()
def packing(size: int) -> None:
    log(f"| packed conv weights ({size}x{size}, channels_last) | dtype | plain: wall s / CPU s / faults | "
        "packed: wall s / CPU s / faults | speed-up (wall) |")
    log("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        unet, vae, (x, t, ctx), z = cl_models_and_inputs(size, dtype)
        for name, module, fn in (("UNet CFG step", unet, lambda: unet(x, t, ctx)), ("VAE decode", vae, lambda: vae.decode(z))):
            res = {}
            for packed in (False, True, False, True):   # twice, interleaved; keep each side's best
                set_packed(module, packed)
                r = timed_faults(fn)
                res[packed] = min(res.get(packed, r), r)
            p, q = res[False], res[True]
            log(f"| {name} | {str(dtype)[6:]} | {p[0]:.2f} / {p[1]:.2f} / {p[2]} | {q[0]:.2f} / {q[1]:.2f} / {q[2]} | "
                f"{p[0] / q[0]:.2f}x |")
        del unet, vae


def interleaved(run) -> tuple[tuple[float, float], tuple[float, float], float]:
    """run(on) with the lever off and on, twice, interleaved: each side's best (wall, CPU) of 2 after
    a warm-up, and max |on - off| / max |off| of the outputs."""
    res, outs = {}, {}
    for on in (False, True, False, True):
        r = best(lambda: run(on), 2)
        res[on] = min(res.get(on, r), r)
        outs[on] = run(on).float()
    diff = (outs[True] - outs[False]).abs().max().item() / outs[False].abs().max().item()
    return res[False], res[True], diff


@torch.inference_mode()
def folding(size: int) -> None:
    from batchsd.model.fast.allocator import tune_cpu_allocator
    from batchsd.model.fast.upsample import NearestUpsampleConv

    tune_cpu_allocator()                 # as `batchsd run` does on the CPU
    log(f"| folded upsample conv ({size}x{size}, channels_last, packed) | dtype | interpolate + 3x3: wall s / CPU s | "
        "folded 2x2: wall s / CPU s | speed-up (wall) | max abs diff / max abs output |")
    log("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        unet, vae, (x, t, ctx), z = cl_models_and_inputs(size, dtype)
        set_packed(unet, True)
        set_packed(vae, True)
        for name, fn in (("UNet CFG step", lambda: unet(x, t, ctx)), ("VAE decode", lambda: vae.decode(z))):
            def run(fold: bool, fn=fn):
                NearestUpsampleConv.fold = fold
                return fn()

            p, q, diff = interleaved(run)
            NearestUpsampleConv.fold = True
            log(f"| {name} | {str(dtype)[6:]} | {p[0]:.2f} / {p[1]:.2f} | {q[0]:.2f} / {q[1]:.2f} | "
                f"{p[0] / q[0]:.2f}x | {diff:.1e} |")
        del unet, vae


@torch.inference_mode()
def winograd(size: int) -> None:
    from types import SimpleNamespace

    from batchsd.model.fast.allocator import tune_cpu_allocator
    from batchsd.model.fast.upsample import NearestUpsampleConv
    from batchsd.model.fast.winograd import WinogradConv2d, use_winograd, use_winograd_in_model

    tune_cpu_allocator()                 # as `batchsd run` does on the CPU
    log(f"| Winograd F(2x2,3x3), >= 640 input channels ({size}x{size}, UNet CFG step, channels_last) | dtype | "
        "packed: wall s / CPU s | Winograd: wall s / CPU s | speed-up (wall) | max abs diff / max abs output | "
        "convs | extra weight memory, GiB |")
    log("|---|---|---|---|---|---|---|---|")
    cl = torch.channels_last
    # the shipped rule takes a model (UNet and VAE); the VAE has no convs that wide
    rules = (("every level", use_winograd),
             ("without the lowest level (shipped)",
              lambda unet: use_winograd_in_model(SimpleNamespace(unet=unet, vae=torch.nn.Module()))))
    for dtype in (torch.float32, torch.bfloat16):
        x, t, ctx = step_inputs(size, dtype, "cl")
        plain = sd15_unet(dtype).to(memory_format=cl)
        set_packed(plain, True)
        for rule, apply in rules:
            wino = sd15_unet(dtype).to(memory_format=cl)
            count = apply(wino)
            set_packed(wino, True)
            # the upsamples' own 3x3 convs are marked too but run folded (upsample.py): no transform made
            folded = {id(m.conv) for m in wino.modules() if isinstance(m, NearestUpsampleConv)}
            extra = sum(m.weight.numel() * m.weight.element_size() * 16 / 9 for m in wino.modules()
                        if isinstance(m, WinogradConv2d) and m.winograd and id(m) not in folded) / 2**30
            p, q, diff = interleaved(lambda on: (wino if on else plain)(x, t, ctx))
            log(f"| {rule} | {str(dtype)[6:]} | {p[0]:.2f} / {p[1]:.2f} | {q[0]:.2f} / {q[1]:.2f} | "
                f"{p[0] / q[0]:.2f}x | {diff:.1e} | {count} | {extra:.2f} |")
            del wino
        del plain


def alloc_child(tuned: bool, size: int) -> None:
    """One fresh process: batchsd's UNet step and VAE decode (packed, channels_last, fp32), with or
    without the tuned allocator; prints JSON."""
    from batchsd.model.fast.allocator import tune_cpu_allocator
    from batchsd.model.fast.packed_conv import pack_convolutions

    if tuned:
        assert tune_cpu_allocator()
    unet, vae, (x, t, ctx), z = cl_models_and_inputs(size, torch.float32)
    pack_convolutions(unet)
    pack_convolutions(vae)
    with torch.inference_mode():
        u = timed_faults(lambda: unet(x, t, ctx))
        v = timed_faults(lambda: vae.decode(z))
    print("CHILD " + json.dumps(dict(tuned=tuned, unet=u, vae=v, peak_rss_gib=bc.peak_rss_gib(own=True))))


def allocator(size: int = 512) -> None:
    log(f"| malloc ({size}x{size}, fp32, packed, cl; fresh process each) | UNet CFG step: wall s / CPU s / faults | "
        "VAE decode: wall s / CPU s / faults | peak RSS GiB |")
    log("|---|---|---|---|")
    for tuned in (False, True, False, True):
        r = bc.run_child(__file__, "--alloc-child", "tuned" if tuned else "plain", "--size", str(size),
                         what="allocator child")
        log(f"| {'tune_cpu_allocator' if tuned else 'glibc default'} | {r['unet'][0]:.2f} / {r['unet'][1]:.2f} / "
            f"{r['unet'][2]} | {r['vae'][0]:.2f} / {r['vae'][1]:.2f} / {r['vae'][2]} | {r['peak_rss_gib']:.2f} |")


def packnow_child(at_load: bool, dtype_name: str) -> None:
    """One fresh process: load the benchmark checkpoint as `batchsd run` does on the CPU, then one
    256x256 image of 4 steps; prints JSON (seconds and minor page faults of load and first image)."""
    import batchsd.model.pipeline as pipeline_module
    from batchsd import GenerationRow
    from batchsd.model.fast.allocator import tune_cpu_allocator

    assert tune_cpu_allocator()
    if not at_load:
        pipeline_module.pack_now = lambda *modules: 0          # every conv packed at its first call
    f0, t0 = minor_faults(), time.perf_counter()
    pipe = bc.load_batchsd(bc.random_checkpoint(), dtype_name)
    f1, t1 = minor_faults(), time.perf_counter()
    with torch.inference_mode():
        pipe.generate([GenerationRow(prompt="a lighthouse at dawn", seed=1, steps=4, sampler="euler",
                                     width=256, height=256)])
    f2, t2 = minor_faults(), time.perf_counter()
    print("CHILD " + json.dumps(dict(load_s=t1 - t0, load_faults=f1 - f0, first_s=t2 - t1, first_faults=f2 - f1,
                                     peak_rss_gib=bc.peak_rss_gib(own=True))))


def pack_at_load() -> None:
    log("| convs packed (fresh process each, 256x256, 4 steps) | dtype | load: s / faults | first image: s / faults "
        "| load + first image, s | peak RSS GiB |")
    log("|---|---|---|---|---|---|")
    for dtype_name in ("fp32", "bf16"):
        for at_load in (False, True, False, True):
            r = bc.run_child(__file__, "--packnow-child", "load" if at_load else "first", "--dtype", dtype_name,
                             what="packnow child")
            log(f"| {'at load, largest first (pack_now)' if at_load else 'at the first call'} | {dtype_name} | "
                f"{r['load_s']:.2f} / {r['load_faults']} | {r['first_s']:.2f} / {r['first_faults']} | "
                f"{r['load_s'] + r['first_s']:.2f} | {r['peak_rss_gib']:.2f} |")


@torch.inference_mode()
def pack_shape() -> None:
    """Does the blocked layout oneDNN picks depend on the input's size? Each conv (packed_conv.PackedConv2d)
    runs at each shape with its weight packed for that shape, for a 64x64 map and for an 8x8 map
    (batch 1; PackedConv2d.pack, as pack_now does); best of 3."""
    from batchsd.model.fast.packed_conv import PackedConv2d

    log("| 3x3 conv, packed for (channels_last) | dtype | channels | input | that shape, s | 64x64, s | 8x8, s | max |diff| |")
    log("|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for ch, sides in ((320, (8, 32, 64)), (640, (16, 32)), (1280, (4, 8, 16))):
            conv = torch.nn.Conv2d(ch, ch, 3, padding=1).to(dtype).to(memory_format=torch.channels_last)
            conv.__class__ = PackedConv2d
            for side in sides:
                for batch in (2, 16):
                    x = torch.randn(batch, ch, side, side, dtype=dtype).contiguous(memory_format=torch.channels_last)
                    times, outs = [], []
                    for shape in ((batch, ch, side, side), (1, ch, 64, 64), (1, ch, 8, 8)):
                        conv.unpack()                  # the exact plain weight back, packed again for `shape`
                        conv.pack(shape)
                        outs.append(conv(x).float())
                        times.append(best(lambda: conv(x))[0])
                    diff = max((o - outs[0]).abs().max().item() for o in outs[1:])
                    log(f"| | {str(dtype)[6:]} | {ch} | {batch}x{side}x{side} | {times[0]:.4f} | {times[1]:.4f} | "
                        f"{times[2]:.4f} | {diff:.1e} |")


# ---------------------------------------------------------------- a whole UNet step
def sd15_unet(dtype: torch.dtype):
    """batchsd's SD 1.5 UNet with the benchmark checkpoint's weights."""
    from safetensors import safe_open

    from batchsd.model.config import SD15
    from batchsd.model.unet import UNetModel

    path = bc.random_checkpoint()
    with torch.device("meta"):
        unet = UNetModel(SD15.unet)
    prefix = "model.diffusion_model."
    with safe_open(str(path), "pt") as f:
        sd = {k[len(prefix):]: f.get_tensor(k).to(dtype) for k in f.keys() if k.startswith(prefix)}
    unet.load_state_dict(sd, strict=True, assign=True)
    return unet.eval().requires_grad_(False)


def step_inputs(size: int, dtype: torch.dtype, layout: str):
    x = torch.randn(2, 4, size // 8, size // 8).to(dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768).to(dtype)


def cl_models_and_inputs(size: int, dtype: torch.dtype):
    """The SD 1.5 UNet and VAE in channels_last (convs not packed), a CFG-pair step's inputs
    (x, t, ctx) and one latent z to decode, all at `size` in `dtype`."""
    cl = torch.channels_last
    unet = sd15_unet(dtype).to(memory_format=cl)
    vae = sd15_vae(dtype).to(memory_format=cl)
    z = torch.randn(1, 4, size // 8, size // 8).to(dtype).contiguous(memory_format=cl)
    return unet, vae, step_inputs(size, dtype, "cl"), z


@torch.inference_mode()
def layout_and_threads(unet, size: int, only: set[str]) -> None:
    dtype = next(unet.parameters()).dtype
    if "layout" in only:
        log(f"| layout ({str(dtype)[6:]}, {size}x{size}, CFG pair) | wall s (best of 3) | CPU s |")
        log("|---|---|---|")
        for layout in ("contig", "cl", "contig", "cl"):   # twice, interleaved
            unet.to(memory_format=torch.channels_last if layout == "cl" else torch.contiguous_format)
            x, t, ctx = step_inputs(size, dtype, layout)
            w, c = best(lambda: unet(x, t, ctx))
            log(f"| {layout} | {w:.2f} | {c:.2f} |")
    if "threads" in only:
        unet.to(memory_format=torch.channels_last)
        x, t, ctx = step_inputs(size, dtype, "cl")
        n0 = torch.get_num_threads()
        log(f"| threads ({str(dtype)[6:]}, {size}x{size}, channels_last) | wall s (best of 3) | CPU s |")
        log("|---|---|---|")
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            w, c = best(lambda: unet(x, t, ctx))
            log(f"| {n} | {w:.2f} | {c:.2f} |")
        torch.set_num_threads(n0)


@torch.inference_mode()
def batch_scaling(unet, size: int) -> None:
    dtype = next(unet.parameters()).dtype
    unet.to(memory_format=torch.channels_last)
    log(f"| images per forward ({str(dtype)[6:]}, {size}x{size}, cl; UNet batch = 2x) | wall s | CPU s | CPU s per image-step |")
    log("|---|---|---|---|")
    for n in (1, 2, 4, 8):
        x, t, ctx = step_inputs(size, dtype, "cl")
        x, ctx = x.repeat(n, 1, 1, 1).contiguous(memory_format=torch.channels_last), ctx.repeat(n, 1, 1)
        t = t.repeat(n)
        w, c = best(lambda: unet(x, t, ctx), 2)
        log(f"| {n} | {w:.2f} | {c:.2f} | {c / n:.2f} |")


@torch.inference_mode()
def compile_unet(unet, size: int) -> None:
    import torch._inductor.config as inductor_config

    dtype = next(unet.parameters()).dtype
    unet.to(memory_format=torch.channels_last)
    x, t, ctx = step_inputs(size, dtype, "cl")
    set_packed(unet, True)                 # the eager path as Pipeline runs it on the CPU
    eager_w, eager_c = best(lambda: unet(x, t, ctx))
    set_packed(unet, False)                # torch.compile takes the plain modules (as Pipeline does)
    log(f"| torch.compile ({str(dtype)[6:]}, {size}x{size}, cl, CFG pair) | compile s | wall s | CPU s | eager/compiled (CPU) |")
    log("|---|---|---|---|---|")
    log(f"| eager, packed weights (shipped) | - | {eager_w:.2f} | {eager_c:.2f} | 1.00 |")
    for freezing in (False, True):
        torch._dynamo.reset()
        inductor_config.freezing = freezing
        compiled = torch.compile(unet, dynamic=False)
        t0 = time.perf_counter()
        compiled(x, t, ctx)
        compile_s = time.perf_counter() - t0
        w, c = best(lambda: compiled(x, t, ctx))
        log(f"| inductor, freezing={freezing} | {compile_s:.0f} | {w:.2f} | {c:.2f} | {eager_c / c:.2f} |")
    inductor_config.freezing = False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="stages,norm,vae,pack,fold,wino,layout,threads,batch")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                    help="dtype of the layout, threads, batch and compile experiments")
    ap.add_argument("--alloc-child", choices=["plain", "tuned"], help=argparse.SUPPRESS)
    ap.add_argument("--packnow-child", choices=["first", "load"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.alloc_child:
        return alloc_child(args.alloc_child == "tuned", args.size)
    if args.packnow_child:
        return packnow_child(args.packnow_child == "load", args.dtype)
    only = set(args.only.split(","))
    log(f"# {time.strftime('%Y-%m-%d %H:%M')} torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}, code {bc.git_state()}")
    if "stages" in only:
        stages()
    if "norm" in only:
        norm_fusion()
    if "vae" in only:
        vae_layout(args.size)
    if "pack" in only:
        packing(args.size)
    if "fold" in only:
        folding(args.size)
    if "wino" in only:
        winograd(args.size)
    if "alloc" in only:
        allocator()
    if "packnow" in only:
        pack_at_load()
    if "packshape" in only:
        pack_shape()
    if only & {"layout", "threads", "batch"} or args.compile:
        unet = sd15_unet({"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype])
        layout_and_threads(unet, args.size, only)
        if "batch" in only:
            batch_scaling(unet, args.size)
        if args.compile:
            compile_unet(unet, args.size)


if __name__ == "__main__":
    main()
