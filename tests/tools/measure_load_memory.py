"""Peak memory of loading a full-size checkpoint with batchsd.model.checkpoint.load_model.

    python tests/tools/measure_load_memory.py [--keep DIR]                # SD 1.5
    python tests/tools/measure_load_memory.py --model sdxl [--dtypes bfloat16]

SD 1.5: writes random fp16 checkpoints (about 2.1 GB each: .safetensors and .ckpt, from
shared/reference/sd15_keys.json) into a temporary folder. SDXL: the full-width random bf16 single file
of tests/tools/sdxl_full_width_parity.py (6.9 GB, in its --dir; its `write` stage makes it when it is
not there yet). Then for each (file, target dtype) runs a FRESH Python process that records its
resident set size (VmRSS) after the imports, loads the model, and reads the peak (VmHWM). Reports
peak - baseline as a multiple of the loaded model's bytes. The goal: under 1.25x (no second copy of
the weights at any time).
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


def sdxl_file() -> Path:
    """The full-width random SDXL single file of sdxl_full_width_parity.py, written by it if missing."""
    sys.path.insert(0, str(ROOT / "tests" / "tools"))
    from sdxl_full_width_parity import DEFAULT_DIR, FILE_NAME

    path = DEFAULT_DIR / FILE_NAME
    if not path.is_file():
        subprocess.run([sys.executable, str(ROOT / "tests" / "tools" / "sdxl_full_width_parity.py"), "--stage", "write"],
                       cwd=ROOT, check=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--keep", type=Path, help="SD 1.5: write the checkpoints here and keep them")
    parser.add_argument("--dtypes", help="comma list of target dtypes (default: float16,float32,bfloat16 for "
                                         "SD 1.5; bfloat16 for SDXL, whose fp32 model is 14 GB)")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "model")]
    from ref_checkpoint import random_sd15_checkpoint

    dtypes = (args.dtypes or ("bfloat16" if args.model == "sdxl" else "float16,float32,bfloat16")).split(",")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        files = [sdxl_file()] if args.model == "sdxl" else []
        for fmt in ("safetensors", "ckpt") if args.model == "sd15" else ():
            path = folder / f"sd15-random-fp16.{fmt}"
            if not path.exists():
                t = time.perf_counter()
                random_sd15_checkpoint(path, fmt=fmt)
                print(f"wrote {path.name} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s")
            files.append(path)
        print(f"{'file':<30} {'target':<9} {'model GB':>8} {'baseline GB':>11} {'peak-base GB':>12} "
              f"{'ratio':>6} {'load s':>7}")
        worst = 0.0
        for path in files:
            for dtype in dtypes:
                r = measure(path, dtype)
                ratio = (r["peak"] - r["baseline"]) / r["model_bytes"]
                worst = max(worst, ratio)
                print(f"{path.name:<30} {dtype:<9} {r['model_bytes'] / 1e9:8.3f} {r['baseline'] / 1e9:11.3f} "
                      f"{(r['peak'] - r['baseline']) / 1e9:12.3f} {ratio:6.3f} {r['seconds']:7.1f}")
        print(f"worst ratio {worst:.3f} ({'OK' if worst < 1.25 else 'OVER'} the 1.25 limit)")


if __name__ == "__main__":
    main()
