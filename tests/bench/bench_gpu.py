"""GPU throughput, batchsd against diffusers: images/s at 512x512, 25 steps, batches 1/8/32, fp16.

    python tests/bench/bench_gpu.py                                  # CUDA, fp16, the issue's settings
    python tests/bench/bench_gpu.py --compile reduce-overhead        # batchsd with CUDA graphs too
    python tests/bench/bench_gpu.py --device cpu --dtype fp32 --size 64 --steps 1 --batches 1,2 --e2e-rows 4
                                                                     # smoke test (~1 min on 2 cores)
    bash tests/bench/device_gpu.sh                                   # on the device tool's machine

Same random-weight SD 1.5 checkpoint as bench_vs_diffusers.py, both pipelines in one process on one
device, channels_last, SDPA (diffusers' default attention; batchsd's is SDPA), euler on both sides,
cfg 7.5. Four figures, batchsd / diffusers, each side after its own warm-up call (where `--compile`
compiles; its time is reported), the sides alternating:
  1. UNet forward on a CFG batch (2 x rows) per batch size: median of --unet-reps timed calls, as
     TFLOP/s (counted FLOPs, bench_common.unet_tflop) and its fraction of the device's dense peak
     (--peak-tflops: 989 for H100/H200 fp16).
  2. Generate (text, --steps of euler, VAE decode, PIL images) per batch size: images/s, the UNet's
     share as a lower bound of its TFLOP/s (UNet FLOPs x steps x batch / wall of the whole call),
     peak device memory of the call.
  3. Parity: the first row at batch 1, batchsd's image against diffusers' (mean and max |pixel
     difference|, 0-255), a check that both do the same work.
  4. End to end: --e2e-rows rows as a Parquet manifest through `batchsd run` (batchsd.job.run.run on the
     loaded pipeline: PNG + metadata, journal, results.parquet) in batches of --e2e-batch, against a
     diffusers loop over the same rows saving PNGs.
--json PATH writes every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
import torch  # noqa: E402
from bench_vs_diffusers import batchsd_run, diffusers_generate, diffusers_loop, fmt_table, rows_for  # noqa: E402

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


def unet_inputs(batch: int, size: int, device: torch.device, dtype: torch.dtype):
    """A CFG batch for `batch` rows: latents [2*batch, 4, size/8, size/8] (channels_last), timesteps, context."""
    g = torch.Generator("cpu").manual_seed(batch)
    x = torch.randn(2 * batch, 4, size // 8, size // 8, generator=g).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    t = torch.full((2 * batch,), 500.0, device=device)
    ctx = torch.randn(2 * batch, 77, 768, generator=g).to(device, dtype)
    return x, t, ctx


def bench_unet(ours, theirs, batch: int, size: int, reps: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Median wall seconds of one UNet forward on the CFG batch of `batch` rows, each side warmed
    up twice, then alternating; plus the largest relative difference of the two outputs."""
    x, t, ctx = unet_inputs(batch, size, device, dtype)
    calls = {"batchsd": lambda: ours.unet(x, t, ctx),
             "diffusers": lambda: theirs.unet(x, t, encoder_hidden_states=ctx).sample}
    for fn in calls.values():
        fn(), fn()
    walls = {side: [] for side in calls}
    for _ in range(reps):
        for side, fn in calls.items():
            walls[side].append(timed_call(fn, device)[0])
    a, d = calls["batchsd"]().float(), calls["diffusers"]().float()
    return {"batch": batch, **{f"{side}_s": bc.median(w) for side, w in walls.items()},
            "max_rel_diff": float((a - d).abs().max() / d.abs().max())}


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--reps", type=int, default=1, help="timed generate calls per side and batch size (median)")
    ap.add_argument("--unet-reps", type=int, default=5, help="timed UNet forwards per side and batch size (median)")
    ap.add_argument("--e2e-rows", type=int, default=64, help="rows through `batchsd run` and the diffusers loop; 0: skip")
    ap.add_argument("--e2e-batch", type=int, default=32)
    ap.add_argument("--compile", default=None, help="batchsd's --compile mode (default: eager)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense peak at --dtype")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = ap.parse_args()
    from batchsd import GenerationRow, Pipeline

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    path = bc.random_checkpoint()
    build_s = time.perf_counter() - t0
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
    res = {"device": name, "torch": torch.__version__, "dtype": args.dtype, "size": args.size, "steps": args.steps,
           "compile": args.compile, "peak_tflops": args.peak_tflops, "unet_tflop_per_cfg_pair": unet_tflop,
           "checkpoint_build_s": build_s, "load_s": {"batchsd": load_ours, "diffusers": load_theirs},
           "unet": [], "generate": [], "parity": None, "e2e": None, "code": bc.git_state()}
    print(f"# {name}, torch {torch.__version__}, {args.dtype}, {args.size}x{args.size}, {args.steps} steps euler, "
          f"cfg 7.5, compile {args.compile or 'off'}, code {res['code']}; checkpoint {build_s:.0f} s; "
          f"load: batchsd {load_ours:.1f} s, diffusers {load_theirs:.1f} s", flush=True)

    def dump() -> None:
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))

    batches = [int(b) for b in args.batches.split(",")]
    # 1. the UNet alone
    for batch in batches:
        r = bench_unet(ours, theirs, batch, args.size, args.unet_reps, device, dtype)
        res["unet"].append(r)
        print(f"unet batch {batch} (CFG {2 * batch}): batchsd {r['batchsd_s'] * 1e3:.1f} ms, diffusers "
              f"{r['diffusers_s'] * 1e3:.1f} ms, max rel diff {r['max_rel_diff']:.1e}", flush=True)
        dump()
    # 2-3. generate, and the parity of its batch-1 images
    for batch in batches:
        rows = rows_for(batch, args.size, args.steps, tag=f"batch {batch}")
        ours_rows = [GenerationRow(prompt=r["prompt"], seed=r["seed"], steps=args.steps, cfg_scale=r["cfg_scale"],
                                   sampler="euler", width=args.size, height=args.size) for r in rows]
        made = {}
        calls = {"batchsd": lambda: made.__setitem__("batchsd", ours.generate(ours_rows).images),
                 "diffusers": lambda: made.__setitem__("diffusers", diffusers_generate(theirs, rows))}
        warm = {side: timed_call(fn, device)[0] for side, fn in calls.items()}
        runs = {side: [] for side in calls}
        for _ in range(args.reps):
            for side, fn in calls.items():
                runs[side].append(timed_call(fn, device))
        r = {"batch": batch}
        for side in calls:
            r[f"{side}_s"] = bc.median([w for w, _ in runs[side]])
            r[f"{side}_peak_gib"] = max(p for _, p in runs[side])
            r[f"{side}_warmup_s"] = warm[side]
        res["generate"].append(r)
        if batch == 1 and res["parity"] is None:
            res["parity"] = bc.pixel_diff(made["batchsd"][0], made["diffusers"][0])
        print(f"generate batch {batch}: batchsd {batch / r['batchsd_s']:.2f} img/s, "
              f"diffusers {batch / r['diffusers_s']:.2f} img/s", flush=True)
        dump()
    # 4. end to end through `batchsd run`
    if args.e2e_rows:
        rows = rows_for(args.e2e_rows, args.size, args.steps, tag="end to end")
        with tempfile.TemporaryDirectory(prefix="batchsd-gpu-e2e-") as tmp:
            for sub in ("b", "d"):
                (Path(tmp) / sub).mkdir()
            walls = {"batchsd": timed_call(lambda: batchsd_run(ours, rows, args.e2e_batch, Path(tmp) / "b"), device)[0],
                     "diffusers": timed_call(lambda: diffusers_loop(theirs, rows, args.e2e_batch, Path(tmp) / "d"),
                                             device)[0]}
        res["e2e"] = {"rows": args.e2e_rows, "batch": args.e2e_batch, **{f"{s}_s": w for s, w in walls.items()}}
        dump()

    pk = args.peak_tflops
    table = []
    for r in res["unet"]:
        tf = {s: unet_tflop * r["batch"] / r[f"{s}_s"] for s in ("batchsd", "diffusers")}
        table.append([r["batch"], f"{r['batchsd_s'] * 1e3:.1f}", f"{tf['batchsd']:.3g} ({tf['batchsd'] / pk:.1%})",
                      f"{r['diffusers_s'] * 1e3:.1f}", f"{tf['diffusers']:.3g} ({tf['diffusers'] / pk:.1%})",
                      f"{r['diffusers_s'] / r['batchsd_s']:.2f}x", f"{r['max_rel_diff']:.1e}"])
    print(f"\nUNet forward on a CFG batch (2 x rows), {args.size}x{args.size}, median of {args.unet_reps}; "
          f"TFLOP/s from {unet_tflop:.3f} TFLOP per CFG pair, of the {pk:.0f} TFLOP/s peak")
    print(fmt_table(["rows", "batchsd ms", "batchsd TFLOP/s (of peak)", "diffusers ms", "diffusers TFLOP/s (of peak)",
                     "speed-up", "max rel diff"], table))
    table = []
    for r in res["generate"]:
        b = r["batch"]
        cells = [b]
        for side in ("batchsd", "diffusers"):
            tf = unet_tflop * args.steps * b / r[f"{side}_s"]
            cells += [f"{b / r[f'{side}_s']:.2f}", f"{tf:.3g} ({tf / pk:.1%})", f"{r[f'{side}_peak_gib']:.1f}",
                      f"{r[f'{side}_warmup_s']:.1f}"]
        cells.insert(5, f"{r['diffusers_s'] / r['batchsd_s']:.2f}x")
        table.append(cells)
    print(f"\nGenerate (text, {args.steps} steps euler, cfg 7.5, VAE decode, PIL), median of {args.reps}; "
          "UNet TFLOP/s as a lower bound (UNet FLOPs over the whole call's wall time)")
    print(fmt_table(["rows", "batchsd img/s", "batchsd UNet TFLOP/s (of peak)", "batchsd peak GiB", "batchsd warm-up s",
                     "speed-up", "diffusers img/s", "diffusers UNet TFLOP/s (of peak)", "diffusers peak GiB",
                     "diffusers warm-up s"], table))
    if res["parity"]:
        p = res["parity"]
        print(f"same row at batch 1, batchsd vs diffusers image: mean |diff| {p['mean_abs_pixel_diff']:.2f}/255, "
              f"max {p['max_abs_pixel_diff']:.0f}/255")
    if res["e2e"]:
        e = res["e2e"]
        print(f"\nEnd to end, {e['rows']} rows in batches of {e['batch']} with PNG files: `batchsd run` "
              f"{e['rows'] / e['batchsd_s']:.2f} img/s, diffusers loop {e['rows'] / e['diffusers_s']:.2f} img/s, "
              f"{e['diffusers_s'] / e['batchsd_s']:.2f}x")
    compiled = getattr(ours.unet, "compile_seconds", {})
    if compiled:
        res["compile_s"] = {str(k[0]): v for k, v in compiled.items()}
        print("compile seconds per shape: " + ", ".join(f"{k[0]}: {v:.0f}" for k, v in compiled.items()))
    dump()


if __name__ == "__main__":
    main()
