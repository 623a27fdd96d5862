"""What keeping the cross-attentions' K/V projections across steps buys (fast/context_projections.py).

    python tests/bench/bench_context_projections.py --model sdxl --dtype bf16 --size 512 --reps 4
    python tests/bench/bench_context_projections.py --model sd15 --dtype fp32 --size 512 --reps 5

One process, one full-width random model (SD 1.5: bench_common.random_checkpoint; SDXL: the bench
file of bench_sdxl_vs_diffusers.py), loaded as Pipeline.load ships it. One UNet forward on a CFG pair
(batch 2), as exact mode runs a guided row, under exact_numerics: with the projections kept (the
context's first call, which computes them, is not timed) and without them, interleaved `--reps`
times. Prints the CPU kind, each time and the medians' ratio (above 1: keeping them is faster), and
checks that both give the same bits; the memory the kept keys and values take.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
import torch  # noqa: E402


def model_path(name: str) -> Path:
    if name == "sd15":
        return bc.random_checkpoint()
    from bench_sdxl_vs_diffusers import model_paths

    return model_paths()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["sd15", "sdxl"], default="sdxl")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()

    from batchsd.model.fast.allocator import tune_cpu_allocator
    from batchsd.model.fast.context_projections import reuse_context_projections
    from batchsd.model.fast.exact import exact_numerics

    tune_cpu_allocator()
    print(f"{bc.cpu_description()}; threads {torch.get_num_threads()}; code {bc.git_state()}", flush=True)
    pipe = bc.load_batchsd(model_path(args.model), args.dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, args.size // 8, args.size // 8, generator=g).to(pipe.dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    context = torch.randn(2, 77, pipe.cfg.unet.context_dim, generator=g).to(pipe.dtype)
    extra = (torch.randn(2, pipe.cfg.unet.adm_in_channels, generator=g).to(pipe.dtype),) \
        if pipe.family.unet_vector else ()
    t = torch.full((2,), 500.0)

    def step() -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        with torch.inference_mode(), exact_numerics(True, torch.device("cpu")):
            out = pipe.unet(x, t, context, *extra)
        return time.perf_counter() - t0, out

    step()                                              # warm-up: packing, kernels
    times: dict[str, list[float]] = {"kept": [], "computed each step": []}
    outs = {}
    kept_bytes = 0
    for _ in range(args.reps):
        with reuse_context_projections(pipe.model.unet):
            step()                                      # the context's first call computes them
            seconds, outs["kept"] = step()
            kept_bytes = sum(k.untyped_storage().nbytes() + v.untyped_storage().nbytes()
                             for m in pipe.model.unet.modules() if getattr(m, "context_cache", None)
                             for _, k, v in m.context_cache.values())
        times["kept"].append(seconds)
        seconds, outs["computed each step"] = step()
        times["computed each step"].append(seconds)
    for name, values in times.items():
        print(f"{name}: {', '.join(f'{v:.2f}' for v in values)} s; median {bc.median(values):.3f} s")
    ratio = bc.median(times["computed each step"]) / bc.median(times["kept"])
    same = torch.equal(outs["kept"], outs["computed each step"])
    print(f"{args.model} {args.dtype} {args.size}x{args.size}: speed-up {ratio:.3f}x; same bits: {same}; "
          f"kept K/V {kept_bytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
