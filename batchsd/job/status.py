"""`batchsd status OUT`: rows done, failed and missing, per shard and overall; the merged table.

    batchsd status OUT [--manifest M] [--json]

Which rows a job has comes from the manifest; its path (and --limit) are in the run metadata
every run writes (run_meta.py), or --manifest. What is done comes from every journal in OUT (the
whole-manifest one and each shard's; the latest record of a row wins), so rows made by any run,
sharded or not, count once. A row's state is resume's rule (resume.row_states), with the model of
the newest run:

    ok       done: the next run skips it
    failed   its latest record is an error (re-made only with --retry-errors)
    missing  the next run makes it: no record, a record for other parameters or another model,
             or an ok record whose files are gone

Shards are those of the count found in OUT; a folder never sharded is one shard. A shard is
"running" while a process holds its lock, "done" when its summary (the done marker) is there,
"started" when it has a journal but no summary (stopped: run it again to resume), else
"not started".

Exit status: 0 every row ok; 1 every row made, some failed; 3 some rows missing; 2 usage errors.

With --format webdataset or parquet, each process shard's dataset shards are counted too:
written (their done marker is there: layout.RunLayout.dataset_shard_marker) of planned
(ceil(its rows / --shard-size)).

When every row of a sharded job is done (or failed), the shard run that completes it (or `batchsd
status`, when no shard is running) writes the whole job's results table and done marker (merge.py).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from math import ceil
from pathlib import Path

from batchsd.errors import InputError
from batchsd.job.layout import RESULTS_PARTS_DIR, RunLayout, job_results_path, shard_dirs
from batchsd.job.shards import ShardSpec

EXIT_ALL_OK, EXIT_SOME_FAILED, EXIT_MISSING = 0, 1, 3
STATE_WORDS = {"done": "ok", "make": "missing", "failed": "failed"}   # resume's states as status names them


@dataclass
class Tally:
    index: int | None       # shard index; None for the overall line
    rows: int = 0
    ok: int = 0
    failed: int = 0
    missing: int = 0
    state: str = ""         # running | done | started | not started ("" overall)
    last_write: float | None = None   # unix time of the newest journal file
    dataset_shards: int | None = None           # --format webdataset/parquet: dataset shards planned
    dataset_shards_written: int | None = None   # ... and written (done marker in place)

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
    limit: int | None = None  # the run's --limit (the job is the manifest's first `limit` rows)
    beyond_limit: int = 0     # manifest rows the limit leaves out: not counted as missing
    verified: bool = False    # --verify: rows whose image does not hash to its record count as missing
    output_format: str = "files"   # --format of the folder (outputs/claim.py)

    @property
    def exit_code(self) -> int:
        if self.overall.missing:
            return EXIT_MISSING
        return EXIT_SOME_FAILED if self.overall.failed else EXIT_ALL_OK

    @property
    def running(self) -> bool:
        return any(t.state == "running" for t in self.shards)

    def to_json(self) -> dict:
        d = asdict(self)
        d["exit_code"] = self.exit_code
        return d


def _shard_count(out_dir: Path) -> int:
    counts = sorted({count for _, count in shard_dirs(out_dir)})
    if len(counts) > 1:
        raise InputError(f"{out_dir} holds shards of several counts ({', '.join(map(str, counts))}); "
                         "status cannot tell which split is meant: keep one count per output folder")
    return counts[0] if counts else 1


def _meta_text(meta: dict, key: str) -> str | None:
    value = meta.get(key)
    return value if isinstance(value, str) and value else None


def collect_status(out_dir: Path, manifest: Path | None = None, limit: int | None = None,
                   merge: bool = True, verify: bool = False) -> StatusReport:
    from batchsd.job.journal import read_prior
    from batchsd.job.lock import is_locked
    from batchsd.job.merge import merge_job_results, merged_is_whole
    from batchsd.job.outputs.claim import output_settings
    from batchsd.job.outputs.spec import check_verify
    from batchsd.job.reader import read_rows
    from batchsd.job.resume import row_states
    from batchsd.job.run_meta import read_run_metas
    from batchsd.job.rows import ManifestOptions
    from batchsd.job.shards import shard_of

    out_dir = Path(out_dir)
    if not RunLayout(out_dir).journal_dir.is_dir():
        raise InputError(f"{out_dir} holds no batchsd run (no {RunLayout(out_dir).journal_dir.name} folder): "
                         "give the --out folder of a run")
    metas = read_run_metas(out_dir)
    newest = metas[0] if metas else {}
    if manifest is None:
        recorded = _meta_text(newest, "manifest")
        if recorded is None:
            raise InputError(f"{out_dir} has no readable run metadata ({RunLayout(out_dir).meta_path.name}): "
                             "pass --manifest MANIFEST")
        manifest = Path(recorded)
        if limit is None and isinstance(newest.get("limit"), int) and newest["limit"] >= 0:
            limit = newest["limit"]
        if not manifest.is_file():
            raise InputError(f"the manifest of this run, {manifest}, is not here: pass --manifest MANIFEST")
    try:
        # the rows as the run read them (its --map and --wildcards, recorded in run.json)
        options = ManifestOptions.from_json(newest.get("manifest_options"))
        whole, rows, _ = read_rows(Path(manifest), limit, options=options)
    except InputError as e:
        raise InputError(f"the manifest {manifest} cannot be read as a job now:\n{e}") from None
    count = _shard_count(out_dir)
    prior = read_prior(out_dir)
    if verify:
        check_verify(str((output_settings(out_dir) or {}).get("format") or "files"))
    states = row_states(rows, prior, out_dir, made_with=_recorded_models(newest),
                        save_latents=newest.get("save_latents") is True, verify=verify)
    shards = [Tally(i) for i in range(count)]
    overall = Tally(None)
    models: dict[str, int] = {}
    for row, state in zip(rows, states):
        status = STATE_WORDS[state]
        rec = prior.get(row.id)
        if status != "missing" and rec.model:
            models[rec.model] = models.get(rec.model, 0) + 1
        shards[shard_of(row.id, count) if count > 1 else 0].add(status)
        overall.add(status)
    for t in shards:
        layout = RunLayout(out_dir, ShardSpec(t.index, count, "status") if count > 1 else None)
        journal_exists = layout.parts_dir.is_dir()
        t.last_write = _newest_mtime(layout.parts_dir) if journal_exists else None
        if is_locked(layout.lock_path):
            t.state = "running"
        elif layout.summary_path.is_file():
            t.state = "done"
        else:
            t.state = "started" if journal_exists else "not started"
    report = StatusReport(str(out_dir), str(manifest), count, overall, shards, models, limit=limit,
                          beyond_limit=len(whole.rows) - len(rows), verified=verify)
    _count_dataset_shards(report, out_dir)
    report.merged = job_results_path(out_dir).is_file() and count == 1
    if count > 1:
        report.merged = not overall.missing and merged_is_whole(out_dir, [r.id for r in rows])
        if merge and not overall.missing and not report.running:   # written again: it may predate a later run
            from batchsd.job.schema import results_schema

            why_not = merge_job_results(out_dir, count, rows, states, prior, schema=results_schema(whole.extra_types),
                                        extras=whole.extras, summary=None,
                                        beyond_limit_ids=[r.id for r in whole.rows[len(rows):]])
            report.merged = report.merged or why_not is None
    return report


def _recorded_models(meta: dict):
    """The models run.json says the rows are made with (session._write_run_meta): `models` by key,
    `default_model` for rows without a model cell; a run.json from before per-row models names one
    `model`. Numerics are not compared."""
    from batchsd.job.resume import ModelIdentity, RowModels

    models = meta.get("models")
    if isinstance(models, dict) and models:
        by_key = {key: (ModelIdentity(m["name"], m.get("sha256") if isinstance(m.get("sha256"), str) else None), None)
                  for key, m in models.items() if isinstance(m, dict) and isinstance(m.get("name"), str)}
        default = meta.get("default_model")
        return RowModels(by_key, default if isinstance(default, str) else None)
    name = _meta_text(meta, "model")
    return RowModels.one(ModelIdentity(name, _meta_text(meta, "model_sha256")) if name else None)


def _count_dataset_shards(report: StatusReport, out_dir: Path) -> None:
    """Each process shard's dataset shards, planned and written (module docstring)."""
    from batchsd.job.outputs.claim import output_settings
    from batchsd.job.outputs.spec import SHARD_FORMATS

    settings = output_settings(out_dir) or {}
    report.output_format = str(settings.get("format") or "files")
    if report.output_format not in SHARD_FORMATS:
        return
    size = int(settings.get("shard_size") or 1)
    for t in report.shards:
        layout = RunLayout(out_dir, ShardSpec(t.index, report.shard_count, "status") if report.shard_count > 1 else None)
        t.dataset_shards = ceil(t.rows / size)
        t.dataset_shards_written = sum(layout.dataset_shard_marker(report.output_format, k, t.dataset_shards).is_file()
                                       for k in range(t.dataset_shards))
    report.overall.dataset_shards = sum(t.dataset_shards for t in report.shards)
    report.overall.dataset_shards_written = sum(t.dataset_shards_written for t in report.shards)


