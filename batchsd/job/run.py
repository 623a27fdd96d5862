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
from batchsd.job.model_choice import resolve_model, with_model_default_size
from batchsd.job.options import RunOptions, RunSummary, UsageError
from batchsd.job.plan import plan_batches
from batchsd.job.reader import read_job, warning_lines
from batchsd.job.resume import ModelIdentity, Numerics
from batchsd.job.session import RunSession
from batchsd.job.signals import StopRequested
from batchsd.job.worker import Worker, batch_size_for, failed_rows, speed_choices


def run(opts: RunOptions, console: Console | None = None, *, rich_bar: bool | None = None,
        out_console: Console | None = None, pipe=None) -> RunSummary:
    """Run the job. Raises UsageError (exit 2) before anything is run; returns the summary otherwise.
    `console` takes progress and log lines, `out_console` the dry-run plan. `pipe`: an already
    loaded Pipeline to run the job with (Python API, benchmarks); opts.model/device/dtype then go unused."""
    console = console or Console(stderr=True)
    opts = with_model_default_size(opts, pipe=pipe)   # unsized rows at the model family's size
    job = read_job(opts)
    for line in warning_lines(job.manifest):
        console.print(line, style="yellow", markup=False)
    if opts.dry_run:
        from batchsd.job.dry_run import dry_run

        return dry_run(opts, job, out_console or console)

    from batchsd.model.devices import resolve_device
    from batchsd.model.fast.allocator import tune_cpu_allocator
    from batchsd.model.pipeline import Pipeline

    device = resolve_device(opts.device) if pipe is None else pipe.device  # InputError (exit 2) before loading
    if device.type == "cpu":
        tune_cpu_allocator()   # a batch-job process: freed memory kept for reuse, no page faults per op
    model = resolve_model(opts.model) if pipe is None else pipe.name
    session = RunSession(opts, job, console, engine="local")
    with session.locked():
        if job.shard is not None:
            console.print(f"{escape(str(job.shard))}: {len(job.rows)} of the job's {len(job.job_ids)} row(s)")
        if pipe is None:
            console.print(f"loading model {escape(model)} ...")
            try:
                pipe = Pipeline.load(model, device=opts.device, dtype=opts.dtype, low_memory=opts.low_memory,
                                     compile=opts.compile, winograd=opts.winograd,
                                     prediction_type=opts.prediction_type, exact=opts.exact)
            except BatchSDError as e:
                raise UsageError(str(e)) from None
            except OSError as e:
                raise UsageError(f"cannot read model {model}: {e}") from None
        hash_note = f", hash {pipe.short_hash}" if pipe.short_hash else ""
        console.print(f"model {escape(pipe.name)}{hash_note} on {pipe.device} ({str(pipe.dtype).removeprefix('torch.')})")
        if pipe.sha256 is None:
            console.print("[bold yellow]model 'tiny' has random weights: its images are noise. "
                          "It is for trying the tool and for tests; pass a real checkpoint (SD 1.x, 2.x or SDXL) for pictures.[/bold yellow]")
        session.start(ModelIdentity(pipe.name, pipe.sha256), Numerics.of(pipe))
        return _make_rows(session, pipe, rich_bar)


def _make_rows(session: RunSession, pipe, rich_bar: bool | None) -> RunSummary:
    """The local engine's loop: batches in plan order, init images read one batch ahead."""
    from batchsd.job.outputs import open_output
    from batchsd.job.writer import ResultWriter

    opts, console = session.opts, session.console
    batch_size = batch_size_for(opts.batch_size, pipe, session.runnable)
    session.summary.batch_size = batch_size
    batches = plan_batches(session.runnable, batch_size)
    session.announce(f"{len(batches)} batch(es) of at most {batch_size}")
    progress = session.start_progress(rich_bar)
    output = open_output(opts.output, session.layout, rows=session.job.rows, todo=session.todo,
                         journal=session.journal, model_name=pipe.name, short_hash=pipe.short_hash,
                         save_latents=opts.save_latents)
    writer = ResultWriter(session.job.out_dir, session.journal, model_name=pipe.name, model_sha256=pipe.sha256,
                          short_hash=pipe.short_hash, save_latents=opts.save_latents, on_written=session.count,
                          output=output)
    worker = Worker(pipe, batch_size, writer.submit, console)
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchsd-reader")

    def prefetch(batch) -> Future:
        return reader.submit(load_images, batch.rows)

    stop = StopRequested(console)
    # signals stay handled through the final flush (a second one raises KeyboardInterrupt); the
    # progress display lasts until the writer has written its last batch
    with stop, progress:
        try:
            if session.failing:
                writer.submit(failed_rows(session.failing))
            pending = prefetch(batches[0]) if batches else None
            for i, batch in enumerate(batches):
                if stop:
                    break
                images, errors = pending.result()
                pending = prefetch(batches[i + 1]) if i + 1 < len(batches) else None
                bad = [(r, errors[r.id]) for r in batch.rows if r.id in errors]
                if bad:
                    writer.submit(failed_rows(bad))
                worker.run_rows([r for r in batch.rows if r.id not in errors], images)
        except KeyboardInterrupt:  # second signal: the batch in flight is dropped
            stop.signal_name = stop.signal_name or "SIGINT"
        finally:
            reader.shutdown(wait=True, cancel_futures=True)
            writer.close()
        session.summary.compile_s = sum(getattr(pipe.unet, "compile_seconds", {}).values())
        choices = speed_choices(pipe)
        session.summary.winograd, session.summary.cpu = choices["winograd"], choices["cpu"]
        session.summary.images_dir = session.job.layout.output_dir(opts.output.format)
        return session.finish(stop.signal_name)
