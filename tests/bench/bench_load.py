"""`Pipeline.load` in a fresh process with the checkpoint hash cache off and on (batchsd/model/hash_cache.py),
alternating: load wall time and the child's process CPU time.

    python tests/bench/bench_load.py                    # the SDXL bench file if built, else SD 1.5's; bf16; 2 pairs
    python tests/bench/bench_load.py --model PATH --dtype fp32 --reps 3
    python tests/bench/bench_load.py --against HEAD~2   # this checkout against another commit (cache on)

`--against REV` loads with this checkout's batchsd and with REV's (a temporary git worktree),
alternating, both with the cache on. With the cache off the file is hashed in a thread beside the load (checkpoint.load_model); with it on,
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


def child(model: str, dtype: str, cache: str, code: Path = REPO) -> dict:
    """One load in a fresh process, with the batchsd package of the checkout at `code`."""
    env = dict(os.environ, BATCHSD_CACHE_DIR=cache, PYTHONPATH=str(code))
    done = subprocess.run([sys.executable, "-c", CHILD, model, dtype], cwd=code, env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint (default: the SDXL bench file if built, else SD 1.5's)")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=2, help="off/on pairs")
    ap.add_argument("--against", metavar="REV", help="compare this checkout's load with commit REV's instead")
    args = ap.parse_args()
    sdxl = CACHE / "sdxl-random-bf16.safetensors"
    model = args.model or str(sdxl if sdxl.is_file() else random_checkpoint())
    print(f"# {cpu_description()}; torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}; {git_state()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command: python tests/bench/"
          f"{' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}")
    print(f"# {model}, {Path(model).stat().st_size / 1e9:.2f} GB, {args.dtype}")
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as other:
        child(model, args.dtype, cache)                       # fills the cache (and the page cache)
        if args.against:
            subprocess.run(["git", "worktree", "add", "--detach", other, args.against], cwd=REPO, check=True,
                           capture_output=True)
            sides = {"this checkout": (cache, REPO), args.against: (cache, Path(other))}
        else:
            sides = {"cache off": ("off", REPO), "cache on": (cache, REPO)}
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        try:
            for _ in range(args.reps):
                for name, (where, code) in sides.items():
                    runs[name].append(child(model, args.dtype, where, code))
                    print(f"{name}: load {runs[name][-1]['load_s']:.2f} s, process CPU {runs[name][-1]['cpu_s']:.1f} s",
                          flush=True)
        finally:
            if args.against:
                subprocess.run(["git", "worktree", "remove", "--force", other], cwd=REPO, capture_output=True)
    for name, rs in runs.items():
        print(f"median, {name}: load {median([r['load_s'] for r in rs]):.2f} s, "
              f"process CPU {median([r['cpu_s'] for r in rs]):.2f} s")


if __name__ == "__main__":
    main()
