"""`batchsd run`: validated manifest rows -> images/, latents/, results.parquet. Resumable.

Three parts, img2dataset-style, each in its own module:
    reader  manifest.read_manifest + planner (sizes, batch plan), read by read_job here; init
            images are decoded one batch ahead in a helper thread (worker.load_images)
    worker  worker.Worker: Pipeline.generate per batch, out-of-memory halving, per-row failures;
            the batch size when --batch-size is not given (worker.default_batch_size)
    writer  writer.ResultWriter: PNG/npy/journal writes in a thread beside the model
This module holds the run's options and summary, model resolution, the output folder's lock, and
the loop that joins the three (`run`).

Resume (resume.py): a row is skipped when its latest record is "ok" for its current params_hash
and model and its files exist; changed rows are made again, "error" rows only with
--retry-errors, everything with --overwrite. An interrupted and resumed run equals an
uninterrupted one up to the floating-point rounding of another batch composition.

Signals: the first SIGINT/SIGTERM lets the batch in flight finish and be written, then stops:
queued results are flushed, results.parquet is compacted, and the exit status is 130 (SIGINT) or
143 (SIGTERM). A second signal drops the batch in flight (its rows stay undone) and stops the
same way. summary.json is written only by a run that got through every row (the done marker).

One run per output folder at a time: an flock on <out>/.batchsd/lock (released by the kernel
even on SIGKILL); a second run on the same --out exits 2.

Shards (--shard I/N or the launcher's environment, sharding.py): a shard runs only the rows with
shard_of(id, N) == I (after --limit) and writes only its own files (sharding.RunLayout): its
journal, lock, run.json and summary.json under <out>/.batchsd/shard-<I>-of-<N>/, its results in
<out>/results/part-<I>-of-<N>.parquet, and the images of its rows; so N shards run at once on a
shared filesystem without locking each other, and each resumes on its own. Resume reads every
journal in the folder; rows of this run whose latest record is in another journal (an earlier
unsharded run, or shards) are skipped and their records copied into this run's journal
(`resume.adopt_records`), so its results file covers all its rows. A shard that finishes and finds
every shard done writes <out>/results.parquet and <out>/summary.json for the whole job
(status.merge_shard_results). An unsharded run (no shard, or N = 1) keeps the layout above.

Exit status: 0 every row of the job is ok; 1 some rows failed (recorded in results.parquet, also
rows that failed in an earlier run and were not retried); 2 usage, model or manifest errors
(nothing run); 130/143 interrupted.
"""
from __future__ import annotations

import errno
import fcntl
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from batchsd.errors import BatchSDError, InputError
from batchsd.job.manifest import read_manifest
from batchsd.job.rows import JobRow, Manifest
from batchsd.job.results import (JOURNAL_DIR, RESULTS_FILE, Journal, clear_summary, extra_types_for, now_utc, read_prior,
                      results_schema, write_summary)
from batchsd.job.resume import adopt_records, decide
from batchsd.scale.sharding import RunLayout, ShardSpec, check_shard_count
from batchsd.job.worker import DEFAULT_CPU_BATCH, Worker, default_batch_size, load_images, record

MODEL_ENV = "BATCHSD_MODEL"
SHARED_TEMP_AGE_S = 3600.0   # temp files older than this in images/ are a killed run's (shards share the folder)
WEIGHT_SUFFIXES = (".safetensors", ".ckpt")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143


class UsageError(InputError):
    """Bad arguments, a model that cannot be found or loaded: nothing was run (exit 2)."""


class ManifestInvalid(UsageError):
    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        super().__init__(manifest.format_problems())


@dataclass(frozen=True)
class RunOptions:
    manifest: Path
    model: str | None = None
    out_dir: Path | None = None
    batch_size: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    save_latents: bool = False
    limit: int | None = None
    dry_run: bool = False
    overwrite: bool = False
    retry_errors: bool = False
    low_memory: bool = False
    compile: str | None = None       # torch.compile mode for the UNet (runtime.COMPILE_MODES), None: eager
    winograd: bool | None = None     # CPU Winograd convolutions (winograd.py); None: the Pipeline's default
    shard: ShardSpec | None = None   # make only this shard's rows (sharding.py); None or count 1: all rows


