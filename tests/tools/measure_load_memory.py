"""Peak memory of loading a full-size SD 1.5 checkpoint with batchsd.model.checkpoint.load_model.

    python tests/tools/measure_load_memory.py [--keep DIR]

Writes random fp16 SD 1.5 checkpoints (about 2.1 GB each: .safetensors and .ckpt, from
shared/reference/sd15_keys.json) into a temporary folder, then for each (file, target dtype) runs a
FRESH Python process that records its resident set size (VmRSS) after the imports, loads the model,
and reads the peak (VmHWM). Reports peak - baseline as a multiple of the loaded model's bytes. The
goal: under 1.25x (no second copy of the weights at any time).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys, time, torch
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
from batchsd.model.checkpoint import load_model
baseline = status("VmRSS")
start = time.perf_counter()
model, info = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
seconds = time.perf_counter() - start
model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps(dict(baseline=baseline, peak=status("VmHWM"), after=status("VmRSS"), model_bytes=model_bytes,
                      seconds=seconds, config=info.config_name, short_hash=info.short_hash)))
"""


def measure(path: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="write the checkpoints here and keep them")
    parser.add_argument("--dtypes", default="float16,float32,bfloat16")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "model")]
    from ref_checkpoint import random_sd15_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for fmt in ("safetensors", "ckpt"):
            path = folder / f"sd15-random-fp16.{fmt}"
            if not path.exists():
                t = time.perf_counter()
                random_sd15_checkpoint(path, fmt=fmt)
                print(f"wrote {path.name} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s")
            files.append(path)
        print(f"{'file':<28} {'target':<9} {'model GB':>8} {'baseline GB':>11} {'peak-base GB':>12} "
              f"{'ratio':>6} {'load s':>7}")
        worst = 0.0
        for path in files:
            for dtype in args.dtypes.split(","):
                r = measure(path, dtype)
                ratio = (r["peak"] - r["baseline"]) / r["model_bytes"]
                worst = max(worst, ratio)
                print(f"{path.name:<28} {dtype:<9} {r['model_bytes'] / 1e9:8.3f} {r['baseline'] / 1e9:11.3f} "
                      f"{(r['peak'] - r['baseline']) / 1e9:12.3f} {ratio:6.3f} {r['seconds']:7.1f}")
        print(f"worst ratio {worst:.3f} ({'OK' if worst < 1.25 else 'OVER'} the 1.25 limit)")


if __name__ == "__main__":
    main()
