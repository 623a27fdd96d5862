"""Per-row LoRA throughput: a job whose rows take 4 LoRA sets interleaved row by row, against the same
rows without LoRA, each through `batchsd run` in a fresh process (issue 19's target: >= 0.9x).

    python tests/bench/bench_lora_interleave.py                       # 64 rows, 256x256, 2 steps, bf16
    python tests/bench/bench_lora_interleave.py --dtype fp32 --reps 2 --json /tmp/b/lora.json
    python tests/bench/bench_lora_interleave.py --unet-reps 5 --reps 0     # the UNet step's overhead alone

The model is bench_common's random full-width SD 1.5 file. The LoRA files are random kohya-layout LoRAs
(tests/model/ref_lora.write_kohya_lora: attention, feed-forward, projections and LoCon 3x3 convs, UNet
and text encoder) at --rank, written once per rank into the bench cache; the 4 sets are one file at
0.8, another at 1.0, two files together, and the first again at 0.5. Rows differ in prompt and seed;
the job with LoRA names row i's set as sets[i % 4], so the file order alternates every row and only
the planner's grouping keeps the switches to one per set. The runs alternate (LoRA first in odd
repeats), and the figure is each run's images/s from its summary.json (generation time, model load
excluded) and the ratio of the medians. The header prints the CPU (bench_common.cpu_description and
the model name), torch, threads and load average, the commit and the command.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (CACHE, REPO, SD15_TEXT, SD15_UNET, cpu_description, git_state, median,  # noqa: E402
                          random_checkpoint)

SETS = ["s0:0.8", "s1", "s2:0.7;s3:0.6", "s0:0.5"]


def lora_folder(rank: int) -> Path:
    """4 random kohya LoRA files for SD 1.5's shapes (the reference modules built on the meta device:
    only their shapes are read)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from ref_lora import write_kohya_lora

    folder = CACHE / f"sd15-lora-rank{rank}"
    if all((folder / f"s{k}.safetensors").is_file() for k in range(4)):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in SD15_UNET.items() if not k.startswith("_")})
        text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in SD15_TEXT.items() if k != "architectures"}))
    for k in range(4):
        write_kohya_lora(folder / f"s{k}.safetensors", unet, {"te": text}, rank=rank, alpha=rank / 2, seed=k)
    return folder


def manifest(path: Path, rows: int, size: int, steps: int, with_lora: bool) -> Path:
    records = [dict(id=f"r{i:03d}", prompt=f"a photo of object number {i}, detailed, studio light", seed=i,
                    steps=steps, width=size, height=size) for i in range(rows)]
    if with_lora:
        for i, r in enumerate(records):
            r["loras"] = SETS[i % len(SETS)]
    pd.DataFrame(records).to_parquet(path)
    return path


def run_job(manifest_path: Path, out: Path, args, loras: Path) -> dict:
    cmd = [sys.executable, "-c", "from batchsd.cli import main; main()", "run", str(manifest_path),
           "--model", str(args.checkpoint), "--out", str(out), "--dtype", args.dtype, "--batch-size",
           str(args.batch_size), "--lora-dir", str(loras), "--overwrite"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"batchsd run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return dict(wall_s=round(wall, 2), elapsed_s=summary["elapsed_s"], images_per_s=summary["images_per_s"],
                ok=summary["ok"], load_average=os.getloadavg()[0])


def unet_overhead(args, loras: Path) -> dict:
    """In this process: the UNet CFG step (batch 2) at --size with no LoRA and with each set applied as
    side paths (as `batchsd run` applies them), interleaved --unet-reps times; median wall and CPU s."""
    from batchsd import Pipeline
    from batchsd.job.loras import parse_lora_list
    from batchsd.model.lora import apply_loras

    pipe = Pipeline.load(args.checkpoint, device="cpu", dtype=args.dtype)
    dtype, fmt = pipe.dtype, pipe.memory_format
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, args.size // 8, args.size // 8, generator=g).to(dtype).contiguous(memory_format=fmt)
    t, ctx = torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768, generator=g).to(dtype)

    def step() -> tuple[float, float]:
        w0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            pipe.unet(x, t, ctx)
        return time.perf_counter() - w0, time.process_time() - c0

    variants = ["none"] + SETS
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    step()
    for _ in range(args.unet_reps):
        for v in variants:
            applied = None if v == "none" else apply_loras(
                pipe.model, [(loras / f"{name}.safetensors", m) for name, m in parse_lora_list(v)])
            step()                                    # first call with this set: not timed
            times[v].append(step())
            if applied is not None:
                applied.remove()
    out = {v: dict(wall_s=median([w for w, _ in ts]), cpu_s=median([c for _, c in ts])) for v, ts in times.items()}
    for v in SETS:
        out[v]["cpu_ratio_to_none"] = out[v]["cpu_s"] / out["none"]["cpu_s"]
        print(f"UNet step with {v:14s}: {out[v]['wall_s']:.3f} s wall / {out[v]['cpu_s']:.3f} s CPU; CPU "
              f"{out[v]['cpu_ratio_to_none']:.3f}x the step without LoRA ({out['none']['cpu_s']:.3f} s)", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--reps", type=int, default=1, help="pairs of runs (the order alternates)")
    p.add_argument("--unet-reps", type=int, default=0,
                   help="also time the UNet step without and with each set in this process, interleaved")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    args.checkpoint = random_checkpoint()
    print(f"{cpu_description()}; torch {torch.__version__}; threads "
          f"{os.environ.get('OMP_NUM_THREADS', os.cpu_count())}; load average {os.getloadavg()}")
    print(f"{git_state()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command: {' '.join(sys.argv)}")
    loras = lora_folder(args.rank)
    work = CACHE / "lora-interleave"
    work.mkdir(parents=True, exist_ok=True)
    jobs = {"lora": manifest(work / "lora.parquet", args.rows, args.size, args.steps, True),
            "none": manifest(work / "none.parquet", args.rows, args.size, args.steps, False)}
    unet = unet_overhead(args, loras) if args.unet_reps else None
    runs: dict[str, list[dict]] = {"lora": [], "none": []}
    for rep in range(args.reps):
        for name in (("lora", "none") if rep % 2 == 0 else ("none", "lora")):
            result = run_job(jobs[name], work / f"out-{name}", args, loras)
            runs[name].append(result)
            print(f"rep {rep} {name:4s}: {result}", flush=True)
    ratio = None
    if args.reps:
        lora_rate = median([r["images_per_s"] for r in runs["lora"]])
        none_rate = median([r["images_per_s"] for r in runs["none"]])
        ratio = lora_rate / none_rate
        print(f"\n{args.rows} rows, {len(SETS)} LoRA sets interleaved row by row (rank {args.rank}), "
              f"{args.size}x{args.size}, {args.steps} steps, {args.dtype}, batch size {args.batch_size}")
        pairs = ", ".join(f"{a['images_per_s'] / b['images_per_s']:.3f}" for a, b in zip(runs["lora"], runs["none"]))
        print(f"images/s with LoRA {lora_rate:.4f}, without {none_rate:.4f}: ratio {ratio:.3f} (target >= 0.9); "
              f"each pair: {pairs}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(runs=runs, unet=unet, ratio=ratio, args={
            k: str(v) for k, v in vars(args).items()}), indent=2))


if __name__ == "__main__":
    main()
