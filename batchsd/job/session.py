"""One run of a job in its output folder, whichever engine makes the rows.

The session owns everything a run does around making images, so that an engine (the local loop in
run.py, the Ray engine in batchsd.scale) only decides how batches reach a Pipeline:

    session = RunSession(opts, job, console, engine="local")
    with session.locked():                    # the layout's lock; the journal compacted on any exit
        session.start(made_with)              # journal, run.json, resume decision, adopted records
                                              # (made_with: each row's model and numerics, RowModels)
        ... the engine makes session.runnable, reporting each durable batch via session.count
            (local: the ResultWriter appends to session.journal) or session.journal_records (Ray) ...
        return session.finish(interrupted_by)  # compaction, then summary.json last; shards merge

Write order, the invariant resume relies on: an image is renamed into place before the journal
part that records it; the results table is rewritten from the journal; summary.json (the done
marker) is written last, only by a run that got through every row.
"""
from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from batchsd.job.atomic import remove_stale_temps
from batchsd.job.journal import Journal, read_prior
from batchsd.job.layout import RunLayout, check_plain_folders, check_shard_count, job_summary_path
from batchsd.job.lock import is_locked, out_dir_lock
from batchsd.job.options import RunOptions, RunSummary, UsageError, summary_record
from batchsd.job.outputs.claim import claim_output
from batchsd.job.present import existing_files, stray_images
from batchsd.job.progress import RunProgress
from batchsd.job.reader import Job
from batchsd.job.model_choice import prediction_type_override
from batchsd.job.resume import RowModels, adopt_records, decide, row_states
from batchsd.job.rows import JobRow
from batchsd.job.run_meta import clear_summary, read_run_metas, write_run_meta, write_summary
from batchsd.job.schema import now_utc, results_schema
from batchsd.job.shards import ShardSpec

# Temp files younger than this in images/ and latents/ may be another live process's (shards and
# Ray actors share those folders); older ones are a killed run's and are removed.
SHARED_TEMP_AGE_S = 3600.0


