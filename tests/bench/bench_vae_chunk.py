"""How many images per VAE decode call, on the CPU: Pipeline.vae_chunk 1 (the CPU default) against 4.

    python tests/bench/bench_vae_chunk.py                         # fp32 at 256 and 512, ~5 min on 2 cores
    python tests/bench/bench_vae_chunk.py --dtypes fp32,bf16 --sizes 512

Each run is a fresh process as `batchsd run` starts one on the CPU (tuned allocator, the benchmark
checkpoint loaded by Pipeline.load): it decodes one latent (warm-up, not timed), then `--images`
latents with the chunk size named, and prints seconds per image and the process's peak RSS (VmHWM:
the whole job's peak, weights included). Runs alternate 1, 4, 1, 4 per dtype and size. The images
are compared across chunk sizes (max |pixel difference|), since a row's image must not depend on
how many rows its batch had.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def child(dtype_name: str, size: int, chunk: int, images: int, save: Path) -> None:
    from batchsd.model.fast.allocator import tune_cpu_allocator

    assert tune_cpu_allocator()
    pipe = bc.load_batchsd(bc.random_checkpoint(), dtype_name)
    pipe.vae_chunk = chunk
    g = torch.Generator().manual_seed(size)
    latents = torch.randn(images, 4, size // 8, size // 8, generator=g) * 5   # |z| like a sampler's output
    with torch.inference_mode():
        pipe._decode(latents[:1])
        t0, c0 = time.perf_counter(), time.process_time()
        out = pipe._decode(latents)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    np.save(save, np.stack([np.asarray(im) for im in out]))
    print("CHILD " + json.dumps(dict(s_per_image=wall / images, cpu_per_image=cpu / images,
                                     peak_rss_gib=bc.peak_rss_gib(own=True))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="fp32")
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--child", nargs=4, metavar=("DTYPE", "SIZE", "CHUNK", "SAVE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        dtype_name, size, chunk, save = args.child
        return child(dtype_name, int(size), int(chunk), args.images, Path(save))
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}, code {bc.git_state()}, {args.images} images per run", flush=True)
    print("| VAE decode (fresh process each) | dtype | images per call | wall s / image | CPU s / image | "
          "peak RSS GiB | max pixel diff vs 1 per call |\n|---|---|---|---|---|---|---|", flush=True)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_vae_chunk_{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    for dtype_name in args.dtypes.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            first = None
            for rep, chunk in enumerate((1, 4, 1, 4)):
                save = tmp / f"{dtype_name}_{size}_{rep}.npy"
                r = bc.run_child(__file__, "--child", dtype_name, str(size), str(chunk), str(save),
                                 "--images", str(args.images), what=f"{dtype_name} {size} chunk {chunk} child")
                pixels = np.load(save).astype(np.int16)
                first = pixels if first is None else first
                save.unlink()
                print(f"| {size}x{size} | {dtype_name} | {chunk} | {r['s_per_image']:.2f} | {r['cpu_per_image']:.2f} | "
                      f"{r['peak_rss_gib']:.2f} | {np.abs(pixels - first).max()} |", flush=True)
    tmp.rmdir()


if __name__ == "__main__":
    main()