@dataclass
class RunSummary:
    out_dir: Path
    total: int = 0              # rows in this job (after --limit)
    ok: int = 0                 # made ok in this run
    failed: int = 0             # failed in this run
    skipped: int = 0            # already done (ok) before this run
    previously_failed: int = 0  # error rows from an earlier run, not retried
    pending: int = 0            # left undone (interrupted)
    elapsed_s: float = 0.0
    interrupted_by: str | None = None
    model: str | None = None
    model_sha256: str | None = None
    batch_size: int | None = None
    dry_run: bool = False
    shard: ShardSpec | None = None
    results_path: Path | None = None     # this run's results file (a shard's part, or results.parquet)
    merged: bool = False                 # a shard that completed the whole job wrote results.parquet
    compile_s: float = 0.0               # --compile: seconds spent compiling the UNet (first call per shape)
    winograd: bool = False               # the wide CPU convolutions ran as Winograd (--winograd; rounding differs)

    @property
    def images_per_s(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.interrupted_by == "SIGINT":
            return EXIT_SIGINT
        if self.interrupted_by is not None:
            return EXIT_SIGTERM
        return EXIT_FAILED if (self.failed or self.previously_failed) else EXIT_OK


# ----------------------------------------------------------------------------- model and paths

def _is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path / "unet").is_dir()


def _weight_candidates(folder: Path) -> list[Path]:
    """Checkpoints in weights/: the folder itself if it is a diffusers folder, else its
    .safetensors/.ckpt files and diffusers subfolders (README.md and the like are not)."""
    if _is_diffusers_folder(folder):
        return [folder]
    return [p for p in sorted(folder.iterdir())
            if (p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES) or (p.is_dir() and _is_diffusers_folder(p))]


def resolve_model(model: str | None, cwd: Path | None = None) -> str:
    """--model > $BATCHSD_MODEL > the one checkpoint in ./weights/ > UsageError saying where to put one."""
    if model:
        choice, source = model, "--model"
    elif os.environ.get(MODEL_ENV):
        choice, source = os.environ[MODEL_ENV], f"${MODEL_ENV}"
    else:
        weights = (cwd or Path.cwd()) / "weights"
        found = _weight_candidates(weights) if weights.is_dir() else []
        if len(found) == 1:
            return str(found[0])
        if len(found) > 1:
            listing = "\n".join(f"  {p}" for p in found)
            raise UsageError(f"{weights} holds {len(found)} checkpoints; choose one with --model:\n{listing}")
        raise UsageError(f"no model given and none found: put one SD 1.x checkpoint (.safetensors, .ckpt or a "
                         f"diffusers folder) in {weights}/, or pass --model PATH (or set ${MODEL_ENV}); "
                         "--model tiny runs a random tiny model (its images are noise) to try the tool")
    if choice == "tiny":
        return choice
    path = Path(choice).expanduser()
    if not path.exists():
        raise UsageError(f"model {choice!r} (from {source}) does not exist: give the path of a .safetensors/.ckpt "
                         "file or a diffusers folder, or --model tiny")
    return str(path)


def default_out_dir(manifest: Path) -> Path:
    return Path("outputs") / manifest.stem


@contextmanager
def out_dir_lock(out_dir: Path, lock_path: Path | None = None):
    """One run per output folder (or per shard: `lock_path` is the shard's own lock) at a time:
    flock on <out>/.batchsd/lock, released on exit, even SIGKILL. A filesystem without flock
    (some Lustre mounts) runs unlocked."""
    lock_path = Path(lock_path) if lock_path is not None else out_dir / JOURNAL_DIR / "lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            shard = lock_path.parent.name if lock_path.parent.name.startswith("shard-") else None
            raise UsageError(f"another batchsd run is writing to {out_dir}" + (f" as {shard}" if shard else "")
                             + "; wait for it or use another --out") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
        yield
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- reading the job

@dataclass
class Job:
    manifest: Manifest
    rows: list[JobRow]                       # this run's rows (after --limit, this shard's), sizes resolved
    row_errors: dict[str, str]               # id -> why the row cannot be made (unreadable init image)
    out_dir: Path
    layout: RunLayout | None = None          # the files this run owns (a shard's, or the whole run's)
    job_ids: list[str] | None = None         # every shard's rows after --limit, in manifest order

    def __post_init__(self):
        if self.layout is None:
            self.layout = RunLayout(self.out_dir)

    @property
    def shard(self) -> ShardSpec | None:
        return self.layout.shard if self.layout.sharded else None

    def journal_ids(self) -> list[str]:
        """The manifest ids this run's results file covers, in manifest order."""
        shard = self.shard
        return [r.id for r in self.manifest.rows if shard is None or shard.owns(r.id)]


