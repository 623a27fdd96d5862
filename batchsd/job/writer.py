"""The writer: finished batches -> the output writer's files, then the journal.

It runs in its own thread beside the model (a bounded queue of finished batches between them), so
image encoding, hashing and fsyncs never hold up the next UNet forward. Per batch, in order:

    1. for every ok row: the output writer (outputs/) writes its files atomically; then `flush`
       makes the renames durable
    2. append one part file with the batch's records to the journal (fsync + os.replace)
    3. the output writer's `journaled`: a shard format writes the dataset shards the batch
       completed (and journals their rows' new place: outputs/dataset_shards.py)
    4. compact the journal into the results table when its interval is due (journal.py), then the
       output writer's `checkpoint` (imagefolder rewrites metadata.jsonl)

so a record never names an image that is not in place. A failure in the thread (disk full, ...)
is kept and raised in the main thread at its next `submit` or at `close`.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from batchsd.errors import InputError
from batchsd.job.journal import Journal
from batchsd.job.outputs import OutputWriter
from batchsd.job.outputs.files import LooseFiles
from batchsd.job.schema import now_utc


@dataclass
class BatchResult:
    """One finished generate() call (or a set of failed rows) on its way to disk."""
    records: list[dict]                          # per row: worker.record (manifest record, params_hash, model)
    images: list[Image.Image | None]             # None for failed rows
    latents: np.ndarray | None = None            # [B, 4, h, w] float32, rows aligned with records
    errors: list[str | None] = field(default_factory=list)
    elapsed_s: float = 0.0                        # generation seconds for the whole batch
    truncated: list[bool] = field(default_factory=list)


class ResultWriter:
    """Writes BatchResults in a background thread; `on_written(n_ok, n_failed)` after each batch."""

    def __init__(self, out_dir: Path, journal: Journal, *, save_latents: bool,
                 on_written: Callable[[int, int], None] | None = None, queue_size: int = 2,
                 output: OutputWriter | None = None):
        self.out_dir = Path(out_dir)
        self.output = output if output is not None else LooseFiles(self.out_dir, save_latents=save_latents)
        self.journal = journal
        self.on_written = on_written
        self.queue: queue.Queue[BatchResult | None] = queue.Queue(maxsize=queue_size)
        self.error: BaseException | None = None
        self.written_ok = 0
        self.written_failed = 0
        self.write_seconds = 0.0
        self._thread = threading.Thread(target=self._loop, name="batchsd-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ main-thread side
    def submit(self, batch: BatchResult) -> None:
        self._raise_if_failed()
        while True:
            try:
                self.queue.put(batch, timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def close(self) -> None:
        """Wait until everything submitted is durable, stop the thread, then close the output writer
        (unless the thread failed: the error is raised instead)."""
        if self._thread.is_alive():
            while True:
                try:
                    self.queue.put(None, timeout=0.5)
                    break
                except queue.Full:
                    if not self._thread.is_alive():
                        break
            self._thread.join()
        self._raise_if_failed()
        self.output.close()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise RuntimeError(f"writing results failed: {err}") from err

    # ------------------------------------------------------------------ writer thread
    def _loop(self) -> None:
        while True:
            batch = self.queue.get()
            if batch is None:
                return
            if self.error is not None:
                continue  # drain after a failure; the main thread sees the error
            try:
                t0 = time.perf_counter()
                n_ok, n_failed = self._write(batch)
                self.write_seconds += time.perf_counter() - t0
                self.written_ok += n_ok
                self.written_failed += n_failed
                if self.on_written is not None:
                    self.on_written(n_ok, n_failed)
            except BaseException as e:  # noqa: BLE001 - reported to the main thread
                self.error = e

    def _write(self, batch: BatchResult) -> tuple[int, int]:
        n = len(batch.records)
        per_row_s = batch.elapsed_s / max(1, n)
        out_records = []
        n_ok = n_failed = 0
        for i, rec in enumerate(batch.records):
            rec = dict(rec)
            image = batch.images[i] if i < len(batch.images) else None
            error = batch.errors[i] if i < len(batch.errors) else None
            rec.update(image_path=None, image_sha256=None, latents_path=None, error=None,
                       prompt_truncated=batch.truncated[i] if i < len(batch.truncated) else None)
            if image is not None and error is None:
                try:
                    self.output.write_row(rec, image, batch.latents[i] if batch.latents is not None else None)
                    rec.update(status="ok", elapsed_s=per_row_s)
                    n_ok += 1
                except InputError as e:
                    rec.update(status="error", error=str(e), elapsed_s=None)
                    n_failed += 1
            else:
                rec.update(status="error", error=error or "no image was produced", elapsed_s=None)
                n_failed += 1
            rec["finished_at"] = now_utc()
            out_records.append(rec)
        self.output.flush()   # the files durable before the record that names them
        self.journal.append(out_records)
        self.output.journaled(out_records)
        if self.journal.should_compact():
            self.journal.compact()
            self.output.checkpoint()
        return n_ok, n_failed

