"""One --out holds one output configuration: output.json records it (and a shard format's plan).

Every run writes its layout's output.json (.batchsd/output.json, or a process shard's own) when it
starts, after checking it against every output.json already in the folder:
  - the format, image format, quality, captions and shard size must be the same (a folder written
    before formats existed, with journal records but no output.json, is `files` / `png`);
  - a format other than `files` keeps to one way of sharding processes (its dataset files and
    metadata are per process shard);
  - a shard format's rows must be those its first run planned (the shard plan is a function of
    them: outputs/dataset_shards.py).
Otherwise UsageError, naming what differs and the fix; nothing is written.
"""
from __future__ import annotations

import hashlib
import json
from math import ceil
from pathlib import Path
from typing import Sequence

from batchsd.job.atomic import atomic_write_bytes
from batchsd.job.journal import part_files
from batchsd.job.layout import OUTPUT_FILE, RunLayout, journal_parts_dirs, shard_dirs
from batchsd.job.options import UsageError
from batchsd.job.outputs.spec import OutputSpec
from batchsd.job.run_meta import read_json_objects

SETTINGS = ("format", "image_format", "quality", "captions", "shard_size")
LEGACY = OutputSpec().to_json()


def describe(settings: dict) -> str:
    words = f"--format {settings.get('format')} --image-format {settings.get('image_format')}"
    if settings.get("quality") is not None:
        words += f" --quality {settings['quality']}"
    if settings.get("format") in ("webdataset", "parquet"):
        words += f" --shard-size {settings.get('shard_size')}"
    if settings.get("captions"):
        words += " --captions"
    return words


def read_output_metas(out_dir: Path) -> dict[Path, dict]:
    """{path: content} of every readable output.json in the folder."""
    out_dir = Path(out_dir)
    paths = [RunLayout(out_dir).output_meta_path] + [d / OUTPUT_FILE for _, d in sorted(shard_dirs(out_dir).items())]
    return read_json_objects(paths)


def output_settings(out_dir: Path) -> dict | None:
    """The folder's output settings (any output.json; the legacy `files` ones for a folder with
    records but none); None for a folder no run has written."""
    metas = read_output_metas(out_dir)
    if metas:
        return next(iter(metas.values()))
    if any(part_files(d) for d in journal_parts_dirs(out_dir)):
        return dict(LEGACY, shard_count=None)
    return None


def rows_sha256(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def claim_output(layout: RunLayout, spec: OutputSpec, ids: Sequence[str]) -> dict:
    """Check `spec` and this run's rows `ids` against the folder (module docstring), then write
    this layout's output.json. Returns what it wrote."""
    out_dir = layout.out_dir
    mine = spec.to_json()
    count = layout.shard.count if layout.sharded else 1
    metas = read_output_metas(out_dir)
    if not metas and any(part_files(d) for d in journal_parts_dirs(out_dir)):
        metas = {out_dir: dict(LEGACY, shard_count=None)}
    for path, meta in metas.items():
        theirs = {k: meta.get(k) for k in SETTINGS}
        if theirs != {k: mine[k] for k in SETTINGS}:
            raise UsageError(f"{out_dir} holds output written with {describe(theirs)}; this run asks for "
                             f"{describe(mine)}. One --out holds one output format: run with "
                             f"{describe(theirs)}, or use another --out")
        other_count = meta.get("shard_count")
        if spec.format != "files" and other_count is not None and other_count != count:
            how = "without process shards" if other_count == 1 else f"by {other_count} process shards"
            now = "without process shards" if count == 1 else f"as shard {layout.shard.index}/{count}"
            raise UsageError(f"{out_dir} holds --format {spec.format} output written {how}; this run is {now}. "
                             f"Its dataset files are per process shard: run it {how} again, or use another --out")
    record = dict(mine, shard_count=count, rows=len(ids), rows_sha256=rows_sha256(ids),
                  dataset_shards=ceil(len(ids) / spec.shard_size) if spec.sharded else None)
    own = metas.get(layout.output_meta_path)
    if spec.sharded and own is not None and own.get("rows_sha256") != record["rows_sha256"]:
        raise UsageError(f"{out_dir} holds --format {spec.format} shards planned for {own.get('rows')} row(s) "
                         f"({own.get('dataset_shards')} shard(s) of {spec.shard_size}); this run has {len(ids)} "
                         "row(s), or other ids or another order (another manifest or --limit). A dataset shard holds "
                         "fixed rows: run with the manifest and --limit of the first run, or use another --out")
    if own != record:
        atomic_write_bytes(layout.output_meta_path, (json.dumps(record, indent=2) + "\n").encode())
    return record
