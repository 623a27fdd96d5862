"""GPU throughput, batchsd against diffusers: images/s at 512x512, 25 steps, batches 1/8/32, fp16.

    python tests/bench/bench_gpu.py                                  # CUDA, fp16, the issue's settings
    python tests/bench/bench_gpu.py --compile reduce-overhead        # batchsd with CUDA graphs too
    python tests/bench/bench_gpu.py --device cpu --dtype fp32 --size 64 --steps 1 --batches 1,2   # smoke test

Same random-weight SD 1.5 checkpoint as bench_vs_diffusers.py, both pipelines in one process on one
device, channels_last, SDPA (diffusers' default attention; batchsd's is SDPA), euler on both sides,
cfg 7.5, alternating batchsd / diffusers per batch size after one warm-up call each (the warm-up is
where `--compile` compiles; its time is reported). Reported per batch: images/s, the ratio, the
UNet's achieved TFLOP/s (counted FLOPs x steps x batch / wall time of the whole call, so a lower
bound) and its fraction of the device's dense peak (--peak-tflops: 989 for H100/H200 fp16), and the
peak device memory of each side's call.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
import torch  # noqa: E402
from bench_vs_diffusers import diffusers_generate, fmt_table, rows_for  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, peak device memory GiB) of one call, the device synchronized around it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return wall, peak


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--reps", type=int, default=1, help="timed calls per side and batch size (median)")
    ap.add_argument("--compile", default=None, help="batchsd's --compile mode (default: eager)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense peak at --dtype")
    args = ap.parse_args()
    from batchsd import GenerationRow, Pipeline

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    path = bc.random_checkpoint()
    t0 = time.perf_counter()
    ours = Pipeline.load(path, device=args.device, dtype=args.dtype, compile=args.compile)
    load_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = bc.load_diffusers(path, dtype).to(device)
    for m in (theirs.unet, theirs.vae):
        m.to(memory_format=torch.channels_last)
    load_theirs = time.perf_counter() - t0
    unet_tflop = bc.unet_tflop(args.size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}, {args.dtype}, {args.size}x{args.size}, {args.steps} steps euler, "
          f"cfg 7.5, compile {args.compile or 'off'}; load: batchsd {load_ours:.1f} s, diffusers {load_theirs:.1f} s",
          flush=True)

    table = []
    for batch in [int(b) for b in args.batches.split(",")]:
        rows = rows_for(batch, args.size, args.steps, tag=f"batch {batch}")
        ours_rows = [GenerationRow(prompt=r["prompt"], seed=r["seed"], steps=args.steps, cfg_scale=r["cfg_scale"],
                                   sampler="euler", width=args.size, height=args.size) for r in rows]
        ours_call = lambda: ours.generate(ours_rows)          # noqa: E731
        theirs_call = lambda: diffusers_generate(theirs, rows)  # noqa: E731
        warm = {"batchsd": timed_call(ours_call, device)[0], "diffusers": timed_call(theirs_call, device)[0]}
        runs = {"batchsd": [], "diffusers": []}
        for _ in range(args.reps):
            runs["batchsd"].append(timed_call(ours_call, device))
            runs["diffusers"].append(timed_call(theirs_call, device))
        cells = [batch]
        walls = {}
        for side in ("batchsd", "diffusers"):
            wall = bc.median([w for w, _ in runs[side]])
            walls[side] = wall
            tflops = unet_tflop * args.steps * batch / wall
            cells += [f"{batch / wall:.2f}", f"{tflops:.3g} ({tflops / args.peak_tflops:.1%})",
                      f"{max(p for _, p in runs[side]):.1f}", f"{warm[side]:.1f}"]
        cells.insert(5, f"{walls['diffusers'] / walls['batchsd']:.2f}x")
        table.append(cells)
        print(f"batch {batch}: batchsd {batch / walls['batchsd']:.2f} img/s, diffusers {batch / walls['diffusers']:.2f} img/s",
              flush=True)
    compiled = getattr(ours.unet, "compile_seconds", {})
    print(fmt_table(["batch", "batchsd img/s", "batchsd UNet TFLOP/s (of peak)", "batchsd peak GiB", "batchsd warm-up s",
                     "speed-up", "diffusers img/s", "diffusers UNet TFLOP/s (of peak)", "diffusers peak GiB",
                     "diffusers warm-up s"], table))
    if compiled:
        print("compile seconds per shape: " + ", ".join(f"{k[0]}: {v:.0f}" for k, v in compiled.items()))


if __name__ == "__main__":
    main()
