"""The fused linear epilogues (batchsd/model/fast/fused_epilogues.py: the transformers' GEGLU and
residual adds in oneDNN linears) on and off, in one process: a UNet CFG step of the Pipeline as
shipped otherwise (packed convolutions, channels_last, the fused attention where it runs), the two
settings alternating, medians of the repeats; and how far apart the two outputs are.

    python tests/bench/bench_epilogues.py                        # SD 1.5 at 256 and 512, bf16
    python tests/bench/bench_epilogues.py --model sdxl --sizes 1024 --reps 4

The models are the benchmarks' random full-width checkpoints (bench_common.random_checkpoint,
bench_sdxl_vs_diffusers.model_paths). The header prints the CPU (bench_common.cpu_description),
torch, threads, the load average, the commit and the command.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402


def checkpoint(model: str) -> Path:
    if model == "sd15":
        return bc.random_checkpoint()
    import bench_sdxl_vs_diffusers

    return bench_sdxl_vs_diffusers.model_paths()[0]


@torch.inference_mode()
def compare(pipe, size: int, reps: int) -> tuple[float, float, float]:
    """(median s with the epilogues off, median s on, max |on - off| / max |off|) of one CFG step."""
    marked = [m for m in pipe.model.unet.modules() if hasattr(m, "fused_epilogue")]
    cfg = pipe.cfg.unet
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, size // 8, size // 8, generator=gen).to(pipe.dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, cfg.context_dim, generator=gen).to(pipe.dtype)
    extra = () if pipe.family.unet_vector is None else \
        (torch.randn(2, cfg.adm_in_channels, generator=gen).to(pipe.dtype),)

    def step(on: bool) -> torch.Tensor:
        for m in marked:
            m.fused_epilogue = on
        return pipe.model.unet(x, t, context, *extra)

    off, on = step(False).float(), step(True).float()
    diff = ((on - off).abs().max() / off.abs().max()).item()
    times = {False: [], True: []}
    for rep in range(reps):
        for setting in ((False, True) if rep % 2 == 0 else (True, False)):
            times[setting].append(bc.timed(lambda: step(setting)))
    for m in marked:
        m.fused_epilogue = pipe.fused_epilogues
    return bc.median(times[False]), bc.median(times[True]), diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--sizes", default="256,512", help="comma list of image sizes")
    ap.add_argument("--reps", type=int, default=8, help="repeats per setting (alternating)")
    args = ap.parse_args()
    from batchsd.model.fast.allocator import tune_cpu_allocator

    tune_cpu_allocator()                 # as `batchsd run` does on the CPU
    print(f"# {bc.cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f}; {bc.git_state()}; {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC")
    print(f"# command: python tests/bench/bench_epilogues.py {' '.join(sys.argv[1:])}")
    pipe = bc.load_batchsd(checkpoint(args.model), "bf16")
    print(f"# {args.model} bf16: fused epilogues by default {pipe.fused_epilogues}, fused attention "
          f"{pipe.fused_attention}, Winograd {pipe.winograd}; UNet CFG step, medians of {args.reps}, alternating")
    print("| size | torch's ops s | fused epilogues s | speed-up | max abs diff / max abs output |")
    print("|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        off, on, diff = compare(pipe, size, args.reps)
        print(f"| {size} | {off:.3f} | {on:.3f} | {off / on:.3f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
