"""`Pipeline.load` in a fresh process with the checkpoint hash cache off and on (batchsd/model/hash_cache.py),
alternating: load wall time and the child's process CPU time.

    python tests/bench/bench_load.py                    # the SDXL bench file if built, else SD 1.5's; bf16; 2 pairs
    python tests/bench/bench_load.py --model PATH --dtype fp32 --reps 3

With the cache off the file is hashed in a thread beside the load (checkpoint.load_model); with it on,
the hash is read from the cache, which the first child fills (not timed). The header prints the CPU
(bench_common.cpu_description), torch, load average, the commit and the command.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import CACHE, REPO, cpu_description, git_state, median, random_checkpoint  # noqa: E402

CHILD = """
import json, sys, time
from batchsd.model.fast.allocator import tune_cpu_allocator
tune_cpu_allocator()
from batchsd import Pipeline
t0 = time.perf_counter()
Pipeline.load(sys.argv[1], device="cpu", dtype=sys.argv[2])
print(json.dumps(dict(load_s=time.perf_counter() - t0, cpu_s=time.process_time())))
"""


def child(model: str, dtype: str, cache: str) -> dict:
    env = dict(os.environ, BATCHSD_CACHE_DIR=cache)
    done = subprocess.run([sys.executable, "-c", CHILD, model, dtype], cwd=REPO, env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint (default: the SDXL bench file if built, else SD 1.5's)")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=2, help="off/on pairs")
    args = ap.parse_args()
    sdxl = CACHE / "sdxl-random-bf16.safetensors"
    model = args.model or str(sdxl if sdxl.is_file() else random_checkpoint())
    print(f"# {cpu_description()}; torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}; {git_state()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command: python tests/bench/"
          f"{' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}")
    print(f"# {model}, {Path(model).stat().st_size / 1e9:.2f} GB, {args.dtype}")
    with tempfile.TemporaryDirectory() as cache:
        child(model, args.dtype, cache)                       # fills the cache (and the page cache)
        runs: dict[str, list[dict]] = {"off": [], "on": []}
        for _ in range(args.reps):
            for name, where in (("off", "off"), ("on", cache)):
                runs[name].append(child(model, args.dtype, where))
                print(f"cache {name:3s}: load {runs[name][-1]['load_s']:.1f} s, process CPU {runs[name][-1]['cpu_s']:.1f} s",
                      flush=True)
    for name, rs in runs.items():
        print(f"median, cache {name}: load {median([r['load_s'] for r in rs]):.2f} s, "
              f"process CPU {median([r['cpu_s'] for r in rs]):.2f} s")


if __name__ == "__main__":
    main()
