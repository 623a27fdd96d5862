"""`batchsd status OUT`: rows done, failed and missing, per shard and overall; the merged table.

    batchsd status OUT [--manifest M] [--json]

Which rows a job has comes from the manifest; its path (and --limit) are in the run metadata
every run writes (<out>/.batchsd/run.json, or .batchsd/shard-*/run.json), or --manifest. What is
done comes from every journal in OUT (the whole-manifest one and each shard's; the latest record
of a row wins), so rows made by any run, sharded or not, count once. A row is

    ok       its latest record is ok, for the manifest's current parameters, and its image exists
    failed   its latest record is an error (re-made only with --retry-errors)
    missing  no record, a record for other parameters (the row changed), or an ok record whose
             image is gone: the next run makes it

Shards are those of the count found in OUT (.batchsd/shard-*-of-N); a folder never sharded is
one shard. A shard is "done" when its summary (the done marker) is there, "started" when it has a
journal but no summary (running now, or stopped: run it again to resume), else "not started".

Exit status: 0 every row ok; 1 every row made, some failed; 3 some rows missing; 2 usage errors.

When every shard of a sharded run is done, the shard that finished last (or `batchsd status`)
writes <out>/results.parquet (all shards' rows in manifest order, the same table as an unsharded
run's) and <out>/summary.json, once results/*.parquet hold a record of every manifest row.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from batchsd.errors import InputError
from batchsd.scale.sharding import RESULTS_PARTS_DIR, ShardSpec, shard_dirs

EXIT_ALL_OK, EXIT_SOME_FAILED, EXIT_MISSING = 0, 1, 3
META_FILE = "run.json"


@dataclass
class Tally:
    index: int | None       # shard index; None for the overall line
    rows: int = 0
    ok: int = 0
    failed: int = 0
    missing: int = 0
    state: str = ""         # done | started | not started ("" overall)
    last_write: float | None = None   # unix time of the newest journal file

    def add(self, status: str) -> None:
        self.rows += 1
        setattr(self, status, getattr(self, status) + 1)


@dataclass
class StatusReport:
    out_dir: str
    manifest: str
    shard_count: int
    overall: Tally
    shards: list[Tally] = field(default_factory=list)
    models: dict[str, int] = field(default_factory=dict)
    merged: bool = False     # results.parquet holds every row (written now or before)

    @property
    def exit_code(self) -> int:
        if self.overall.missing:
            return EXIT_MISSING
        return EXIT_SOME_FAILED if self.overall.failed else EXIT_ALL_OK

    def to_json(self) -> dict:
        d = asdict(self)
        d["exit_code"] = self.exit_code
        return d


# ----------------------------------------------------------------------------- run metadata

def write_run_meta(path: Path, meta: dict) -> None:
    from batchsd.job.results import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(meta, indent=2, default=str) + "\n").encode())


def read_run_metas(out_dir: Path) -> list[dict]:
    """Every run.json in OUT, newest first."""
    out_dir = Path(out_dir)
    paths = [out_dir / ".batchsd" / META_FILE] + [d / META_FILE for d in shard_dirs(out_dir).values()]
    metas = []
    for p in paths:
        try:
            metas.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(metas, key=lambda m: str(m.get("started_at", "")), reverse=True)


def _shard_count(out_dir: Path) -> int:
    counts = sorted({count for _, count in shard_dirs(out_dir)})
    if len(counts) > 1:
        raise InputError(f"{out_dir} holds shards of several counts ({', '.join(map(str, counts))}); "
                         "status cannot tell which split is meant: keep one count per output folder")
    return counts[0] if counts else 1


# ----------------------------------------------------------------------------- the tally

def job_rows(manifest: Path, limit: int | None):
    """The job's rows with img2img sizes resolved (params_hash needs them)."""
    from batchsd.job.manifest import read_manifest
    from batchsd.job.planner import resolve_image_sizes

    m = read_manifest(manifest)
    if m.problems:
        raise InputError(f"the manifest {manifest} has problems now:\n{m.format_problems()}")
    rows = list(m.rows[:limit] if limit is not None else m.rows)
    resolved, _ = resolve_image_sizes(rows)
    by_index = {r.index: r for r in resolved}
    return [by_index.get(r.index, r) for r in rows]


