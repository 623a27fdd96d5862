"""Cost of the exact-mode prototype against the current batched path: per-image seconds (whole generate,
and its denoise / VAE-decode parts) at batch 1/4/8, full-width SD 1.5 random checkpoint, 256x256,
STEPS steps euler_a, cfg 7.5, fp32 and bf16 (shipped defaults: channels_last, packed convs, Winograd
in bf16). Modes run interleaved per batch size, in one process per dtype.

usage: bench_exact.py DTYPE STEPS [modes] [batches]
"""
import subprocess
import sys
import time

import torch

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
import exact  # noqa: E402
from common import CKPT, cpu_kind  # noqa: E402
from batchsd import GenerationRow, Pipeline  # noqa: E402
from batchsd.model import samplers  # noqa: E402

dtype, steps = sys.argv[1], int(sys.argv[2])
modes = (sys.argv[3] if len(sys.argv) > 3 else "current,rowwise,batched").split(",")
batches = [int(b) for b in (sys.argv[4] if len(sys.argv) > 4 else "1,4,8").split(",")]
size = 256
torch.set_num_threads(2)
print(cpu_kind())
print("date", time.strftime("%Y-%m-%d %H:%M:%S"), "load", open("/proc/loadavg").read().split()[:3],
      "commit", subprocess.run(["git", "-C", "/work/main", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
print(f"dtype {dtype}, {size}x{size}, {steps} steps euler_a, cfg 7.5, modes {modes}, batches {batches}")

t0 = time.time()
pipe = Pipeline.load(CKPT, device="cpu", dtype=dtype)
print(f"load {time.time() - t0:.1f}s, winograd {pipe.winograd}")

timers = {"denoise": 0.0, "decode": 0.0}
_sample, _decode = samplers.sample, pipe._decode


def timed_sample(*a, **k):
    t = time.perf_counter()
    try:
        return _sample(*a, **k)
    finally:
        timers["denoise"] += time.perf_counter() - t


def timed_decode(latents):
    t = time.perf_counter()
    try:
        return _decode(latents)
    finally:
        timers["decode"] += time.perf_counter() - t


samplers.sample = timed_sample
pipe._decode = timed_decode


def rows(n, base):
    return [GenerationRow(f"a photo of thing {base + i}", negative_prompt="blurry", seed=base + i, steps=steps,
                          cfg_scale=7.5, sampler="euler_a", width=size, height=size) for i in range(n)]


def set_mode(mode):
    exact.restore(pipe)
    pipe._decode = timed_decode
    if mode == "rowwise-nchw":
        exact.enable_exact(pipe, "rowwise", gn="nchw")
    elif mode != "current":
        exact.enable_exact(pipe, mode)


# warm-up of every mode (Winograd transforms, first-call packing, oneDNN primitive caches) at this size
for mode in modes:
    set_mode(mode)
    pipe.generate(rows(1, 9000))
print(f"warm-up done {time.time() - t0:.1f}s", flush=True)

results = {}
seed = 0
for b in batches:
    calls = 2 if b == 1 else 1
    for mode in modes:
        set_mode(mode)
        timers.update(denoise=0.0, decode=0.0)
        exact.PIN_STATS["pins"] = 0
        t = time.perf_counter()
        for _ in range(calls):
            pipe.generate(rows(b, seed))
            seed += b
        wall = time.perf_counter() - t
        n = b * calls
        results[(b, mode)] = (wall / n, timers["denoise"] / n, timers["decode"] / n)
        print(f"batch {b} {mode:13s}: {wall / n:6.2f} s/image (denoise {timers['denoise'] / n:5.2f}, decode "
              f"{timers['decode'] / n:5.2f}; thread switches {exact.PIN_STATS['pins']})", flush=True)

print(f"\n| batch | " + " | ".join(f"{m} s/img (denoise / decode)" for m in modes) + " | "
      + " | ".join(f"{m} / current" for m in modes if m != "current") + " |")
print("|---|" + "---|" * (len(modes) * 2 - 1))
for b in batches:
    cur = results[(b, "current")][0] if "current" in modes else None
    cells = [f"{results[(b, m)][0]:.2f} ({results[(b, m)][1]:.2f} / {results[(b, m)][2]:.2f})" for m in modes]
    ratios = [f"{results[(b, m)][0] / cur:.3f}x" for m in modes if m != "current"] if cur else []
    print(f"| {b} | " + " | ".join(cells + ratios) + " |")
exact.restore(pipe)
print(f"total {time.time() - t0:.1f}s")
