"""The whole job's results from its shards: when every shard of a sharded run is done, its
results parts are merged into <out>/results.parquet (all rows in manifest order, the same table an
unsharded run writes) and <out>/summary.json (the shards' figures added up).

With --format webdataset it also writes webdataset/sizes.json, open_clip's {tar name: samples}
file, over every process shard's tars (a process shard writes only its own files while it runs).

The shard that finishes last does it (session.finish), or `batchsd status`. Safe to run from
several shards at once: each writes the same content through an atomic rename.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from batchsd.job.atomic import atomic_write_bytes, atomic_write_table
from batchsd.job.layout import (RESULTS_PARTS_DIR, WEBDATASET_SIZES_FILE, WEBDATASET_STATS_SUFFIX, RunLayout,
                                job_results_path, job_summary_path)
from batchsd.job.run_meta import read_summary, write_summary
from batchsd.job.shards import ShardSpec


def merged_is_whole(out_dir: Path, ids: Sequence[str]) -> bool:
    """Whether <out>/results.parquet holds a record of every id."""
    path = job_results_path(out_dir)
    if not path.is_file():
        return False
    try:
        have = set(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    except Exception:  # noqa: BLE001 - unreadable: not merged
        return False
    return have.issuperset(ids)


def merge_shard_results(out_dir: Path, count: int, manifest_ids: Sequence[str],
                        required_ids: Sequence[str] | None = None) -> bool:
    """Write <out>/results.parquet and <out>/summary.json from the `count` shards' parts when every
    shard is done and the parts hold a record of every row of the job (`required_ids`, default all
    `manifest_ids`). Returns whether it wrote them."""
    out_dir = Path(out_dir)
    layouts = [RunLayout(out_dir, ShardSpec(i, count, "merge")) for i in range(count)]
    summaries = [read_summary(lay.summary_path) for lay in layouts]
    if any(s is None for s in summaries):
        return False  # a shard is not done
    tables = []
    for lay in layouts:
        try:
            tables.append(pq.read_table(lay.results_path))
        except Exception:  # noqa: BLE001 - missing or unreadable part: not mergeable now
            return False
    table = pa.concat_tables(tables, promote_options="permissive")
    where = {rid: i for i, rid in enumerate(table.column("id").to_pylist())}
    if any(rid not in where for rid in (manifest_ids if required_ids is None else required_ids)):
        return False
    table = table.take(pa.array([where[rid] for rid in manifest_ids if rid in where], type=pa.int64()))
    atomic_write_table(job_results_path(out_dir), table)
    from batchsd.job.outputs.claim import output_settings

    settings = output_settings(out_dir) or {}
    if settings.get("format") == "webdataset":
        write_webdataset_sizes(RunLayout(out_dir).webdataset_dir)
    total = {k: sum(int(s.get(k) or 0) for s in summaries)
             for k in ("rows", "ok", "failed", "skipped", "previously_failed", "pending")}
    statuses = table.column("status").to_pylist()
    models = list({(m.get("name"), m.get("sha256")): m for s in summaries for m in (s.get("models") or [])
                   if isinstance(m, dict)}.values())   # every shard's, first use first
    if not models and summaries[0].get("model"):          # shards of a version before per-row models
        models = [{"name": summaries[0].get("model"), "sha256": summaries[0].get("model_sha256")}]
    write_summary(job_summary_path(out_dir), {
        "complete": True, "shards": count, "out_dir": str(out_dir),
        "results": str(job_results_path(out_dir)),
        "results_parts": str(out_dir / RESULTS_PARTS_DIR / "*.parquet"),
        "manifest": summaries[0].get("manifest"),
        "model": models[0].get("name") if len(models) == 1 else None,
        "model_sha256": models[0].get("sha256") if len(models) == 1 else None, "models": models,
        "rows": table.num_rows, "ok": statuses.count("ok"), "failed": statuses.count("error"),
        "made_in_last_runs": total["ok"] + total["failed"],
        "elapsed_s_sum": round(sum(float(s.get("elapsed_s") or 0) for s in summaries), 3),
        "finished_at": max(str(s.get("finished_at", "")) for s in summaries),
        "exit_code": 1 if statuses.count("error") else 0,
    })
    return True


def write_webdataset_sizes(folder: Path) -> dict[str, int]:
    """<folder>/sizes.json = {tar name: samples} over every shard in `folder` whose done marker
    (<stem>_stats.json) is there."""
    sizes = {}
    for stats_path in sorted(Path(folder).glob(f"*{WEBDATASET_STATS_SUFFIX}")):
        try:
            stats = json.loads(stats_path.read_text())
            sizes[stats["tar"]] = int(stats["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    atomic_write_bytes(Path(folder) / WEBDATASET_SIZES_FILE, (json.dumps(sizes, indent=2) + "\n").encode())
    return sizes
