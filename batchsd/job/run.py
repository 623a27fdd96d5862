"""`batchsd run` on this process: validated manifest rows -> images, latents, results. Resumable.

img2dataset-style, each part in its own module:
    reader   reader.read_job: the manifest's rows, validated, img2img sizes resolved; init images
             decoded one batch ahead in a helper thread (init_images.load_images)
    worker   worker.Worker: Pipeline.generate per batch, out-of-memory halving, per-row failures
    writer   writer.ResultWriter: the output writer's files, then the journal, in a thread
    session  session.RunSession: lock, journal, resume decision, progress, done marker
This module is the local engine: it loads the model and runs the batch loop between them (the Ray
engine, batchsd.scale.ray_engine, is the other loop over the same session).

Signals (signals.py): the first SIGINT/SIGTERM lets the batch in flight finish and be written, then
stops (exit 130/143); a second one drops the batch in flight.

Shards (--shard I/N or the launcher's environment): a shard runs only its rows and writes only its
own files (layout.RunLayout), so N shards run at once on a shared filesystem without locking each
other, and each resumes on its own; the shard that completes the job merges the results (merge.py).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from rich.console import Console
from rich.markup import escape

from batchsd.errors import BatchSDError
from batchsd.job.init_images import load_images
from batchsd.job.model_choice import row_models, run_model_for, with_model_defaults
from batchsd.job.options import RunOptions, RunSummary, UsageError
from batchsd.job.plan import plan_batches
from batchsd.job.reader import read_job, warning_lines
from batchsd.job.resume import ModelIdentity, Numerics, RowModels, loaded_mismatch
from batchsd.job.session import RunSession
from batchsd.job.signals import StopRequested
from batchsd.job.worker import Worker, batch_size_for, failed_rows, speed_choices


class ModelNotLoaded(BatchSDError):
    """A model of the run could not be loaded: its rows were left unmade (they resume), the other
    models' rows were made. Exit 2, as for the usage errors."""


def run(opts: RunOptions, console: Console | None = None, *, rich_bar: bool | None = None,
        out_console: Console | None = None, pipe=None) -> RunSummary:
    """Run the job. Raises UsageError (exit 2) before anything is run; returns the summary otherwise
    (ModelNotLoaded after the run when a model could not be loaded). `console` takes progress and log
    lines, `out_console` the dry-run plan. `pipe`: an already loaded Pipeline to run the job with
    (Python API, benchmarks); opts.model/device/dtype then go unused, and rows may not name a model."""
    console = console or Console(stderr=True, emoji=False)
    opts = with_model_defaults(opts, pipe=pipe)   # unsized rows at their model family's size
    job = read_job(opts)
    for line in warning_lines(job.manifest):
        console.print(line, style="yellow", markup=False)
    if opts.dry_run:
        from batchsd.job.dry_run import dry_run

        return dry_run(opts, job, out_console or console)
    if pipe is not None and any(r.model for r in job.rows):
        raise UsageError("rows of this manifest name their model (its model column), so batchsd loads the models "
                         "itself: run it without a loaded pipe")

    from batchsd.model.devices import resolve_device
    from batchsd.model.fast.allocator import tune_cpu_allocator

    device = resolve_device(opts.device) if pipe is None else pipe.device  # InputError (exit 2) before loading
    if device.type == "cpu":
        tune_cpu_allocator()   # a batch-job process: freed memory kept for reuse, no page faults per op
    session = RunSession(opts, job, console, engine="local")
    with session.locked():
        if job.shard is not None:
            console.print(f"{escape(str(job.shard))}: {len(job.rows)} of the job's {len(job.job_ids)} row(s)")
        if pipe is None:
            def planned(prediction_type):
                return Numerics.planned(device.type, opts.dtype, opts.exact, opts.compile, prediction_type)

            try:
                made_with = row_models(job.rows, run_model_for(opts, job.rows), opts.prediction_type, planned)
            except BatchSDError as e:
                raise UsageError(str(e)) from None
        else:
            made_with = RowModels.one(ModelIdentity.of(pipe), Numerics.of(pipe))
        session.start(made_with)
        return _make_rows(session, pipe, rich_bar)


def _load(session: RunSession, key: str):
    """The Pipeline of model `key` (a model_key), checked against what the run planned with."""
    from batchsd.model.pipeline import Pipeline

    opts, console = session.opts, session.console
    console.print(f"loading model {escape(key)} ...")
    pipe = Pipeline.load(key, device=opts.device, dtype=opts.dtype, low_memory=opts.low_memory, compile=opts.compile,
                         winograd=opts.winograd, prediction_type=opts.prediction_type, exact=opts.exact,
                         fused_attention=opts.fused_attention, fused_epilogues=opts.fused_epilogues)
    if why := loaded_mismatch(pipe, *session.made_with.by_key[key]):
        raise RuntimeError(f"{why}: was the file replaced during the run?")
    return pipe


