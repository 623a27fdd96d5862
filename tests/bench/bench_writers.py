"""Output writers without a model: rows/s of each --format, and bytes per image by image format.

    python tests/bench/bench_writers.py                              # 1k and 10k rows, 64x64 images
    python tests/bench/bench_writers.py --rows 1000,10000,100000     # 100k: minutes per format
    python tests/bench/bench_writers.py --only bytes --size 512      # bytes per image only

1. Throughput: synthetic images go through the run's writer path exactly as `batchsd run` sends
   them (writer.ResultWriter in its thread, the format's OutputWriter from outputs.open_output, the
   journal with its compactions, the final compaction of session.finish), in batches of
   --batch-rows, for each format at each row count. Reported: rows/s over the whole run (first
   submit to the final compaction, so a shard format's shard writes are in it) and bytes on disk
   per row of the format's output folder. Cost per row is flat when rows/s does not fall with
   the row count.
2. Bytes per image: outputs.encode.encode_image (the bytes a run writes, metadata included) for
   png, jpg and webp at several qualities, at --size.

The images are synthetic and deterministic: a low-frequency random field (an 8x8 RGB grid,
bicubic-upsampled) plus mild noise (sigma 4), a stand-in for a photo's smooth regions and grain; a
generated picture's sizes depend on its content, so take the byte figures as relative. Files go to
a temporary folder (removed at the end; --keep keeps it). Figures: docs/performance.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

FORMATS = ("files", "imagefolder", "webdataset", "parquet")
QUALITIES = {"png": [None], "jpg": [75, 90, 95], "webp": [75, 90]}


def synthetic_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        grid = Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
        smooth = np.asarray(grid.resize((size, size), Image.BICUBIC), dtype=np.float32)
        noisy = np.clip(smooth + rng.normal(0, 4, size=smooth.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(noisy))
    return images


def job_rows(n: int, size: int):
    from batchsd.job.rows import JobRow

    return [JobRow(index=i, id=f"r{i:07d}", prompt=f"a photo number {i}, highly detailed", negative_prompt="",
                   seed=i, steps=25, cfg_scale=7.5, sampler="euler", width=size, height=size, init_image=None,
                   strength=None, extra={}) for i in range(n)]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def bench_format(tmp: Path, fmt: str, n: int, pool: list[Image.Image], size: int, batch_rows: int,
                 shard_size: int) -> dict:
    from batchsd.job.journal import Journal
    from batchsd.job.layout import RunLayout
    from batchsd.job.outputs import open_output
    from batchsd.job.outputs.spec import OutputSpec
    from batchsd.job.schema import results_schema
    from batchsd.job.writer import BatchResult, ResultWriter

    out = tmp / f"{fmt}-{n}"
    layout = RunLayout(out)
    rows = job_rows(n, size)
    spec = OutputSpec(format=fmt, shard_size=shard_size) if fmt in ("webdataset", "parquet") else OutputSpec(format=fmt)
    journal = Journal(out, results_schema({}), [r.id for r in rows], parts_dir=layout.parts_dir,
                      results_path=layout.results_path)
    records = [dict(r.to_record(), params_hash=r.params_hash(), model="bench", model_sha256=None) for r in rows]
    t0 = time.perf_counter()
    output = open_output(spec, layout, rows=rows, todo=rows, journal=journal, save_latents=False)
    writer = ResultWriter(out, journal, save_latents=False,
                          output=output)
    for i in range(0, n, batch_rows):
        recs = records[i:i + batch_rows]
        images = [pool[(i + j) % len(pool)] for j in range(len(recs))]
        writer.submit(BatchResult(records=recs, images=images, errors=[None] * len(recs), elapsed_s=1.0))
    writer.close()
    journal.compact()                       # what session.finish does last
    wall = time.perf_counter() - t0
    data_dirs = {"files": "images", "imagefolder": "train", "webdataset": "webdataset", "parquet": "data"}
    on_disk = folder_bytes(out / data_dirs[fmt])
    return dict(format=fmt, rows=n, wall_s=wall, rows_per_s=n / wall, bytes_per_row=on_disk / n)


def bench_bytes(size: int, count: int) -> list[dict]:
    from batchsd.job.outputs.encode import encode_image
    from batchsd.job.outputs.spec import OutputSpec

    images = synthetic_images(count, size, seed=1)
    rec = dict(prompt="a photo, highly detailed", negative_prompt="", steps=25, sampler="euler", cfg_scale=7.5,
               seed=1, width=size, height=size, id="r", params_hash="0" * 64)
    found = []
    for image_format, qualities in QUALITIES.items():
        for q in qualities:
            spec = OutputSpec(image_format=image_format, quality=q)
            t0 = time.perf_counter()
            sizes = [len(encode_image(im, rec, spec, "bench", None)) for im in images]
            ms = (time.perf_counter() - t0) / count * 1e3
            found.append(dict(image_format=image_format, quality=spec.effective_quality, size=size,
                              bytes=sum(sizes) / count, encode_ms=ms))
    return found


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1000,10000", help="row counts, comma-separated (e.g. 1000,10000,100000)")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--batch-rows", type=int, default=4, help="rows per BatchResult (the run's batch size)")
    ap.add_argument("--shard-size", type=int, default=1000, help="--shard-size of webdataset/parquet")
    ap.add_argument("--bytes-images", type=int, default=16, help="images per entry of the bytes table")
    ap.add_argument("--only", default="throughput,bytes")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    only = set(args.only.split(","))
    print(f"# bench_writers: size {args.size}, batch rows {args.batch_rows}, shard size {args.shard_size}, "
          f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}", flush=True)
    if "throughput" in only:
        tmp = Path(tempfile.mkdtemp(prefix="bench-writers-"))
        pool = synthetic_images(32, args.size)
        results = []
        try:
            for fmt in args.formats.split(","):
                for n in (int(x) for x in args.rows.split(",")):
                    r = bench_format(tmp, fmt, n, pool, args.size, args.batch_rows, args.shard_size)
                    print(f"{fmt:12s} {n:>7d} rows: {r['rows_per_s']:8.1f} rows/s ({r['wall_s']:.1f} s), "
                          f"{r['bytes_per_row']:.0f} B/row on disk", flush=True)
                    results.append(r)
                    if not args.keep:
                        shutil.rmtree(tmp / f"{fmt}-{n}", ignore_errors=True)
        finally:
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                print(f"kept {tmp}")
        print(table(["format", "rows", "rows/s", "bytes/row on disk"],
                    [[r["format"], r["rows"], f"{r['rows_per_s']:.0f}", f"{r['bytes_per_row']:.0f}"] for r in results]))
    if "bytes" in only:
        found = bench_bytes(args.size, args.bytes_images)
        print(table(["image format", "quality", "size", "bytes/image", "encode ms"],
                    [[f["image_format"], f["quality"] or "-", f"{f['size']}x{f['size']}", f"{f['bytes']:.0f}",
                      f"{f['encode_ms']:.1f}"] for f in found]))


if __name__ == "__main__":
    main()
