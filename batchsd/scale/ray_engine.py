"""`batchsd run --engine ray`: the same job spread over a Ray cluster, one model per actor.

    pip install 'batchsd[ray]'
    batchsd run MANIFEST --engine ray --workers K [--model PATH] [--out DIR] [--batch-size N]

The driver (this process) reads and validates the manifest exactly as `batchsd run` does, reads
the journal and leaves out the rows already made (the same resume rule: params_hash, model,
files in place), then hands the rest to Ray Data:

    ray.data.from_items(rows, in batch-plan order)        one item per row: the pickled JobRow and
                                                          the reason it fails, if already known
      .map_batches(RowMaker, ActorPoolStrategy(size=K),   K actors; num_gpus=1 each on a cluster
                   batch_size=rows per call)              with GPUs, else num_cpus=1 each
      .iter_batches()                                     records stream back to the driver

`RowMaker` loads one Pipeline per actor (in __init__) and runs, per call, the same engine as
`batchsd run`: planner.plan_batches, worker.Worker (out-of-memory halving, per-row failures) and
writer.ResultWriter (PNG with A1111 metadata, latents, atomic renames into <out>/images and
<out>/latents). It owns no journal: it returns the records of the rows it wrote, and the driver
appends them to the one journal (<out>/.batchsd/parts) and compacts it into results.parquet. The
output folder is therefore exactly that of a one-process run (images/, latents/, results.parquet,
summary.json), and either engine resumes the other's work.

Requirements: --out, the manifest's init images and the model file on a filesystem every Ray node
sees (actors read and write there themselves). The driver calls ray.init(): that joins
$RAY_ADDRESS or a cluster started with `ray start`, else starts a local one; a driver that finds
Ray already initialized (a notebook, a test) uses it and leaves it running.

Failures: rows that raise are recorded as failed, as in `batchsd run`. Ray restarts an actor that
dies and retries its work (Ray Data's defaults); rows are deterministic, so an image written twice
is the same file. If the driver dies, rows whose images were written but whose records had not
reached the journal are made again by the next run. Ctrl-C stops dispatching, journals what came
back and compacts (exit 130).

Sharding does not apply: the Ray engine spreads the whole manifest itself (a shard is refused, and
the CLI does not read the launchers' environment for it).

Ray is imported only inside this module's functions; the core install does not need it.
"""
from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from batchsd.errors import BatchSDError
from batchsd.job.resume import adopt_records, decide
from batchsd.job.run import (SHARED_TEMP_AGE_S, RunOptions, RunSummary, UsageError, finish, out_dir_lock, read_job,
                     resolve_model, write_run_meta)
from batchsd.job.worker import DEFAULT_CPU_BATCH

RAY_EXTRA_HINT = "the Ray engine needs Ray: pip install 'batchsd[ray]' (or pip install 'ray[data]>=2.9')"
DEFAULT_ROWS_PER_CALL = 16   # rows an actor gets per call when --batch-size is not given