def _describe(pipe, console: Console, plan: str) -> None:
    hash_note = f", hash {pipe.short_hash}" if pipe.short_hash else ""
    held = ", text encoders and UNet held in turn (--low-memory)" if getattr(pipe, "low_memory_cpu", False) else ""
    console.print(f"model {escape(pipe.name)}{hash_note} on {pipe.device} ({str(pipe.dtype).removeprefix('torch.')}"
                  f"{held}): {plan}")
    if pipe.sha256 is None:
        console.print("[bold yellow]model 'tiny' has random weights: its images are noise. "
                      "It is for trying the tool and for tests; pass a real checkpoint (SD 1.x, 2.x or SDXL) for pictures.[/bold yellow]")


def _make_rows(session: RunSession, pipe, rich_bar: bool | None) -> RunSummary:
    """The local engine's loop: the rows of each model in turn (first use first, each model loaded
    once and released before the next), batches in plan order, init images read one batch ahead."""
    from batchsd.job.outputs import open_output
    from batchsd.job.writer import ResultWriter

    opts, console, made_with = session.opts, session.console, session.made_with
    by_model: dict = {}
    for row in session.runnable:
        by_model.setdefault(made_with.key(row), []).append(row)
    session.announce(f"{len(by_model)} model(s) to load" if pipe is None else "the given model")
    progress = session.start_progress(rich_bar)
    output = open_output(opts.output, session.layout, rows=session.job.rows, todo=session.todo,
                         journal=session.journal, save_latents=opts.save_latents)
    writer = ResultWriter(session.job.out_dir, session.journal, save_latents=opts.save_latents,
                          on_written=session.count, output=output)
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchsd-reader")
    not_loaded: list[str] = []
    stop = StopRequested(console)
    # signals stay handled through the final flush (a second one raises KeyboardInterrupt until the
    # run is finishing); the progress display lasts until the writer has written its last batch
    with stop, progress:
        try:
            if session.failing:
                writer.submit(failed_rows(session.failing, made_with.model))
            for key, rows in by_model.items():
                if stop:
                    break
                if pipe is None or key is not None:   # key None: the pipe given to run()
                    pipe = None
                    Worker.free_memory()   # the previous model's memory back before the next one loads
                    try:
                        pipe = _load(session, key)
                    except (BatchSDError, OSError, RuntimeError) as e:
                        not_loaded.append(f"model {key} ({len(rows)} row(s) left unmade): {e}")
                        console.print(f"[bold red]error:[/bold red] {escape(not_loaded[-1])}")
                        continue
                batch_size = _run_model(pipe, rows, made_with, writer, reader, stop, opts.batch_size, console)
                session.summary.batch_size = max(session.summary.batch_size or 0, batch_size)
                choices = speed_choices(pipe)
                session.summary.winograd, session.summary.cpu = choices["winograd"], choices["cpu"]
                session.summary.fused_attention = choices["fused_attention"]
                session.summary.fused_epilogues = choices["fused_epilogues"]
                session.summary.mkl_strict = getattr(pipe, "mkl_strict", None)   # fast/exact.mkl_strict
                session.summary.compile_s += sum(getattr(pipe.unet, "compile_seconds", {}).values())
        except KeyboardInterrupt:  # second signal: the batch in flight is dropped
            stop.signal_name = stop.signal_name or "SIGINT"
        finally:
            stop.finishing()
            reader.shutdown(wait=True, cancel_futures=True)
            writer.close()
        session.summary.images_dir = session.job.layout.output_dir(opts.output.format)
        summary = session.finish(stop.signal_name)
    if not_loaded and summary.interrupted_by is None:
        raise ModelNotLoaded("; ".join(not_loaded) + ". Every other row was made and recorded; fix the model "
                             "and run the same command again: the rows left unmade resume")
    return summary


def _run_model(pipe, rows, made_with: RowModels, writer, reader: ThreadPoolExecutor, stop: StopRequested,
               requested_batch: int | None, console: Console) -> int:
    """One model's rows: its batch plan, init images read one batch ahead, each batch to the writer.
    Returns the batch size it planned with."""
    worker = Worker(pipe, batch_size_for(requested_batch, pipe, rows), writer.submit, console)
    batches = plan_batches(rows, worker.batch_size)
    _describe(pipe, console, f"{len(rows)} row(s) in {len(batches)} batch(es) of at most {worker.batch_size}")

    def prefetch(batch) -> Future:
        return reader.submit(load_images, batch.rows)

    pending = prefetch(batches[0]) if batches else None
    for i, batch in enumerate(batches):
        if stop:
            break
        images, errors = pending.result()
        pending = prefetch(batches[i + 1]) if i + 1 < len(batches) else None
        bad = [(r, errors[r.id]) for r in batch.rows if r.id in errors]
        if bad:
            writer.submit(failed_rows(bad, made_with.model))
        todo = [r for r in batch.rows if r.id not in errors]
        worker.encode_ahead(todo, (batches[j].rows for j in range(i + 1, len(batches))))
        worker.run_rows(todo, images)
    return worker.batch_size