def read_job(opts: RunOptions) -> Job:
    from batchsd.job.planner import resolve_image_sizes

    manifest = read_manifest(opts.manifest)
    if manifest.problems:
        raise ManifestInvalid(manifest)
    rows = manifest.rows[: opts.limit] if opts.limit is not None else list(manifest.rows)
    job_ids = [r.id for r in rows]
    shard = opts.shard if opts.shard is not None and not opts.shard.is_whole else None
    if shard is not None:
        rows = [r for r in rows if shard.owns(r.id)]
    resolved, failures = resolve_image_sizes(rows)
    by_index = {r.index: r for r in resolved}
    rows = [by_index.get(r.index, r) for r in rows]  # failing rows stay in the job, with their reason
    row_errors = {r.id: str(failures[r.index]) for r in rows if r.index in failures}
    out_dir = Path(opts.out_dir) if opts.out_dir is not None else default_out_dir(Path(opts.manifest))
    return Job(manifest, rows, row_errors, out_dir, RunLayout(out_dir, shard), job_ids)


# ----------------------------------------------------------------------------- signals

class StopRequested:
    """Turns the first SIGINT/SIGTERM into a flag; the second raises KeyboardInterrupt (drop the batch)."""

    def __init__(self, console: Console):
        self.console = console
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            self.console.print(f"[yellow]{name}: finishing the batch in flight, then stopping "
                               "(send it again to drop that batch)[/yellow]")
        else:
            raise KeyboardInterrupt

    def __bool__(self) -> bool:
        return self.signal_name is not None


# ----------------------------------------------------------------------------- run

def _dry_run(opts: RunOptions, job: Job, plan_batches, console: Console) -> None:
    """Print what `run` would do: rows, failures known now, the batch plan. Loads no model, writes nothing."""
    runnable = [r for r in job.rows if r.id not in job.row_errors]
    note = ""
    if not opts.overwrite:
        prior = read_prior(job.out_dir, job.layout.resume_parts_dirs())
        done = [r for r in runnable if (rec := prior.get(r.id)) is not None and rec.params_hash == r.params_hash()
                and (rec.status == "ok" or not opts.retry_errors)]
        if done:
            done_ids = {r.id for r in done}
            runnable = [r for r in runnable if r.id not in done_ids]
            note = f"; {len(done)} row(s) already made with these parameters are left out (if the model is the same)"
    size = opts.batch_size or DEFAULT_CPU_BATCH
    shard_note = f" ({job.shard})" if job.shard else ""
    console.print(f"dry run: {len(job.rows)} row(s) from {escape(str(opts.manifest))}{escape(shard_note)}, "
                  f"output to {escape(str(job.out_dir))}/, no model loaded")
    for rid, why in job.row_errors.items():
        console.print(f"[red]row {escape(repr(rid))} would fail:[/red] {escape(why)}")
    from batchsd.job.progress import print_plan

    print_plan(console, plan_batches(runnable, size), size, note)
    if opts.batch_size is None:
        console.print(f"(batch size: {DEFAULT_CPU_BATCH} on the CPU; on CUDA it is chosen from free memory)")