def import_ray():
    """`ray` or a UsageError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise UsageError(f"{RAY_EXTRA_HINT} ({e})") from None
    return ray


def model_identity(model: str) -> tuple[str, str | None]:
    """(name, sha256) that Pipeline.load(model) will report, without loading the weights."""
    if model == "tiny":
        return "tiny-random", None
    from batchsd.model.checkpoint import inspect_checkpoint

    path = Path(model)
    try:
        report = inspect_checkpoint(path)
    except BatchSDError as e:
        raise UsageError(str(e)) from None
    if report.get("loadable") is False:
        raise UsageError(f"model {model} cannot be loaded: {report.get('error')}")
    return (path.stem if path.is_file() else path.name), report["sha256"]


# ----------------------------------------------------------------------------- the actor

class _Collector:
    """Stands in for the Journal inside an actor: keeps the records ResultWriter would append."""

    def __init__(self):
        self.records: list[dict] = []

    def append(self, records):
        self.records.extend(records)

    def should_compact(self) -> bool:
        return False


@dataclass(frozen=True)
class MakerConfig:
    model: str
    model_name: str
    model_sha256: str | None
    device: str
    dtype: str
    low_memory: bool
    compile: str | None
    winograd: bool | None
    out_dir: str
    save_latents: bool
    batch_size: int | None
    schema: Any            # pyarrow.Schema of the records
    threads: int | None    # torch intra-op threads on the CPU


class RowMaker:
    """Ray Data callable class: one Pipeline per actor; each call makes a batch of rows (a pyarrow
    table with columns `job_row` (pickled JobRow) and `error`) and returns their result records."""

    def __init__(self, cfg: MakerConfig):
        import torch

        from batchsd.model.pipeline import Pipeline
        from batchsd.model.fast.runtime import tune_cpu_allocator

        if cfg.device in ("cpu", "auto") and not torch.cuda.is_available():
            tune_cpu_allocator()   # as runner.run does for a CPU job
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.pipe = Pipeline.load(cfg.model, device=cfg.device, dtype=cfg.dtype, low_memory=cfg.low_memory,
                                  compile=cfg.compile, winograd=cfg.winograd)
        if (self.pipe.name, self.pipe.sha256) != (cfg.model_name, cfg.model_sha256):
            raise RuntimeError(f"the model on this Ray node is {self.pipe.name} ({self.pipe.sha256}), but the driver "
                               f"planned the run for {cfg.model_name} ({cfg.model_sha256}): every node must see "
                               "the same model file")
        self.console = Console(stderr=True, highlight=False)
        self.batch_size: int | None = cfg.batch_size   # kept across calls once OOM halving lowered it

    def __call__(self, batch):
        from batchsd.job.planner import plan_batches
        from batchsd.job.results import records_to_table
        from batchsd.job.worker import Worker, default_batch_size, load_images, record
        from batchsd.job.writer import BatchResult, ResultWriter

        rows = [pickle.loads(b) for b in batch.column("job_row").to_pylist()]
        known_errors = batch.column("error").to_pylist()
        collector = _Collector()
        writer = ResultWriter(Path(self.cfg.out_dir), collector, model_name=self.pipe.name,
                              model_sha256=self.pipe.sha256, short_hash=self.pipe.short_hash,
                              save_latents=self.cfg.save_latents, temp_min_age_s=SHARED_TEMP_AGE_S)
        try:
            failing = [(r, e) for r, e in zip(rows, known_errors) if e]
            runnable = [r for r, e in zip(rows, known_errors) if not e]
            images, errors = load_images(runnable)
            failing += [(r, errors[r.id]) for r in runnable if r.id in errors]
            runnable = [r for r in runnable if r.id not in errors]
            if failing:
                writer.submit(BatchResult(records=[record(r) for r, _ in failing], images=[None] * len(failing),
                                          errors=[e for _, e in failing]))
            if runnable:
                if self.batch_size is None:
                    big = max(runnable, key=lambda r: r.width * r.height)
                    self.batch_size = default_batch_size(self.pipe, big.width, big.height)
                worker = Worker(self.pipe, self.batch_size, writer.submit, self.console)
                for planned in plan_batches(runnable, self.batch_size):
                    worker.run_rows(planned.rows, images)
                self.batch_size = worker.batch_size
        finally:
            writer.close()
        return records_to_table(collector.records, self.cfg.schema)


# ----------------------------------------------------------------------------- the driver

def run_ray(opts: RunOptions, *, workers: int = 1, console: Console | None = None, rich_bar: bool | None = None,
            rows_per_call: int | None = None, cpus_per_worker: float | None = None,
            address: str | None = None) -> RunSummary:
    """Run the job on Ray with `workers` actors (module docstring). Raises UsageError before anything
    is run; returns the summary (its exit_code as for `batchsd run`)."""
    from batchsd.job.planner import plan_batches
    from batchsd.job.progress import RunProgress
    from batchsd.job.results import Journal, clear_summary, extra_types_for, remove_stale_temps, results_schema

    console = console or Console(stderr=True)
    if opts.shard is not None and not opts.shard.is_whole:
        raise UsageError("the Ray engine spreads the rows over its workers itself: run it without a shard")
    if workers < 1:
        raise UsageError(f"--workers {workers}: use a whole number >= 1")
    if opts.batch_size is not None and opts.batch_size < 1:
        raise UsageError(f"--batch-size {opts.batch_size}: use a whole number >= 1")
    ray = import_ray()
    job = read_job(opts)
    out_dir = job.out_dir.resolve()
    summary = RunSummary(out_dir=job.out_dir, total=len(job.rows), results_path=job.layout.results_path)
    model = resolve_model(opts.model)
    if model != "tiny":
        model = str(Path(model).resolve())   # actors may run in another folder
    name, sha256 = model_identity(model)
    summary.model, summary.model_sha256, summary.batch_size = name, sha256, opts.batch_size
    out_dir.mkdir(parents=True, exist_ok=True)

    with out_dir_lock(out_dir):
        all_records = [r.to_record() for r in job.manifest.rows]
        schema = results_schema(extra_types_for(all_records, job.manifest.extra_columns))
        journal = Journal(out_dir, schema, [r.id for r in job.manifest.rows])
        clear_summary(out_dir)
        write_run_meta(opts, job, name, engine="ray")
        for folder in ("images", "latents"):   # actors leave younger temp files alone (shared folders)
            remove_stale_temps(out_dir / folder)
        prior = journal.read_prior()
        todo, summary.skipped, summary.previously_failed = decide(
            job.rows, prior, out_dir, model=name, model_sha256=sha256,
            save_latents=opts.save_latents, overwrite=opts.overwrite, retry_errors=opts.retry_errors)
        adopt_records(journal, job.rows, todo, prior)
        # batch-plan order, so that an actor's call holds rows that share UNet forwards
        failing = [r for r in todo if r.id in job.row_errors]
        planned = [r for b in plan_batches([r for r in todo if r.id not in job.row_errors],
                                           opts.batch_size or DEFAULT_CPU_BATCH) for r in b.rows]
        items = [{"job_row": pickle.dumps(r), "error": job.row_errors.get(r.id)} for r in failing + planned]

        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init(address=address, logging_level="warning", log_to_driver=True)
        t0 = time.monotonic()
        interrupted = None
        progress = RunProgress(len(todo), console, rich_bar=rich_bar)
        try:
            gpus = ray.cluster_resources().get("GPU", 0)
            use_gpu = gpus >= 1 and opts.device != "cpu"
            if opts.device.startswith("cuda") and not use_gpu:
                raise UsageError(f"--device {opts.device}: the Ray cluster has no GPUs; use --device cpu or auto")
            per_call = rows_per_call or (opts.batch_size * 4 if opts.batch_size else DEFAULT_ROWS_PER_CALL)
            console.print(f"{len(job.rows)} row(s): {len(todo)} to make, {summary.skipped} already done"
                          + (f", {summary.previously_failed} failed earlier (--retry-errors to retry)"
                             if summary.previously_failed else "")
                          + f"; Ray: {workers} worker(s) on {'GPU' if use_gpu else 'CPU'}, {per_call} rows per call;"
                          f" output {escape(str(out_dir))}/")
            if items:
                cpus = cpus_per_worker or (1 if not use_gpu else None)
                cfg = MakerConfig(model=model, model_name=name, model_sha256=sha256,
                                  device="cuda" if use_gpu else "cpu", dtype=opts.dtype, low_memory=opts.low_memory,
                                  compile=opts.compile, winograd=opts.winograd,
                                  out_dir=str(out_dir), save_latents=opts.save_latents, batch_size=opts.batch_size,
                                  schema=schema, threads=int(cpus) if cpus else None)
                _quiet_ray_data(ray)
                remote = {"num_gpus": 1} if use_gpu else {"num_cpus": cpus}
                if use_gpu and cpus_per_worker:
                    remote["num_cpus"] = cpus_per_worker
                results = ray.data.from_items(items).map_batches(
                    RowMaker, fn_constructor_kwargs={"cfg": cfg}, batch_size=per_call, batch_format="pyarrow",
                    compute=ray.data.ActorPoolStrategy(size=workers), **remote)
                with progress:
                    for table in results.iter_batches(batch_size=None, batch_format="pyarrow"):
                        records = table.to_pylist()
                        if not records:
                            continue
                        journal.append(records)
                        if journal.should_compact():
                            journal.compact()
                        n_ok = sum(r["status"] == "ok" for r in records)
                        summary.ok += n_ok
                        summary.failed += len(records) - n_ok
                        progress.update(n_ok, len(records) - n_ok)
        except KeyboardInterrupt:
            interrupted = "SIGINT"
        finally:
            try:
                journal.compact()
            finally:
                if started_ray:
                    ray.shutdown()
    summary.elapsed_s = time.monotonic() - t0
    summary.pending = len(todo) - summary.ok - summary.failed
    summary.interrupted_by = interrupted if summary.pending else None
    if summary.interrupted_by is None:
        finish(opts, job, summary)
    return summary


def _quiet_ray_data(ray) -> None:
    """Our own progress line instead of Ray Data's bars and plan logs."""
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    for attr, value in (("enable_progress_bars", False), ("print_on_execution_start", False),
                        ("enable_operator_progress_bars", False)):
        if hasattr(ctx, attr):
            setattr(ctx, attr, value)
