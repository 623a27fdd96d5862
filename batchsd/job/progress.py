"""Progress of a run: a rich bar on a terminal, one plain line per batch elsewhere (SLURM logs).

Both show rows done/total, images/s, ETA and failures; `update` is called from the writer thread
once a batch is durable, so the figures count rows that are really on disk.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from batchsd.job.layout import RESULTS_FILE, SUMMARY_FILE


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        rate = task.fields.get("rate")
        return Text(f"{rate:.2f} img/s" if rate else "- img/s", style="cyan")


class _FailedColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        failed = task.fields.get("failed", 0)
        return Text(f"{failed} failed", style="red" if failed else "dim")


class RunProgress:
    """Counts rows written (ok + failed) against `total`; images/s over the ok rows of this run."""

    def __init__(self, total: int, console: Console | None = None, *, rich_bar: bool | None = None,
                 stream=None):
        self.total = total
        self.ok = 0
        self.failed = 0
        self.batches = 0
        self.stream = stream or sys.stderr
        self.console = console or Console(file=self.stream, emoji=False)
        self.rich_bar = self.console.is_terminal if rich_bar is None else rich_bar
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._progress: Progress | None = None
        self._task = None

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> "RunProgress":
        self._t0 = time.monotonic()
        if self.rich_bar:
            self._progress = Progress(
                TextColumn("[bold]batchsd"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn(), _FailedColumn(),
                console=self.console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task("rows", total=self.total, rate=None, failed=0)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # ---------------------------------------------------------------- figures
    @property
    def done(self) -> int:
        return self.ok + self.failed

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    @property
    def rate(self) -> float:
        e = self.elapsed
        return self.ok / e if e > 0 else 0.0

    def eta(self) -> float | None:
        e = self.elapsed
        if self.done == 0 or e <= 0:
            return None
        return (self.total - self.done) * e / self.done

    def update(self, n_ok: int, n_failed: int) -> None:
        with self._lock:
            self.ok += n_ok
            self.failed += n_failed
            self.batches += 1
            if self._progress is not None:
                self._progress.update(self._task, completed=self.done, rate=self.rate, failed=self.failed)
            else:
                self.line()

    def line(self) -> None:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        print(f"[batchsd] batch {self.batches}: {self.done}/{self.total} rows ({pct:.1f}%), "
              f"{self.failed} failed, {self.rate:.2f} img/s, elapsed {format_duration(self.elapsed)}, "
              f"ETA {format_duration(self.eta())}", file=self.stream, flush=True)


def print_plan(console: Console, batches, batch_size: int, skipped_note: str = "") -> None:
    """The batch plan as a table: one line per batch key (size, steps, sampler, img2img steps; the
    model when rows name their own)."""
    from pathlib import Path

    from rich.table import Table

    groups: dict[tuple, list] = {}
    for b in batches:
        groups.setdefault(tuple(b.key), []).append(b)
    table = Table(title=f"batch plan: {len(batches)} batch(es) of at most {batch_size} rows{skipped_note}")
    models = any(b.rows[0].model for b in batches)
    for col in ("size", "steps", "sampler", "img2img steps") + ("model",) * models + ("batches", "rows", "first ids"):
        table.add_column(col)
    for key, bs in groups.items():
        width, height, steps, sampler = key[:4]
        den = key[4] if len(key) > 4 else None
        ids = [r.id for b in bs for r in b.rows]
        model = bs[0].rows[0].model
        table.add_row(f"{width}x{height}", str(steps), str(sampler), "-" if den is None else str(den),
                      *([escape(Path(model).name if model else "--model")] if models else []),
                      str(len(bs)), str(len(ids)), escape(", ".join(ids[:3]) + (" ..." if len(ids) > 3 else "")))
    console.print(table)


def print_summary(console: Console, s) -> None:
    """The closing lines of a run (s: runner.RunSummary): ok, failed, skipped, images/s, where results are."""
    if s.dry_run:
        return
    head = "[bold green]done[/bold green]" if s.exit_code == 0 else (
        "[bold red]done, with failures[/bold red]" if s.exit_code == 1 else f"[bold yellow]stopped by {s.interrupted_by}[/bold yellow]")
    console.print(f"{head}: {s.ok} ok, {s.failed} failed, {s.skipped} skipped (already done)"
                  + (f", {s.previously_failed} failed earlier (not retried; --retry-errors)" if s.previously_failed else "")
                  + (f", {s.pending} not made yet (run the same command again to resume)" if s.pending else "")
                  + (f", {s.beyond_limit} more manifest row(s) beyond --limit" if getattr(s, "beyond_limit", 0) else "")
                  + f"; {s.images_per_s:.2f} images/s over {format_duration(s.elapsed_s)}"
                  + (f" ({format_duration(s.compile_s)} of it compiling the UNet)" if getattr(s, "compile_s", 0) else ""))
    out = Path(s.out_dir)
    shard = getattr(s, "shard", None)
    if shard is not None:  # a shard: its own part and done marker; the whole table once all are done
        console.print(escape(f"{shard}: results {s.results_path}  images: {s.images_dir or out / 'images'}/"))
        if getattr(s, "merged", False):
            console.print(escape(f"every shard is done: {out / RESULTS_FILE} and {out / SUMMARY_FILE} hold the whole job"))
        else:
            console.print(escape(f"`batchsd status {out}` shows every shard's progress"))
        return
    console.print(escape(f"results: {out / RESULTS_FILE}  images: {s.images_dir or out / 'images'}/"
                         + (f"  summary: {out / SUMMARY_FILE}" if s.interrupted_by is None else "")))