def run(opts: RunOptions, console: Console | None = None, *, rich_bar: bool | None = None,
        out_console: Console | None = None, pipe=None) -> RunSummary:
    """Run the job. Raises UsageError (exit 2) before anything is run; returns the summary otherwise.
    `console` takes progress and log lines, `out_console` the dry-run plan. `pipe`: an already
    loaded Pipeline to run the job with (Python API, benchmarks); opts.model/device/dtype then go unused."""
    from batchsd.job.planner import plan_batches

    console = console or Console(stderr=True)
    if opts.batch_size is not None and opts.batch_size < 1:
        raise UsageError(f"--batch-size {opts.batch_size}: use a whole number >= 1")
    if opts.limit is not None and opts.limit < 0:
        raise UsageError(f"--limit {opts.limit}: use a whole number >= 0")
    job = read_job(opts)
    out_dir = job.out_dir
    summary = RunSummary(out_dir=out_dir, total=len(job.rows), dry_run=opts.dry_run, shard=job.shard,
                         results_path=job.layout.results_path)

    if opts.dry_run:
        _dry_run(opts, job, plan_batches, out_console or console)
        summary.pending = len(job.rows)
        return summary

    from batchsd.model.devices import resolve_device
    from batchsd.model.pipeline import Pipeline
    from batchsd.model.fast.runtime import tune_cpu_allocator

    device = resolve_device(opts.device) if pipe is None else pipe.device  # InputError (exit 2) before loading
    if device.type == "cpu":
        tune_cpu_allocator()   # a batch-job process: freed memory kept for reuse, no page faults per op
    model = resolve_model(opts.model) if pipe is None else pipe.name
    if job.shard is not None:
        check_shard_count(out_dir, job.shard)
    out_dir.mkdir(parents=True, exist_ok=True)
    with out_dir_lock(out_dir, job.layout.lock_path):
        if job.shard is not None:
            console.print(f"{escape(str(job.shard))}: {len(job.rows)} of the job's {len(job.job_ids)} row(s)")
        if pipe is None:
            console.print(f"loading model {escape(model)} ...")
            try:
                pipe = Pipeline.load(model, device=opts.device, dtype=opts.dtype, low_memory=opts.low_memory,
                                     compile=opts.compile, winograd=opts.winograd)
            except BatchSDError as e:
                raise UsageError(str(e)) from None
            except OSError as e:
                raise UsageError(f"cannot read model {model}: {e}") from None
        summary.model, summary.model_sha256 = pipe.name, pipe.sha256
        hash_note = f", hash {pipe.short_hash}" if pipe.short_hash else ""
        console.print(f"model {escape(pipe.name)}{hash_note} on {pipe.device} ({str(pipe.dtype).removeprefix('torch.')})")
        if pipe.sha256 is None:
            console.print("[bold yellow]model 'tiny' has random weights: its images are noise. "
                          "It is for trying the tool and for tests; pass a real SD 1.x checkpoint for pictures.[/bold yellow]")
        return _run_loaded(opts, job, pipe, console, summary, rich_bar, plan_batches)


def _run_loaded(opts: RunOptions, job: Job, pipe, console: Console, summary: RunSummary,
                rich_bar: bool | None, plan_batches) -> RunSummary:
    from batchsd.job.progress import RunProgress
    from batchsd.job.writer import BatchResult, ResultWriter

    out_dir, layout = job.out_dir, job.layout
    all_records = [r.to_record() for r in job.manifest.rows]
    schema = results_schema(extra_types_for(all_records, job.manifest.extra_columns))
    journal = Journal(out_dir, schema, job.journal_ids(), parts_dir=layout.parts_dir,
                      results_path=layout.results_path)
    clear_summary(out_dir, layout.summary_path)  # its presence means "the last run finished"
    if job.shard is not None:
        clear_summary(out_dir)                   # the merged one: the whole job is not known to be done now
    write_run_meta(opts, job, pipe.name, engine="local")
    prior = read_prior(out_dir, layout.resume_parts_dirs())   # rows any run made count (see RunLayout)
    todo, summary.skipped, summary.previously_failed = decide(
        job.rows, prior, out_dir, model=pipe.name, model_sha256=pipe.sha256, save_latents=opts.save_latents,
        overwrite=opts.overwrite, retry_errors=opts.retry_errors)
    adopt_records(journal, job.rows, todo, prior)
    failing_now = [r for r in todo if r.id in job.row_errors]
    runnable = [r for r in todo if r.id not in job.row_errors]
    if runnable:
        big = max(runnable, key=lambda r: r.width * r.height)   # sizes are resolved by now
        batch_size = opts.batch_size or default_batch_size(pipe, big.width, big.height)
    else:
        batch_size = opts.batch_size or DEFAULT_CPU_BATCH
    summary.batch_size = batch_size
    batches = plan_batches(runnable, batch_size)
    console.print(f"{len(job.rows)} row(s): {len(todo)} to make, {summary.skipped} already done"
                  + (f", {summary.previously_failed} failed earlier (--retry-errors to retry)"
                     if summary.previously_failed else "")
                  + f"; {len(batches)} batch(es) of at most {batch_size}; output {escape(str(out_dir))}/")

    t0 = time.monotonic()
    progress = RunProgress(len(todo), console, rich_bar=rich_bar)
    writer = ResultWriter(out_dir, journal, model_name=pipe.name, model_sha256=pipe.sha256,
                          short_hash=pipe.short_hash, save_latents=opts.save_latents, on_written=progress.update,
                          temp_min_age_s=SHARED_TEMP_AGE_S if job.shard is not None else 0.0)
    worker = Worker(pipe, batch_size, writer.submit, console)
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchsd-reader")

    def prefetch(batch) -> Future:
        return reader.submit(load_images, batch.rows)

    stop = StopRequested(console)
    # signals stay handled through the final flush (a second one raises KeyboardInterrupt); the
    # progress display lasts until the writer has written its last batch
    with stop, progress:
        try:
            if failing_now:
                writer.submit(BatchResult(records=[record(r) for r in failing_now], images=[None] * len(failing_now),
                                          errors=[job.row_errors[r.id] for r in failing_now]))
            pending = prefetch(batches[0]) if batches else None
            for i, batch in enumerate(batches):
                if stop:
                    break
                images, errors = pending.result()
                pending = prefetch(batches[i + 1]) if i + 1 < len(batches) else None
                bad = [r for r in batch.rows if r.id in errors]
                if bad:
                    writer.submit(BatchResult(records=[record(r) for r in bad], images=[None] * len(bad),
                                              errors=[errors[r.id] for r in bad]))
                worker.run_rows([r for r in batch.rows if r.id not in errors], images)
        except KeyboardInterrupt:  # second signal: the batch in flight is dropped
            stop.signal_name = stop.signal_name or "SIGINT"
        finally:
            reader.shutdown(wait=True, cancel_futures=True)
            try:
                writer.close()
            finally:
                journal.compact()
    summary.elapsed_s = time.monotonic() - t0
    summary.compile_s = sum(getattr(pipe.unet, "compile_seconds", {}).values())
    summary.winograd = bool(getattr(pipe, "winograd", False))
    summary.ok, summary.failed = writer.written_ok, writer.written_failed
    summary.pending = len(todo) - summary.ok - summary.failed
    summary.interrupted_by = stop.signal_name if (stop.signal_name and summary.pending) else None
    if stop.signal_name and not summary.pending:
        summary.interrupted_by = None  # the signal came after the last batch: the run is complete
    if summary.interrupted_by is None:
        finish(opts, job, summary)
    return summary


