"""The whole job's results from its shards: once every row of a sharded job is done (or failed) by
resume's rule under the current manifest, <out>/results.parquet (all rows in manifest order, the
same table an unsharded run writes) and <out>/summary.json (with an unsharded summary's keys).

Which record a row gets is read_prior's rule over every journal of the folder (each shard's and the
unsharded one): the latest, so an unsharded fix-up run or a shard's --retry-errors is never undone
by a later merge. Pass-through columns are the current manifest's (as compaction writes them).
Rows still to make (no record, a record for other parameters or another model, files gone) mean no
merge and no done marker: `merge_job_results` says which shards to run again. Numerics are not
compared: each record carries its own, and shards may run on other devices.

With --format webdataset it also writes webdataset/sizes.json, open_clip's {tar name: samples}
file, over every process shard's tars (a process shard writes only its own files while it runs).

The shard that completes the job does it (session.finish), or `batchsd status`. Safe to run from
several processes at once: each writes the same content through an atomic rename.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from batchsd.job.atomic import atomic_write_bytes, atomic_write_table
from batchsd.job.journal import PriorRecord, latest_records
from batchsd.job.layout import (WEBDATASET_SIZES_FILE, WEBDATASET_STATS_SUFFIX, RunLayout, job_results_path,
                                job_summary_path)
from batchsd.job.present import existing_files
from batchsd.job.resume import MAKE
from batchsd.job.rows import JobRow
from batchsd.job.run_meta import read_summary, write_summary
from batchsd.job.schema import MANIFEST_NAMES, RESULT_NAMES, now_utc, overlay_extras
from batchsd.job.shards import ShardSpec, shard_of


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


def merge_job_results(out_dir: Path, count: int, rows: Sequence[JobRow], states: Sequence[str],
                      prior: dict[str, PriorRecord], *, schema: pa.Schema, extras: pa.Table | None,
                      summary: dict | None, beyond_limit_ids: Sequence[str] = ()) -> str | None:
    """Write the whole job's results.parquet and summary.json (module docstring). `rows`: the job's rows
    (every shard's, after --limit, sizes resolved); `states`: resume.row_states of them over every
    journal (`prior`: read_prior of the folder); `summary`: a run's summary_record to take the
    run-level keys from (None: the newest shard's done marker); `beyond_limit_ids`: the manifest rows
    --limit leaves out, whose latest records the table keeps too (an error, or ok with its image in
    place), as an unsharded run's compaction does. Returns None when written, else why not."""
    out_dir = Path(out_dir)
    to_make = [r for r, state in zip(rows, states) if state == MAKE]
    if to_make:
        shards = sorted({shard_of(r.id, count) for r in to_make})
        return (f"{len(to_make)} row(s) of the job are not done under the current manifest ("
                f"{', '.join(r.id for r in to_make[:3])}{' ...' if len(to_make) > 3 else ''}: no record, or one for "
                f"other parameters, another model, or files gone): run shard(s) {', '.join(map(str, shards[:20]))} "
                "again (they resume)")
    layouts = [RunLayout(out_dir, ShardSpec(i, count, "merge")) for i in range(count)]
    shard_summaries = [s for lay in layouts if (s := read_summary(lay.summary_path)) is not None]
    if summary is None:
        if not shard_summaries:
            return "no shard has finished a run yet"
        summary = max(shard_summaries, key=lambda s: str(s.get("finished_at", "")))
    more = [rid for rid in beyond_limit_ids if rid in prior]
    ok_paths = {rid: prior[rid].image_path for rid in more if prior[rid].status == "ok"}
    present = existing_files(out_dir, [p for p in ok_paths.values() if p])
    ids = [r.id for r in rows] + [rid for rid in more if rid not in ok_paths or ok_paths[rid] in present]
    by_journal: dict[str, list[str]] = {}
    for rid in ids:
        by_journal.setdefault(prior[rid].parts_dir, []).append(rid)
    tables = [latest_records(Path(d), schema, journal_ids) for d, journal_ids in by_journal.items()]
    if extras is not None:   # pass-through columns come from the manifest: the records' (of any type) are dropped
        tables = [t.select([c for c in t.column_names if c in MANIFEST_NAMES or c in RESULT_NAMES]) for t in tables]
    table = pa.concat_tables(tables, promote_options="permissive")
    where = {rid: i for i, rid in enumerate(table.column("id").to_pylist())}
    if lost := [rid for rid in ids if rid not in where]:    # a part read a moment ago is gone (compacted)
        return f"the records of {len(lost)} row(s) ({', '.join(lost[:3])}) changed while merging; run status again"
    table = table.take(pa.array([where[rid] for rid in ids], type=pa.int64()))
    if extras is not None:
        table = overlay_extras(table, extras)
    if _same_table(job_results_path(out_dir), table) and read_summary(job_summary_path(out_dir)) is not None:
        return None     # merged before, and nothing changed since: the done marker keeps its time
    atomic_write_table(job_results_path(out_dir), table)
    from batchsd.job.outputs.claim import output_settings

    settings = output_settings(out_dir) or {}
    if settings.get("format") == "webdataset":
        write_webdataset_sizes(RunLayout(out_dir).webdataset_dir)
    statuses = table.column("status").to_pylist()[:len(rows)]     # the job's rows (not those beyond --limit)
    ok, failed = statuses.count("ok"), statuses.count("error")
    elapsed = sum(float(s.get("elapsed_s") or 0) for s in shard_summaries)
    made_ok = sum(int(s.get("ok") or 0) for s in shard_summaries)
    made = [(name, sha) for name, sha, status in zip(*(table.column(c).to_pylist()[:len(rows)]
                                                       for c in ("model", "model_sha256", "status"))) if status == "ok"]
    models = [{"name": name, "sha256": sha} for name, sha in dict.fromkeys(made)]   # the table's, first use first
    write_summary(job_summary_path(out_dir), {
        **summary,
        "results": str(job_results_path(out_dir)), "shard_index": None, "shard_count": count,
        "model": models[0].get("name") if len(models) == 1 else None,
        "model_sha256": models[0].get("sha256") if len(models) == 1 else None, "models": models,
        # the whole job's table: ok and failed rows; nothing skipped or pending once merged
        "rows": len(rows), "ok": ok, "failed": failed, "skipped": 0, "previously_failed": 0, "pending": 0,
        "elapsed_s": round(elapsed, 3), "images_per_s": round(made_ok / elapsed, 4) if elapsed > 0 else 0.0,
        "finished_at": now_utc().isoformat(), "exit_code": 1 if failed else 0,
    })
    return None


def _same_table(path: Path, table: pa.Table) -> bool:
    try:
        return pq.read_table(path).equals(table)
    except Exception:  # noqa: BLE001 - absent or unreadable: not the same
        return False


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
