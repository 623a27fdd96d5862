"""`batchsd run --dry-run`: what a run would do (rows, failures known now, the batch plan), with
resume's rule (resume.row_states) for the rows already made. Loads no model, writes nothing."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from batchsd.job.journal import read_prior
from batchsd.job.options import RunOptions, RunSummary
from batchsd.job.plan import plan_batches
from batchsd.job.progress import print_plan
from batchsd.job.reader import Job
from batchsd.job.resume import MAKE, row_states
from batchsd.job.worker import batch_size_for


def dry_run(opts: RunOptions, job: Job, console: Console) -> RunSummary:
    runnable = [r for r in job.rows if r.id not in job.row_errors]
    note = ""
    if not opts.overwrite and runnable:
        # the model is not loaded, so it is not compared: rows made by another model count as made here
        states = row_states(runnable, read_prior(job.out_dir, job.layout.resume_parts_dirs()), job.out_dir,
                            made_with=None, save_latents=opts.save_latents, retry_errors=opts.retry_errors,
                            verify=opts.verify)
        left_out = len(runnable) - states.count(MAKE)
        if left_out:
            runnable = [r for r, state in zip(runnable, states) if state == MAKE]
            note = f"; {left_out} row(s) already made with these parameters are left out (if the model is the same)"
    size = batch_size_for(opts.batch_size)
    shard_note = f" ({job.shard})" if job.shard else ""
    console.print(f"dry run: {len(job.rows)} row(s) from {escape(str(opts.manifest))}{escape(shard_note)}, "
                  f"output to {escape(str(job.out_dir))}/, no model loaded")
    for rid, why in job.row_errors.items():
        console.print(f"[red]row {escape(repr(rid))} would fail:[/red] {escape(why)}")
    print_plan(console, plan_batches(runnable, size), size, note)
    if opts.batch_size is None:
        console.print(f"(batch size: {size} on the CPU; on CUDA it is chosen from free memory)")
    return RunSummary(out_dir=job.out_dir, total=len(job.rows), dry_run=True, shard=job.shard,
                      results_path=job.layout.results_path, pending=len(job.rows))
