"""Manifest validation at scale: time and peak RSS of read_manifest on a generated 1,000,000-row file.

    python tests/bench/bench_manifest.py                 # 1,000,000 rows, Parquet and CSV
    python tests/bench/bench_manifest.py --rows 200000 --formats parquet
    python tests/bench/bench_manifest.py --bad-every 10     # 200,000 problems to report

The target (issue "The batch job"): `batchsd validate` on 1,000,000 rows in under 30 s and 2 GiB RSS.
Each measurement runs in a fresh subprocess (peak RSS is per process: ru_maxrss), which imports
batchsd.job.manifest (not torch: the rules come from batchsd.model.request and sampler_names), reads
and validates the file, then groups the rows with plan_batches (batchsd.job.plan). The generated rows
look like a real job list: ~100-character prompts, negative prompts, explicit seeds, a few
sizes/samplers (A1111 names included) and a pass-through column; 1 row in 10 leaves seed empty and 1
in 20 leaves id empty (derived defaults).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SUBJECTS = ["a red fox", "an old lighthouse", "a neon city street", "a porcelain teapot", "a small robot",
            "a castle on clouds", "a bowl of ramen", "a mountain lake", "an astronaut", "a koi pond"]
STYLES = ["oil painting", "studio photo, 85mm", "watercolor", "ink drawing", "cinematic lighting, 4k",
          "children's book illustration", "isometric 3d render", "pixel art"]
SAMPLERS = ["DPM++ 2M Karras", "euler_a", "Euler a", "ddim", "dpmpp_2m", "euler"]
SIZES = [(512, 512), (512, 768), (768, 512), (256, 256)]


def make_table(n: int, seed: int = 0, bad_every: int = 0) -> pa.Table:
    """bad_every=k: every k-th row has width 500 (not a multiple of 8) and the row after it repeats
    its id, so 2 rows in k are reported."""
    rng = np.random.default_rng(seed)
    subject, style = rng.integers(0, len(SUBJECTS), n), rng.integers(0, len(STYLES), n)
    prompts = [f"{SUBJECTS[a]}, {STYLES[b]}, highly detailed, variation {i}, trending composition, soft light"
               for i, (a, b) in enumerate(zip(subject.tolist(), style.tolist()))]
    ids = [None if i % 20 == 7 else f"job-{i:07d}" for i in range(n)]
    seeds = rng.integers(0, 2**63 - 1, n, dtype=np.int64)
    size = rng.integers(0, len(SIZES), n)
    widths = np.array([w for w, _ in SIZES])[size].astype(np.int64)
    if bad_every:
        widths[::bad_every] = 500
        for i in range(1, n, bad_every):
            ids[i] = ids[i - 1] or f"job-{i - 1:07d}"
    return pa.table({
        "id": pa.array(ids, pa.string()),
        "prompt": pa.array(prompts, pa.string()),
        "negative_prompt": pa.array(["blurry, low quality, watermark"] * n, pa.string()),
        "seed": pa.array(seeds, mask=(np.arange(n) % 10 == 3)),
        "steps": pa.array(rng.choice([20, 25, 30], n).astype(np.int64)),
        "cfg_scale": pa.array(rng.choice([5.0, 7.5, 9.0], n)),
        "sampler": pa.array([SAMPLERS[k] for k in rng.integers(0, len(SAMPLERS), n).tolist()], pa.string()),
        "width": pa.array(widths),
        "height": pa.array(np.array([h for _, h in SIZES])[size].astype(np.int64)),
        "tag": pa.array([f"batch{k}" for k in rng.integers(0, 50, n).tolist()], pa.string()),
    })


MEASURE = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from batchsd.job.manifest import read_manifest
from batchsd.job.plan import plan_batches
t1 = time.perf_counter()
m = read_manifest(sys.argv[1])
t2 = time.perf_counter()
batches = plan_batches(m.rows, 8)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "read_manifest_s": t2 - t1, "plan_batches_s": t3 - t2,
                  "rows": len(m.rows), "problems": len(m.problems), "batches": len(batches),
                  "cpu_s": (lambda u: u.ru_utime + u.ru_stime)(resource.getrusage(resource.RUSAGE_SELF)),
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def measure(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], cwd=REPO, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--formats", default="parquet,csv")
    parser.add_argument("--bad-every", type=int, default=0, help="make 2 rows in every K invalid")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the manifests (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        table = make_table(args.rows, bad_every=args.bad_every)
        print(f"generated {args.rows:,} rows in {time.perf_counter() - t:.1f} s")
        for fmt in args.formats.split(","):
            path = folder / f"manifest_{args.rows}.{fmt}"
            if fmt == "parquet":
                pq.write_table(table, path)
            else:
                pacsv.write_csv(table, path)
            result = measure(path)
            ok = result["import_s"] + result["read_manifest_s"] < 30 and result["peak_rss_gib"] < 2
            print(f"{fmt:8s} {path.stat().st_size / 2**20:7.1f} MiB  import {result['import_s']:.1f} s  "
                  f"read_manifest {result['read_manifest_s']:.1f} s  plan_batches {result['plan_batches_s']:.1f} s  "
                  f"(process CPU {result['cpu_s']:.1f} s)  peak RSS {result['peak_rss_gib']:.2f} GiB  rows {result['rows']:,}  "
                  f"problems {result['problems']}  batches {result['batches']:,}  "
                  f"{'OK' if ok else 'OVER TARGET'} (30 s, 2 GiB)")


if __name__ == "__main__":
    main()