def collect_status(out_dir: Path, manifest: Path | None = None, limit: int | None = None,
                   merge: bool = True) -> StatusReport:
    from batchsd.job.planner import shard_of
    from batchsd.job.results import read_prior

    out_dir = Path(out_dir)
    if not (out_dir / ".batchsd").is_dir():
        raise InputError(f"{out_dir} holds no batchsd run (no .batchsd folder): give the --out folder of a run")
    metas = read_run_metas(out_dir)
    if manifest is None:
        if not metas:
            raise InputError(f"{out_dir} has no run metadata (.batchsd/run.json): pass --manifest MANIFEST")
        manifest = Path(metas[0]["manifest"])
        limit = metas[0].get("limit") if limit is None else limit
        if not manifest.is_file():
            raise InputError(f"the manifest of this run, {manifest}, is not here: pass --manifest MANIFEST")
    rows = job_rows(Path(manifest), limit)
    count = _shard_count(out_dir)
    prior = read_prior(out_dir)
    shards = [Tally(i) for i in range(count)]
    overall = Tally(None)
    models: dict[str, int] = {}
    for row in rows:
        rec = prior.get(row.id)
        if rec is None or rec.params_hash != row.params_hash():
            status = "missing"
        elif rec.status == "ok":
            status = "ok" if rec.image_path and (out_dir / rec.image_path).is_file() else "missing"
        else:
            status = "failed"
        if status != "missing" and rec.model:
            models[rec.model] = models.get(rec.model, 0) + 1
        shards[shard_of(row.id, count) if count > 1 else 0].add(status)
        overall.add(status)
    dirs = shard_dirs(out_dir)
    for t in shards:
        if count == 1:
            journal, summary = out_dir / ".batchsd" / "parts", out_dir / "summary.json"
        else:
            d = dirs.get((t.index, count))
            journal, summary = (d / "parts", d / "summary.json") if d else (None, None)
        t.last_write = _newest_mtime(journal) if journal else None
        t.state = "done" if summary and summary.is_file() else ("started" if journal and journal.is_dir() else "not started")
    report = StatusReport(str(out_dir), str(manifest), count, overall, shards, models)
    report.merged = (out_dir / "results.parquet").is_file() and count == 1
    if count > 1:
        report.merged = _merged_is_whole(out_dir, [r.id for r in rows])
        if merge and not report.merged and all(t.state == "done" for t in shards):
            report.merged = merge_shard_results(out_dir, count, [r.id for r in rows])
    return report


def _newest_mtime(folder: Path) -> float | None:
    try:
        return max((p.stat().st_mtime for p in folder.iterdir()), default=None)
    except OSError:
        return None


# ----------------------------------------------------------------------------- merging shards

