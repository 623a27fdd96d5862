"""`batchsd run --engine ray`: the same job spread over a Ray cluster, one model per actor.

    pip install 'batchsd[ray]'
    batchsd run MANIFEST --engine ray --workers K [--model PATH] [--out DIR] [--batch-size N]

The driver (this process) reads and validates the manifest exactly as `batchsd run` does, reads
the journal and leaves out the rows already made (the same resume rule: params_hash, model,
numerics, files in place), then hands the rest to Ray Data:

    ray.data.from_items(rows, in batch-plan order)        one item per row: the pickled JobRow and
                                                          the reason it fails, if already known
      .map_batches(RowMaker, ActorPoolStrategy(size=K),   K actors; num_gpus=1 each on a cluster
                   batch_size=rows per call)              with GPUs, else num_cpus=1 each
      .iter_batches()                                     records stream back to the driver

The driver's run is a job.session.RunSession, as for the local engine (lock, journal, resume
decision, progress, done marker); this module only decides how batches reach a Pipeline.
`RowMaker` loads one Pipeline per actor (in __init__) and runs, per call, the same parts as
`batchsd run`: plan.plan_batches, worker.Worker (out-of-memory halving, per-row failures) and
writer.ResultWriter (the output writer's atomic files). It owns no journal: it returns the records
of the rows it wrote, and the driver makes them durable in the session's journal. The output
folder is therefore exactly that of a one-process run, and either engine resumes the other's work.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from batchsd.errors import BatchSDError
from batchsd.job.model_choice import row_models, run_model_for, with_model_defaults
from batchsd.job.options import RunOptions, RunSummary, UsageError
from batchsd.job.reader import read_job, warning_lines
from batchsd.job.resume import ModelIdentity, Numerics, loaded_mismatch
from batchsd.job.session import RunSession

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
    model: str             # a model_key: what Pipeline.load is given
    identity: ModelIdentity  # what the driver planned the resume decision with, as `numerics`
    device: str
    dtype: str
    low_memory: bool | None
    compile: str | None
    winograd: bool | None
    fused_attention: bool | None
    fused_epilogues: bool | None
    prediction_type: str | None
    exact: bool | None     # as asked (None: the device's default)
    numerics: Numerics     # what the driver planned the resume decision with
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

        from batchsd.model.fast.allocator import tune_cpu_allocator
        from batchsd.model.pipeline import Pipeline

        if cfg.device in ("cpu", "auto") and not torch.cuda.is_available():
            tune_cpu_allocator()   # as the local engine does for a CPU job
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.pipe = Pipeline.load(cfg.model, device=cfg.device, dtype=cfg.dtype, low_memory=cfg.low_memory,
                                  compile=cfg.compile, winograd=cfg.winograd, prediction_type=cfg.prediction_type,
                                  exact=cfg.exact, fused_attention=cfg.fused_attention,
                                  fused_epilogues=cfg.fused_epilogues)
        if why := loaded_mismatch(self.pipe, cfg.identity, cfg.numerics):
            raise RuntimeError(f"on this Ray node, {why}: every node must see the same model file and have the "
                               "same torch version and device type")
        self.console = Console(stderr=True, highlight=False, emoji=False)
        self.batch_size: int | None = cfg.batch_size   # kept across calls once OOM halving lowered it

    def __call__(self, batch):
        from batchsd.job.init_images import load_images
        from batchsd.job.plan import plan_batches
        from batchsd.job.schema import records_to_table
        from batchsd.job.worker import Worker, batch_size_for, failed_rows
        from batchsd.job.writer import ResultWriter

        rows = [pickle.loads(b) for b in batch.column("job_row").to_pylist()]
        known_errors = batch.column("error").to_pylist()
        collector = _Collector()
        writer = ResultWriter(Path(self.cfg.out_dir), collector, save_latents=self.cfg.save_latents)
        try:
            failing = [(r, e) for r, e in zip(rows, known_errors) if e]
            runnable = [r for r, e in zip(rows, known_errors) if not e]
            images, errors = load_images(runnable)
            failing += [(r, errors[r.id]) for r in runnable if r.id in errors]
            runnable = [r for r in runnable if r.id not in errors]
            if failing:
                writer.submit(failed_rows(failing, lambda row: self.cfg.identity))   # every row of a call is this model's
            if runnable:
                self.batch_size = batch_size_for(self.batch_size, self.pipe, runnable)
                worker = Worker(self.pipe, self.batch_size, writer.submit, self.console)
                planned = plan_batches(runnable, self.batch_size)
                for i, batch_rows in enumerate(b.rows for b in planned):
                    worker.encode_ahead(batch_rows, (planned[j].rows for j in range(i + 1, len(planned))))
                    worker.run_rows(batch_rows, images)
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
    from batchsd.job.plan import plan_batches
    from batchsd.job.worker import batch_size_for

    console = console or Console(stderr=True, emoji=False)
    if opts.shard is not None and not opts.shard.is_whole:
        raise UsageError("the Ray engine spreads the rows over its workers itself: run it without a shard")
    if workers < 1:
        raise UsageError(f"--workers {workers}: use a whole number >= 1")
    ray = import_ray()
    opts = with_model_defaults(opts)   # unsized rows at their model family's size
    job = read_job(opts)
    for line in warning_lines(job.manifest):
        console.print(line, style="yellow", markup=False)
    run_model = run_model_for(opts, job.rows)   # model keys are absolute paths: actors may run in another folder
    session = RunSession(opts, job, console, engine="ray")
    interrupted = None
    with session.locked():
        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init(address=address, logging_level="warning", log_to_driver=True)
        try:
            gpus = ray.cluster_resources().get("GPU", 0)
            use_gpu = gpus >= 1 and opts.device != "cpu"
            if opts.device.startswith("cuda") and not use_gpu:
                raise UsageError(f"--device {opts.device}: the Ray cluster has no GPUs; use --device cpu or auto")
            # the numerics the actors' pipelines will have (each actor checks its own against them)
            def planned(prediction_type):
                return Numerics.planned("cuda" if use_gpu else "cpu", opts.dtype, opts.exact, opts.compile,
                                        prediction_type)

            try:
                made_with = row_models(job.rows, run_model, opts.prediction_type, planned)
            except BatchSDError as e:
                raise UsageError(str(e)) from None
            session.start(made_with)
            # one actor pool per model, in order of first use; items in batch-plan order, so that an
            # actor's call holds rows that share UNet forwards
            groups: dict = {}
            for r, why in session.failing:
                groups.setdefault(made_with.key(r), []).append({"job_row": pickle.dumps(r), "error": why})
            for b in plan_batches(session.runnable, batch_size_for(opts.batch_size)):
                groups.setdefault(made_with.key(b.rows[0]), []).extend(
                    {"job_row": pickle.dumps(r), "error": None} for r in b.rows)
            groups = {key: groups[key] for key in made_with.keys_in_order(session.todo) if key in groups}
            per_call = rows_per_call or (opts.batch_size * 4 if opts.batch_size else DEFAULT_ROWS_PER_CALL)
            session.announce(f"Ray: {workers} worker(s) on {'GPU' if use_gpu else 'CPU'}, {per_call} rows per call, "
                             f"{len(groups)} model(s) in turn")
            progress = session.start_progress(rich_bar)
            cpus = cpus_per_worker or (1 if not use_gpu else None)
            remote = {"num_gpus": 1} if use_gpu else {"num_cpus": cpus}
            if use_gpu and cpus_per_worker:
                remote["num_cpus"] = cpus_per_worker
            _quiet_ray_data(ray)
            with progress:
                for key, items in groups.items():
                    identity, numerics = made_with.by_key[key]
                    cfg = MakerConfig(model=key, identity=identity,
                                      device="cuda" if use_gpu else "cpu", dtype=opts.dtype,
                                      low_memory=opts.low_memory, compile=opts.compile, winograd=opts.winograd,
                                      fused_attention=opts.fused_attention, fused_epilogues=opts.fused_epilogues,
                                      prediction_type=opts.prediction_type, exact=opts.exact, numerics=numerics,
                                      out_dir=str(job.out_dir.resolve()), save_latents=opts.save_latents,
                                      batch_size=opts.batch_size, schema=session.journal.schema,
                                      threads=int(cpus) if cpus else None)
                    results = ray.data.from_items(items).map_batches(
                        RowMaker, fn_constructor_kwargs={"cfg": cfg}, batch_size=per_call, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=workers), **remote)
                    for table in results.iter_batches(batch_size=None, batch_format="pyarrow"):
                        session.journal_records(table.to_pylist())
        except KeyboardInterrupt:
            interrupted = "SIGINT"
        finally:
            if started_ray:
                ray.shutdown()
        return session.finish(interrupted)


def _quiet_ray_data(ray) -> None:
    """Our own progress line instead of Ray Data's bars and plan logs."""
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    for attr, value in (("enable_progress_bars", False), ("print_on_execution_start", False),
                        ("enable_operator_progress_bars", False)):
        if hasattr(ctx, attr):
            setattr(ctx, attr, value)
