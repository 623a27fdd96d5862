"""Expansion at scale: time of `batchsd validate`'s manifest read (read_manifest: parse, expand) on a
generated manifest whose rows each ask for several images, and of writing the expanded manifest.

    python tests/bench/bench_expand.py                        # 1,000 rows x n_images 100 = 100,000 rows
    python tests/bench/bench_expand.py --rows 10000 --n-images 100
    python tests/bench/bench_expand.py --plain                # no prompt templates (ids and seeds only)

The issue's target: 1,000 rows with n_images 100 expand to 100,000 rows in validate "in seconds".
Every row's prompt is a template with two alternatives groups and a wildcard (a 10-line file), so
each resulting row draws three choices. Prints the times; asserts only the row count.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from batchsd.job.expand import write_expanded  # noqa: E402
from batchsd.job.manifest import read_manifest  # noqa: E402
from batchsd.job.rows import ManifestOptions  # noqa: E402


def make_manifest(folder: Path, rows: int, n_images: int, plain: bool) -> Path:
    (folder / "wildcards").mkdir()
    (folder / "wildcards" / "style.txt").write_text("\n".join(f"style {k}" for k in range(10)) + "\n")
    template = "a {red|green|blue} {fox|cat|owl} in the snow, __style__, detailed"
    table = pa.table({
        "id": [f"job-{i:05d}" for i in range(rows)],
        "prompt": [f"subject {i}" if plain else f"{template} {i}" for i in range(rows)],
        "seed": pa.array([1000 * i for i in range(rows)], pa.int64()),
        "n_images": pa.array([n_images] * rows, pa.int64()),
        "steps": pa.array([20] * rows, pa.int64()),
        "tag": [f"batch-{i % 7}" for i in range(rows)],
    })
    path = folder / "manifest.parquet"
    pq.write_table(table, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--n-images", type=int, default=100)
    ap.add_argument("--plain", action="store_true", help="prompts without templates")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = make_manifest(folder, args.rows, args.n_images, args.plain)
        options = ManifestOptions(wildcards=folder / "wildcards")
        t0 = time.perf_counter()
        m = read_manifest(path, options)
        t1 = time.perf_counter()
        assert m.ok and len(m.rows) == args.rows * args.n_images, m.format_problems()
        write_expanded(m, folder / "expanded.parquet")
        t2 = time.perf_counter()
    print(f"{args.rows:,} rows x n_images {args.n_images} -> {len(m.rows):,} rows "
          f"({'plain prompts' if args.plain else 'templates: 3 draws a row'}): "
          f"read_manifest {t1 - t0:.2f} s ({len(m.rows) / (t1 - t0):,.0f} rows/s), "
          f"expanded manifest written in {t2 - t1:.2f} s")


if __name__ == "__main__":
    main()
