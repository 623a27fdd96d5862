"""Where the bf16 UNet step goes on the CPU: its ops by self time (torch.profiler), and CPU attention at
the self-attention shapes of SD 1.x and SDXL against the matmul roof, in fp32 and bf16.

    python tests/bench/bench_attention.py                     # SD 1.5 UNet step at 512, bf16; attention shapes
    python tests/bench/bench_attention.py --size 256 --dtype fp32
    python tests/bench/bench_attention.py --attention torch  # the step with torch's attention

1. The UNet CFG step (batch 2) of the random full-width SD 1.5 (bench_common), as batchsd samples it
   (Pipeline.load: packed convolutions, channels_last, Winograd by --winograd auto), profiled once after
   a warm-up: the top ops by self CPU time, with their share of the step.
2. torch's scaled_dot_product_attention (the CPU flash kernel the UNets call) on [2, heads, L, d]:
   SD 1.5's self-attention at 512x512 (L 4096, d 40, 8 heads; L 1024, d 80), SDXL's at 1024x1024
   (L 4096, d 64, 10 heads; L 1024, d 64, 20 heads); median of 5 calls, TFLOP/s from 4*B*h*L*L*d, and
   the two bmm of the unfused computation with d as the inner dimension of Q K^T, which is what makes
   small head dims slow; in bf16 also batchsd's fused kernel (fast/fused_attention.py) where it runs.
The header prints the CPU (bench_common.cpu_description), torch, threads, load average, the commit and
the roof (torch.mm 4096^2, best of 3).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_description, git_state, matmul_roof, median, random_checkpoint  # noqa: E402

SHAPES = [("SD 1.5 512px level 0", 8, 4096, 40), ("SD 1.5 512px level 1", 8, 1024, 80),
          ("SDXL 1024px level 1", 10, 4096, 64), ("SDXL 1024px level 2", 20, 1024, 64)]


def timed(fn, n: int = 5) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


@torch.inference_mode()
def unet_profile(size: int, dtype_name: str, rows: int, fused: bool | None) -> None:
    from torch.profiler import profile

    from batchsd import Pipeline
    from batchsd.model.fast.allocator import tune_cpu_allocator

    tune_cpu_allocator()
    pipe = Pipeline.load(random_checkpoint(), device="cpu", dtype=dtype_name, fused_attention=fused)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size // 8, size // 8, generator=g).to(pipe.dtype).contiguous(memory_format=pipe.memory_format)
    t, ctx = torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768, generator=g).to(pipe.dtype)
    pipe.unet(x, t, ctx)
    with profile() as prof:
        pipe.unet(x, t, ctx)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nUNet CFG step, SD 1.5, {size}x{size}, {dtype_name}, Winograd {pipe.winograd}, fused attention "
          f"{pipe.fused_attention}: {total / 1e6:.2f} s of "
          "op self time")
    print("| op | calls | self s | share |\n|---|---|---|---|")
    for e in events[:rows]:
        print(f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e6:.3f} | {e.self_cpu_time_total / total:.0%} |")


@torch.inference_mode()
def attention(roof: dict[str, float]) -> None:
    print("\n| shape [2, h, L, d] | dtype | SDPA ms | SDPA TFLOP/s (of roof) | Q K^T bmm ms (TFLOP/s) | P V bmm ms "
          "(TFLOP/s) | fused ms (TFLOP/s, of roof) |\n|---|---|---|---|---|---|---|")
    from batchsd.model.fast import fused_attention as fa

    fused_why = fa.available()
    if fused_why:
        print(f"(the fused kernel does not run here: {fused_why})")
    g = torch.Generator().manual_seed(0)
    for name, h, L, d in SHAPES:
        for dtype, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            q, k, v = (torch.randn(2, h, L, d, generator=g).to(dtype) for _ in range(3))
            flop = 4 * 2 * h * L * L * d
            sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v))
            qf, kf, vf = (a.reshape(-1, L, d) for a in (q, k, v))
            qk = timed(lambda: torch.bmm(qf, kf.transpose(1, 2)), 3)
            p = torch.softmax(torch.bmm(qf, kf.transpose(1, 2)), -1)
            pv = timed(lambda: torch.bmm(p, vf), 3)
            fused = "-"
            if fused_why is None and fa.supports(q, k, v):
                t = timed(lambda: fa.fused_attention(q, k, v))
                fused = f"{t * 1e3:.1f} ({flop / t / 1e12:.3f}, {flop / t / 1e12 / roof[key]:.0%})"
            print(f"| {name}: [2, {h}, {L}, {d}] | {key} | {sdpa * 1e3:.1f} | {flop / sdpa / 1e12:.3f} "
                  f"({flop / sdpa / 1e12 / roof[key]:.0%}) | {qk * 1e3:.1f} ({flop / 2 / qk / 1e12:.3f}) | "
                  f"{pv * 1e3:.1f} ({flop / 2 / pv / 1e12:.3f}) | {fused} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--rows", type=int, default=10, help="ops shown in the profile")
    ap.add_argument("--only", default="unet,attention", help="comma list of unet,attention")
    ap.add_argument("--attention", choices=["auto", "fused", "torch"], default="auto",
                    help="the profiled step's attention (Pipeline fused_attention)")
    args = ap.parse_args()
    roof = {"fp32": matmul_roof(torch.float32), "bf16": matmul_roof(torch.bfloat16)}
    print(f"# {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
          f"{os.getloadavg()[0]:.1f}; {git_state()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# roof (torch.mm 4096^2): fp32 {roof['fp32']:.3f}, bf16 {roof['bf16']:.3f} TFLOP/s; command: "
          f"python tests/bench/{' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}")
    only = set(args.only.split(","))
    if "unet" in only:
        unet_profile(args.size, args.dtype, args.rows,
                     {"auto": None, "fused": True, "torch": False}[args.attention])
    if "attention" in only:
        attention(roof)


if __name__ == "__main__":
    main()