def _merged_is_whole(out_dir: Path, ids: Sequence[str]) -> bool:
    import pyarrow.parquet as pq

    path = out_dir / "results.parquet"
    if not path.is_file():
        return False
    try:
        have = set(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    except Exception:  # noqa: BLE001 - unreadable: not merged
        return False
    return have.issuperset(ids)


def merge_shard_results(out_dir: Path, count: int, manifest_ids: Sequence[str],
                        required_ids: Sequence[str] | None = None) -> bool:
    """Write <out>/results.parquet from results/part-*-of-<count>.parquet when every shard is done
    and the parts hold a record of every row of the job (`required_ids`, default all
    `manifest_ids`); rows in manifest order, as an unsharded run's. Also <out>/summary.json (the
    shards' figures added up). Returns whether it wrote them. Safe to run from several shards at
    once: each writes the same content through an atomic rename."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchsd.job.results import atomic_write_table, write_summary
    from batchsd.scale.sharding import RunLayout

    out_dir = Path(out_dir)
    layouts = [RunLayout(out_dir, ShardSpec(i, count, "merge")) for i in range(count)]
    summaries = []
    for lay in layouts:
        try:
            summaries.append(json.loads(lay.summary_path.read_text()))
        except (OSError, ValueError):
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
    atomic_write_table(out_dir / "results.parquet", table)
    total = {k: sum(int(s.get(k) or 0) for s in summaries)
             for k in ("rows", "ok", "failed", "skipped", "previously_failed", "pending")}
    statuses = table.column("status").to_pylist()
    write_summary(out_dir, {
        "complete": True, "shards": count, "out_dir": str(out_dir),
        "results": str(out_dir / "results.parquet"),
        "results_parts": str(out_dir / RESULTS_PARTS_DIR / "*.parquet"),
        "manifest": summaries[0].get("manifest"), "model": summaries[0].get("model"),
        "model_sha256": summaries[0].get("model_sha256"),
        "rows": table.num_rows, "ok": statuses.count("ok"), "failed": statuses.count("error"),
        "made_in_last_runs": total["ok"] + total["failed"],
        "elapsed_s_sum": round(sum(float(s.get("elapsed_s") or 0) for s in summaries), 3),
        "finished_at": max(str(s.get("finished_at", "")) for s in summaries),
        "exit_code": 1 if statuses.count("error") else 0,
    })
    return True


# ----------------------------------------------------------------------------- display

def _ago(t: float | None) -> str:
    if t is None:
        return "-"
    from batchsd.job.progress import format_duration

    return format_duration(max(0.0, time.time() - t)) + " ago"


def print_status(console, report: StatusReport) -> None:
    from rich.markup import escape
    from rich.table import Table

    o = report.overall
    console.print(f"{escape(report.out_dir)}: {o.rows} row(s) from {escape(report.manifest)}"
                  + (f", {report.shard_count} shards" if report.shard_count > 1 else ""))
    if report.shard_count > 1:
        table = Table(show_edge=False, pad_edge=False, box=None)
        for col in ("shard", "rows", "ok", "failed", "missing", "state", "last write"):
            table.add_column(col, justify="right" if col in ("rows", "ok", "failed", "missing") else "left")
        for t in report.shards:
            style = "green" if t.state == "done" and not t.missing else ("yellow" if t.missing else None)
            table.add_row(f"{t.index}/{report.shard_count}", str(t.rows), str(t.ok), str(t.failed), str(t.missing),
                          t.state, _ago(t.last_write), style=style)
        console.print(table)
    console.print(f"overall: {o.ok} ok, {o.failed} failed, {o.missing} missing of {o.rows}"
                  + (f" ({100.0 * o.ok / o.rows:.1f}% ok)" if o.rows else ""))
    if report.models:
        console.print("models: " + ", ".join(f"{escape(m)} ({n})" for m, n in report.models.items()))
    if o.missing:
        todo = [f"{t.index}" for t in report.shards if t.missing]
        hint = (f"run shard(s) {', '.join(todo[:20])}{' ...' if len(todo) > 20 else ''} again" if report.shard_count > 1
                else "run the same command again")
        console.print(f"[yellow]{o.missing} row(s) still to make: {hint} (they resume)[/yellow]")
    elif o.failed:
        console.print(f"[red]{o.failed} row(s) failed[/red]: their reasons are in the results' `error` column; "
                      "`batchsd run ... --retry-errors` makes them again")
    else:
        console.print("[green]every row is done[/green]")
    if report.shard_count > 1:
        out = escape(report.out_dir)
        where = f"{out}/results.parquet (the whole job) and " if report.merged else ""
        console.print(f"table: {where}{out}/{RESULTS_PARTS_DIR}/*.parquet")