def _newest_mtime(folder: Path) -> float | None:
    try:
        return max((p.stat().st_mtime for p in folder.iterdir()), default=None)
    except OSError:
        return None


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
                  + (f", {report.shard_count} shards" if report.shard_count > 1 else "")
                  + (f" (the run's --limit {report.limit}: {report.beyond_limit} more manifest row(s) are not "
                     "in its job; run without --limit to make them)" if report.beyond_limit else ""))
    if report.shard_count > 1:
        table = Table(show_edge=False, pad_edge=False, box=None)
        datasets = o.dataset_shards is not None
        for col in ("shard", "rows", "ok", "failed", "missing", "state", "last write") + (("dataset shards",) * datasets):
            table.add_column(col, justify="right" if col in ("rows", "ok", "failed", "missing") else "left")
        for t in report.shards:
            style = "green" if t.state == "done" and not t.missing else ("yellow" if t.missing else None)
            cells = [f"{t.index}/{report.shard_count}", str(t.rows), str(t.ok), str(t.failed), str(t.missing),
                     t.state, _ago(t.last_write)]
            if datasets:
                cells.append(f"{t.dataset_shards_written}/{t.dataset_shards} written")
            table.add_row(*cells, style=style)
        console.print(table)
    console.print(f"overall: {o.ok} ok, {o.failed} failed, {o.missing} missing of {o.rows}"
                  + (f" ({100.0 * o.ok / o.rows:.1f}% ok)" if o.rows else ""))
    if o.dataset_shards is not None:
        console.print(f"--format {report.output_format}: {o.dataset_shards_written} of {o.dataset_shards} dataset "
                      "shard(s) written")
    if report.models:
        console.print("models: " + ", ".join(f"{escape(m)} ({n})" for m, n in report.models.items()))
    if o.missing:
        todo = [f"{t.index}" for t in report.shards if t.missing]
        if report.running:
            running = [str(t.index) for t in report.shards if t.state == "running"]
            idle = [str(t.index) for t in report.shards if t.missing and t.state != "running"]
            who = "a run is" if report.shard_count == 1 else f"shard(s) {', '.join(running[:20])} are"
            also = (f"; shard(s) {', '.join(idle[:20])}{' ...' if len(idle) > 20 else ''} have rows to make and no "
                    "run: start them (they resume)" if idle else "; check again later")
            console.print(f"[yellow]{o.missing} row(s) still to make: {who} in progress now (its lock is held)"
                          f"{also}[/yellow]")
        else:
            hint = (f"run shard(s) {', '.join(todo[:20])}{' ...' if len(todo) > 20 else ''} again"
                    if report.shard_count > 1 else "run the same command again")
            hint += " with --verify" if report.verified else ""
            console.print(f"[yellow]{o.missing} row(s) still to make: {hint} (they resume)[/yellow]")
    elif o.failed:
        console.print(f"[red]{o.failed} row(s) failed[/red]: their reasons are in the results' `error` column; "
                      "`batchsd run ... --retry-errors` makes them again")
    else:
        console.print("[green]every row of the limited job is done[/green]" if report.beyond_limit
                      else "[green]every row is done[/green]")
    if report.shard_count > 1:
        out = escape(report.out_dir)
        where = f"{out}/results.parquet (the whole job) and " if report.merged else ""
        console.print(f"table: {where}{out}/{RESULTS_PARTS_DIR}/*.parquet")