class RunSession:
    def __init__(self, opts: RunOptions, job: Job, console: Console, *, engine: str):
        self.opts, self.job, self.console, self.engine = opts, job, console, engine
        self.layout = job.layout
        self.summary = RunSummary(out_dir=job.out_dir, total=len(job.rows), shard=job.shard,
                                  results_path=job.layout.results_path, batch_size=opts.batch_size,
                                  beyond_limit=job.beyond_limit)
        self.journal: Journal | None = None
        self.todo: list[JobRow] = []
        self.failing: list[tuple[JobRow, str]] = []   # rows known to fail before any model call, with why
        self.runnable: list[JobRow] = []
        self.progress: RunProgress | None = None
        self._t0: float | None = None
        self._finished = False
        self.made_with: RowModels | None = None

    @property
    def shared_folders(self) -> bool:
        """Whether other live processes may write into images/ and latents/ now."""
        return self.job.shard is not None or self.engine != "local"

    @contextmanager
    def locked(self):
        """The layout's lock for the block; on any exit the journal is compacted into the results
        table (a clean interrupt or a failure keeps the table current)."""
        out_dir = self.job.out_dir
        if self.job.shard is not None:
            check_shard_count(out_dir, self.job.shard)
        check_plain_folders(self.layout)
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"--out {out_dir} is a file, not a folder; nothing was run: choose a folder with --out")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create --out {out_dir}: {e.strerror or e}; nothing was run: choose a "
                             "writable folder with --out") from None
        with out_dir_lock(out_dir, self.layout.lock_path):
            try:
                yield self
            finally:
                if self.journal is not None and not self._finished:
                    self.journal.compact()

    def start(self, made_with: RowModels) -> None:
        """Open the journal, record the run, decide what to make (resume.py: rows made by another
        model than theirs, or with other numerics, are made again) and adopt the records of rows other
        journals of the folder made. Call inside `locked()`."""
        job, opts, layout = self.job, self.opts, self.layout
        self._check_same_job()
        claim_output(layout, opts.output, [r.id for r in job.rows])   # one output format per --out
        models = [made_with.by_key[k][0] for k in made_with.keys_in_order(job.rows)]
        if len(models) == 1:
            self.summary.model, self.summary.model_sha256 = models[0].name, models[0].sha256
        self.summary.models = [{"name": m.name, "sha256": m.sha256} for m in models]
        schema = results_schema(job.manifest.extra_types)
        self.journal = Journal(job.out_dir, schema, job.journal_ids(), parts_dir=layout.parts_dir,
                               results_path=layout.results_path, extras=job.manifest.extras)
        for quarantined in self.journal.quarantined:      # files in the journal folder that are not ours
            self.console.print(f"[yellow]warning:[/yellow] {escape(str(quarantined))}")
        if opts.output.format in ("files", "imagefolder"):   # loose images: one file per row
            folder = layout.output_dir(opts.output.format)
            if stray := stray_images(folder, opts.output.suffix, (r.id for r in job.manifest.rows)):
                shown = ", ".join(stray[:3]) + (" ..." if len(stray) > 3 else "")
                self.console.print(f"[yellow]warning:[/yellow] {escape(str(folder))} holds {len(stray)} image(s) that "
                                   f"no row of the manifest names ({escape(shown)}): rows removed or renamed since "
                                   "they were made, which a loader reading the folder takes too; move them away if "
                                   "the dataset must be the manifest's rows only")
        for path, why in self.journal.unreadable:   # damaged on disk: skipped, its rows made again
            message = f"journal part {path} cannot be read ({why}): the rows it recorded are made again (move the file away to stop this warning)"
            self.console.print(f"[yellow]warning:[/yellow] {escape(message)}")
        clear_summary(layout.summary_path)        # its presence means "the last run finished"
        if job.shard is not None:
            clear_summary(job_summary_path(job.out_dir))   # the whole job is not known to be done now
        self.made_with = made_with
        for key in made_with.keys_in_order(job.rows) if opts.prediction_type else ():
            if key is not None and (note := prediction_type_override(key, opts.prediction_type)):
                self.console.print(f"[yellow]warning:[/yellow] {escape(note)}")
        self._write_run_meta(made_with)
        min_age = SHARED_TEMP_AGE_S if self.shared_folders else 0.0
        for folder in (layout.images_dir, layout.latents_dir):
            remove_stale_temps(folder, min_age_s=min_age)
        prior = read_prior(job.out_dir, layout.resume_parts_dirs())   # rows any run made count
        self.todo, self.summary.skipped, self.summary.previously_failed = decide(
            job.rows, prior, job.out_dir, made_with=made_with, save_latents=opts.save_latents,
            overwrite=opts.overwrite, retry_errors=opts.retry_errors, verify=opts.verify)
        self._keep_rows_whose_init_image_went(prior)
        adopt_records(self.journal, job.rows, self.todo, prior)
        self.failing = [(r, job.row_errors[r.id]) for r in self.todo if r.id in job.row_errors]
        self.runnable = [r for r in self.todo if r.id not in job.row_errors]

    def _keep_rows_whose_init_image_went(self, prior: dict) -> None:
        """A row made earlier whose init image cannot be read now (moved, deleted, a share that is
        down) cannot be checked against it, nor made again: its ok record and image are kept (counted
        as skipped, with a warning) rather than replaced by an error record, which in a shard format
        would take the image out of its shard. --overwrite fails them as any unreadable row."""
        job = self.job
        if self.opts.overwrite:
            return
        candidates = [r for r in self.todo if r.id in job.row_errors and (rec := prior.get(r.id)) is not None
                      and rec.status == "ok" and rec.image_path]
        present = existing_files(job.out_dir, [prior[r.id].image_path for r in candidates]) if candidates else set()
        kept = {r.id for r in candidates if prior[r.id].image_path in present}
        if not kept:
            return
        self.todo = [r for r in self.todo if r.id not in kept]
        self.summary.skipped += len(kept)
        first = next(r for r in candidates if r.id in kept)
        self.console.print(f"[yellow]warning:[/yellow] {len(kept)} row(s) made earlier have an init image that cannot "
                           f"be read now (e.g. {escape(first.id)}: {escape(job.row_errors[first.id])}); their images are "
                           "kept as made, unchecked: restore the files to let resume check them")

    def _check_same_job(self) -> None:
        """An output folder holds one manifest's job: refuse one that holds another's (two
        `prompts.csv` in different folders share the default --out), unless --reuse-out."""
        if self.opts.reuse_out:
            return
        mine = Path(self.opts.manifest).resolve()
        for meta in read_run_metas(self.job.out_dir):
            other = meta.get("manifest")
            if isinstance(other, str) and other and Path(other) != mine:
                raise UsageError(f"{self.job.out_dir} holds the job of another manifest, {other}; this run is {mine}. "
                                 "Give this job its own --out, or pass --reuse-out to make this folder hold it "
                                 "(rows with the same id are then shared between the two)")

    def _write_run_meta(self, made_with: RowModels) -> None:
        """run.json. `model`, `model_sha256` and the numerics are the run's model's (the first one used
        when every row names its own); `models` lists every model the rows use, by key
        (RowModels.key: what was loaded), which `batchsd status` compares rows with."""
        opts, job, shard = self.opts, self.job, self.job.shard
        order = made_with.keys_in_order(job.rows)
        first = made_with.default_key if made_with.default_key in made_with.by_key else (order or [None])[0]
        model, numerics = made_with.by_key.get(first, (None, None))
        write_run_meta(self.layout, {
            "manifest": str(Path(opts.manifest).resolve()), "limit": opts.limit, "out_dir": str(job.out_dir),
            "manifest_options": opts.manifest_options.to_json(),   # --map, --wildcards: status reads the same rows
            "shard_index": shard.index if shard else None, "shard_count": shard.count if shard else 1,
            "shard_source": shard.source if shard else None, "model": model.name if model else None,
            "model_sha256": model.sha256 if model else None, "default_model": made_with.default_key,
            "models": {key: {"name": m.name, "sha256": m.sha256, "prediction_type": m.prediction_type}
                       for key, (m, _) in made_with.by_key.items() if m is not None and key is not None},
            "save_latents": opts.save_latents, "engine": self.engine, **(numerics.columns() if numerics else {}),
            "rows": len(job.rows), "job_rows": len(job.job_ids or job.rows),
            "host": socket.gethostname(), "pid": os.getpid(), "started_at": now_utc().isoformat(),
        })

    def announce(self, how: str) -> None:
        """The run's opening line: rows to make, done and failed earlier, how they will be made."""
        s = self.summary
        self.console.print(f"{len(self.job.rows)} row(s): {len(self.todo)} to make, {s.skipped} already done"
                           + (f", {s.previously_failed} failed earlier (--retry-errors to retry)"
                              if s.previously_failed else "")
                           + f"; {how}; output {escape(str(self.job.out_dir))}/")
        if self.made_with is not None:
            numerics = dict.fromkeys(str(n) for _, n in self.made_with.by_key.values() if n is not None)
            if numerics:
                self.console.print(f"numerics: {escape('; '.join(numerics))} (recorded with every row; resume "
                                   "remakes rows made with other numerics)")

    def start_progress(self, rich_bar: bool | None) -> RunProgress:
        """The progress display (use it as a context manager); the run's clock starts now."""
        self.progress = RunProgress(len(self.todo), self.console, rich_bar=rich_bar)
        self._t0 = time.monotonic()
        return self.progress

    def count(self, n_ok: int, n_failed: int) -> None:
        """A batch's records are durable in the journal (called by the thread that wrote them)."""
        self.summary.ok += n_ok
        self.summary.failed += n_failed
        if self.progress is not None:
            self.progress.update(n_ok, n_failed)

    def journal_records(self, records: list[dict]) -> None:
        """Make records written elsewhere (Ray actors) durable here, then count them."""
        if not records:
            return
        self.journal.append(records)
        if self.journal.should_compact():
            self.journal.compact()
        n_ok = sum(r["status"] == "ok" for r in records)
        self.count(n_ok, len(records) - n_ok)

    def finish(self, interrupted_by: str | None = None) -> RunSummary:
        """Compact the journal, then write the done marker if every row was got through (a signal
        that came after the last batch does not count as an interruption; rows of a model that did
        not load were not); a shard that completes the job merges the shards' results."""
        s = self.summary
        s.elapsed_s = time.monotonic() - self._t0 if self._t0 is not None else 0.0
        s.pending = len(self.todo) - s.ok - s.failed
        s.interrupted_by = interrupted_by if (interrupted_by and s.pending) else None
        self.journal.compact()
        self._finished = True
        if s.pending == 0:
            record = summary_record(self.opts, s)
            write_summary(self.layout.summary_path, record)
            if self.job.shard is not None:
                s.merged = self._merge(record)
        return s

    def _merge(self, record: dict) -> bool:
        """The whole job's results and done marker, when every row of it is done (merge.py)."""
        from batchsd.job.merge import merge_job_results

        job = self.job
        others = [RunLayout(job.out_dir, ShardSpec(i, job.shard.count, "merge")) for i in range(job.shard.count)
                  if i != job.shard.index]
        if any(is_locked(lay.lock_path) for lay in others):
            return False        # another shard is running (it may be remaking rows): it merges when it ends
        prior = read_prior(job.out_dir)
        if any(rid not in prior for rid in job.job_ids):
            return False        # rows no run has made yet (other shards at work): no need to read more
        rows = job.whole_job_rows()
        made_with = self.made_with.models_only() if self.made_with is not None else None
        states = row_states(rows, prior, job.out_dir, made_with=made_with, save_latents=self.opts.save_latents)
        why_not = merge_job_results(job.out_dir, job.shard.count, rows, states, prior, schema=self.journal.schema,
                                    extras=job.manifest.extras, summary=record,
                                    beyond_limit_ids=[r.id for r in job.manifest.rows[len(job.job_ids):]])
        return why_not is None   # else `batchsd status` says which shards have rows to make
