"""Cost of exact mode, by component, robust to a shared machine: modes interleaved within every
repetition, median and min of REPS, wall and process CPU seconds, load average printed.

Components (full-width SD 1.5 random checkpoint, 256x256 -> 32x32 latents, cfg 7.5, 2 threads):
  denoise: one sampler step's eps_model call for B rows (B = 1, 4, 8), through Pipeline._guided_eps_model
      current   : one UNet forward of batch 2B ([uncond x B, cond x B])
      rowwise   : exact.py rowwise: B forwards of batch 2 ([uncond_i, cond_i]) + thread pins
      batched   : exact.py batched: one forward of batch 2B with padded small GEMMs + thread pins
      rowwise-mt: rows' batch-2 forwards run concurrently on a thread pool of 2 workers with 1 intra-op
                  thread each (no pins needed: every op on 1 thread)
  decode: one 256x256 VAE decode (current / with the thread pins: GroupNorm on 1 thread / GN on an NCHW copy)
Per image at S steps = S * denoise(B) / B + decode.

usage: bench_components.py DTYPE [REPS] [batches] [STEPS for the per-image column]
"""
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
import exact  # noqa: E402
from common import CKPT, cpu_kind  # noqa: E402
from batchsd import Pipeline  # noqa: E402

dtype = sys.argv[1]
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
batches = [int(b) for b in (sys.argv[3] if len(sys.argv) > 3 else "1,4,8").split(",")]
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 2
torch.set_num_threads(2)
T = torch.get_num_threads()
print(cpu_kind())
print("date", time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg at start", open("/proc/loadavg").read().split()[:3], "commit",
      subprocess.run(["git", "-C", "/work/main", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
pipe = Pipeline.load(CKPT, device="cpu", dtype=dtype)
print(f"dtype {dtype}, winograd {pipe.winograd}, 256x256, reps {reps}, batches {batches}")

g = torch.Generator().manual_seed(0)
bmax = max(batches)
with torch.inference_mode():
    cond = torch.cat([pipe.family.encode_text(pipe.model, [f"prompt {i}"], pipe.device)[0] for i in range(bmax)])
    uncond = pipe.family.encode_text(pipe.model, ["blurry"], pipe.device)[0].expand(bmax, -1, -1).contiguous()
x_all = torch.randn(bmax, 4, 32, 32, generator=g) * 3.0
z = torch.randn(1, 4, 32, 32, generator=g) * 5.0

pool = ThreadPoolExecutor(T, initializer=lambda: torch.set_num_threads(1))


def eps_for(mode, b):
    exact.restore(pipe)
    if mode in ("rowwise", "batched"):
        exact.enable_exact(pipe, mode)
    elif mode == "rowwise-mt":
        return None
    return pipe._guided_eps_model(cond[:b], uncond[:b], [7.5] * b)


def rowwise_mt(b, t):
    """Each row's [uncond_i, cond_i] forward as a pool task on 1 intra-op thread; same arithmetic as rowwise."""
    def one(i):
        torch.set_num_threads(1)          # per worker: OpenMP ICV is per thread, MKL's setting is global
        xi = x_all[i:i + 1]
        x_in = torch.cat([xi, xi]).to(pipe.dtype).contiguous(memory_format=pipe.memory_format)
        ctx = torch.cat([uncond[i:i + 1], cond[i:i + 1]])
        with torch.inference_mode():
            out = pipe.unet(x_in, torch.full((2,), t, dtype=torch.float32), ctx).float()
        e_u, e = out[:1], out[1:].clone()
        return e_u + torch.tensor([7.5], dtype=torch.float32).view(-1, 1, 1, 1) * (e - e_u)
    try:
        return torch.cat(list(pool.map(one, range(b))))
    finally:
        torch.set_num_threads(T)           # MKL back to T threads for the main thread


def timed(fn):
    c0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    return out, wall, (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)


modes = ["current", "rowwise", "batched", "rowwise-mt"]
dec_modes = ["current", "pins (GN 1 thread)", "pins (GN NCHW copy)"]
res = {}
outs = {}
with torch.inference_mode():
    # warm-up: every mode once at the smallest batch and one decode each
    for m in modes:
        e = eps_for(m, 1)
        (rowwise_mt(1, 500.0) if e is None else e(x_all[:1], 500.0))
    for r in range(reps):
        for b in batches:
            for m in modes:
                e = eps_for(m, b)
                out, wall, cpu = timed((lambda: rowwise_mt(b, 500.0)) if e is None else (lambda: e(x_all[:b], 500.0)))
                res.setdefault(("denoise", b, m), []).append((wall, cpu))
                if r == 0:
                    outs[(b, m)] = out
        for m in dec_modes:
            exact.restore(pipe)
            if m != "current":
                exact.patch_functions("rowwise", gn="pin" if "1 thread" in m else "nchw")
            out, wall, cpu = timed(lambda: pipe.model.vae.decode(
                (z / pipe.latent_scale).to(pipe.dtype).contiguous(memory_format=pipe.memory_format)))
            res.setdefault(("decode", 1, m), []).append((wall, cpu))
            if r == 0:
                outs[("dec", m)] = out
        print(f"rep {r + 1}/{reps} done, loadavg {open('/proc/loadavg').read().split()[:3]}", flush=True)
exact.restore(pipe)
torch.set_num_threads(T)

print("\nequalities (first repetition):")
for b in batches:
    print(f"  B={b}: rowwise == rowwise-mt: {torch.equal(outs[(b, 'rowwise')], outs[(b, 'rowwise-mt')])}; "
          f"rowwise == batched: {torch.equal(outs[(b, 'rowwise')], outs[(b, 'batched')])}; "
          f"rowwise == current: {torch.equal(outs[(b, 'rowwise')], outs[(b, 'current')])}; "
          f"rows of rowwise B={b} == rowwise B=1 row 0: {torch.equal(outs[(b, 'rowwise')][:1], outs[(1, 'rowwise')])}")
print(f"  decode: pins(GN 1 thread) == pins(NCHW): {torch.equal(outs[('dec', dec_modes[1])], outs[('dec', dec_modes[2])])}, "
      f"== current: {torch.equal(outs[('dec', dec_modes[1])], outs[('dec', 'current')])}")


def med(key, i=0):
    return statistics.median(v[i] for v in res[key])


def mn(key, i=0):
    return min(v[i] for v in res[key])


print("\nUNet CFG step for B rows, seconds per row: median wall (min wall) [median CPU]")
print("| B | " + " | ".join(modes) + " | " + " | ".join(f"{m} / current (median wall)" for m in modes[1:]) + " |")
print("|---|" + "---|" * (2 * len(modes) - 1))
for b in batches:
    cells = [f"{med(('denoise', b, m)) / b:.3f} ({mn(('denoise', b, m)) / b:.3f}) [{med(('denoise', b, m), 1) / b:.2f}]" for m in modes]
    ratios = [f"{med(('denoise', b, m)) / med(('denoise', b, 'current')):.3f}x" for m in modes[1:]]
    print(f"| {b} | " + " | ".join(cells + ratios) + " |")
print("\nVAE decode 256x256, one image: median wall (min wall) [median CPU]")
for m in dec_modes:
    print(f"  {m:22s} {med(('decode', 1, m)):.3f} ({mn(('decode', 1, m)):.3f}) [{med(('decode', 1, m), 1):.2f}]  "
          f"{med(('decode', 1, m)) / med(('decode', 1, 'current')):.3f}x")
print(f"\nper image at {steps} steps (= {steps} x step/row + decode; text encoding and PNG not included), median wall s:")
print("| B | current | exact rowwise (GN pin) | exact batched (GN pin) | exact rowwise-mt | rowwise / current | batched / current | rowwise-mt / current |")
print("|---|---|---|---|---|---|---|---|")
dec_cur, dec_pin = med(("decode", 1, "current")), med(("decode", 1, dec_modes[1]))
for b in batches:
    vals = [steps * med(("denoise", b, "current")) / b + dec_cur] + \
           [steps * med(("denoise", b, m)) / b + dec_pin for m in modes[1:]]
    print(f"| {b} | " + " | ".join(f"{v:.2f}" for v in vals) + " | " + " | ".join(f"{v / vals[0]:.3f}x" for v in vals[1:]) + " |")
print("loadavg at end", open("/proc/loadavg").read().split()[:3])