def finish(opts: RunOptions, job: Job, summary: RunSummary) -> None:
    """Write the done marker; a shard then writes results.parquet and summary.json for the whole
    job if every shard is done (status.merge_shard_results)."""
    write_summary(job.out_dir, summary_record(opts, summary), job.layout.summary_path)
    if job.shard is not None:
        from batchsd.job.status import merge_shard_results

        summary.merged = merge_shard_results(job.out_dir, job.shard.count, [r.id for r in job.manifest.rows],
                                             job.job_ids)


def write_run_meta(opts: RunOptions, job: Job, model: str | None, engine: str) -> None:
    """<journal>/run.json: what `batchsd status` needs to know about this run (manifest, limit, shard)."""
    import socket

    from batchsd.job.status import write_run_meta as write

    shard = job.shard
    write(job.layout.meta_path, {
        "manifest": str(Path(opts.manifest).resolve()), "limit": opts.limit, "out_dir": str(job.out_dir),
        "shard_index": shard.index if shard else None, "shard_count": shard.count if shard else 1,
        "shard_source": shard.source if shard else None, "model": model, "engine": engine,
        "rows": len(job.rows), "job_rows": len(job.job_ids or job.rows),
        "host": socket.gethostname(), "pid": os.getpid(), "started_at": now_utc().isoformat(),
    })


def summary_record(opts: RunOptions, s: RunSummary) -> dict:
    return {
        "complete": s.interrupted_by is None, "manifest": str(opts.manifest), "out_dir": str(s.out_dir),
        "results": str(s.results_path or Path(s.out_dir) / RESULTS_FILE), "model": s.model, "model_sha256": s.model_sha256,
        "shard_index": s.shard.index if s.shard else None, "shard_count": s.shard.count if s.shard else 1,
        "rows": s.total, "ok": s.ok, "failed": s.failed, "skipped": s.skipped,
        "previously_failed": s.previously_failed, "pending": s.pending, "batch_size": s.batch_size,
        "elapsed_s": round(s.elapsed_s, 3), "images_per_s": round(s.images_per_s, 4),
        "compile_s": round(s.compile_s, 3), "winograd": s.winograd,
        "finished_at": now_utc().isoformat(), "exit_code": s.exit_code,
    }
