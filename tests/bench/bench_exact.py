"""Exact mode's cost (batchsd/model/fast/exact.py) against the fastest mode (exact off), on the CPU.

For each dtype and batch size: one Pipeline.generate of B rows with distinct prompts (text
encoding, the UNet steps and the VAE decode, from an empty text cache), per image, exact on and
off interleaved, the minimum of --repeats. The random full-width SD 1.5 checkpoint of
bench_common (fan-in scaled weights). It also checks that exact mode's rows at batch B equal the
same rows at batch 1, bitwise.

    python tests/bench/bench_exact.py                       # 128x128, 2 steps, fp32 and bf16, B 1/4/8
    python tests/bench/bench_exact.py --size 256 --repeats 3
    python tests/bench/bench_exact.py --cpu-kinds          # exact rows on this CPU vs an AVX2-capped run

`--cpu-kinds` estimates how far exact mode's bits move on another kind of CPU by running the same
rows in two child processes, one as this CPU dispatches and one with every library capped to AVX2
(ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS): the kernels an AVX2-only CPU
would run. Capping changes nothing on a CPU without AVX512.

Figures: docs/reproducibility.md. They mean something on a quiet machine only: the header prints
the load average and the CPU kind (AMX or not decides bf16's speed).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_common import cpu_description, git_state, random_checkpoint


def rows_for(batch: int, size: int, steps: int, tag: str):
    from batchsd import GenerationRow

    return [GenerationRow(f"{tag} prompt {i}", negative_prompt="blurry", seed=1000 + i, steps=steps, cfg_scale=7.5,
                          sampler="euler_a", width=size, height=size) for i in range(batch)]


def per_image_s(pipe, rows) -> tuple[float, float, torch.Tensor]:
    """(wall s, process CPU s, latents) per image of one generate() call from an empty text cache."""
    pipe._text_cache.clear()
    c0, t0 = time.process_time(), time.perf_counter()
    out = pipe.generate(rows)
    return (time.perf_counter() - t0) / len(rows), (time.process_time() - c0) / len(rows), out.latents


AVX2_CAP = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def kinds_child(path: str, size: int, steps: int, dtype: str) -> None:
    """Exact-mode rows of this process's dispatch: latents and uint8 pixels saved to `path`."""
    import numpy as np

    from batchsd import Pipeline

    pipe = Pipeline.load(random_checkpoint(torch.float16), device="cpu", dtype=dtype, exact=True)
    out = pipe.generate(rows_for(2, size, steps, "kinds"))
    torch.save({"latents": out.latents, "pixels": torch.from_numpy(np.stack([np.asarray(i) for i in out.images])),
                "capability": torch.backends.cpu.get_cpu_capability()}, path)


def cpu_kinds(size: int, steps: int, dtypes: list[str]) -> None:
    print("| dtype | capability A | capability B | max latent diff | max pixel diff | pixels that differ |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            got = []
            for k, env in enumerate(({}, AVX2_CAP)):
                path = str(Path(tmp) / f"{dtype}-{k}.pt")
                child = subprocess.run([sys.executable, __file__, "--kinds-child", path, "--size", str(size),
                                        "--steps", str(steps), "--dtypes", dtype], env={**os.environ, **env},
                                       capture_output=True, text=True)
                if child.returncode:
                    got.append(child.stderr.strip().splitlines()[-1])
                    break
                got.append(torch.load(path))
            if isinstance(got[-1], str):
                print(f"| {dtype} | | | does not run{' capped to AVX2' if len(got) == 2 else ''}: {got[-1]} | | |")
                continue
            a, b = got
            pix = (a["pixels"].int() - b["pixels"].int()).abs()
            print(f"| {dtype} | {a['capability']} | {b['capability']} | "
                  f"{(a['latents'] - b['latents']).abs().max().item():.2e} | {pix.max().item()}/255 | "
                  f"{(pix > 0).float().mean().item() * 100:.2f}% |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-kinds", action="store_true", help="exact rows here vs with the ISA capped to AVX2")
    ap.add_argument("--kinds-child", metavar="PATH", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from batchsd import Pipeline

    if args.kinds_child:
        return kinds_child(args.kinds_child, args.size, args.steps, args.dtypes)

    batches = [int(b) for b in args.batches.split(",")]
    print(f"# {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f}; {git_state()}")
    if args.cpu_kinds:
        print(f"# {args.size}x{args.size}, {args.steps} steps, cfg 7.5, euler_a, 2 rows, exact mode, as this CPU "
              "dispatches (A) and with the ISA capped to AVX2 (B)")
        return cpu_kinds(args.size, args.steps, args.dtypes.split(","))
    print(f"# {args.size}x{args.size}, {args.steps} steps, cfg 7.5, euler_a; per image = generate() time / B "
          f"(text + UNet + VAE), minimum of {args.repeats} interleaved repeats")
    ckpt = random_checkpoint(torch.float16)
    print("| dtype | batch | fastest (exact off) s/img | exact s/img | exact / fastest | CPU-time ratio "
          "| exact rows = batch-1 rows |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        pipes = {mode: Pipeline.load(ckpt, device="cpu", dtype=dtype, exact=mode) for mode in (False, True)}
        for p in pipes.values():                      # warm-up: first-call packing and allocations
            per_image_s(p, rows_for(1, args.size, args.steps, "warm-up"))
        single = [per_image_s(pipes[True], rows_for(max(batches), args.size, args.steps, "b")[i:i + 1])[2]
                  for i in range(max(batches))]
        for b in batches:
            wall, cpu = {False: float("inf"), True: float("inf")}, {False: float("inf"), True: float("inf")}
            equal = None
            for _ in range(args.repeats):
                for mode in (False, True):
                    seconds, cpu_s, latents = per_image_s(pipes[mode], rows_for(b, args.size, args.steps, "b"))
                    wall[mode], cpu[mode] = min(wall[mode], seconds), min(cpu[mode], cpu_s)
                    if mode:
                        equal = sum(torch.equal(latents[i], single[i][0]) for i in range(b))
            print(f"| {dtype} | {b} | {wall[False]:.2f} | {wall[True]:.2f} | {wall[True] / wall[False]:.2f}x "
                  f"| {cpu[True] / cpu[False]:.2f}x | {equal}/{b} |", flush=True)
        print(f"# load average now {os.getloadavg()[0]:.1f}", flush=True)
        del pipes


if __name__ == "__main__":
    main()
