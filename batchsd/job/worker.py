"""The worker: Pipeline.generate over a batch's rows, with out-of-memory halving and per-row
failures, and the helpers both engines share (init images, a row's record, the batch size).
`batchsd run` (runner.py) and the Ray engine's actors (ray_runner.RowMaker) run it.

Batch size: --batch-size N, else on the CPU DEFAULT_CPU_BATCH (4), on CUDA the free memory after
the model is loaded, minus CUDA_RESERVE_BYTES, divided by an estimate of one image's working
memory, CUDA_BYTES_PER_IMAGE_512 x (W*H / 512^2) x (bytes per element / 2), at the largest size in
the job; clamped to 1..MAX_AUTO_BATCH. Out of memory on a batch (torch.cuda.OutOfMemoryError, or a
RuntimeError saying "out of memory") halves it and retries, down to 1, and the smaller size is
kept for the rest of the run; only a single row that still does not fit fails. Any other
exception on a batch of several rows retries its rows one by one, so only the rows that raise
fail, with the reason in `error`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from rich.console import Console

from batchsd.errors import BatchSDError, InputError
from batchsd.job.rows import JobRow

DEFAULT_CPU_BATCH = 4
MAX_AUTO_BATCH = 32
CUDA_RESERVE_BYTES = 2 * 1024**3
CUDA_BYTES_PER_IMAGE_512 = int(1.5 * 1024**3)


def default_batch_size(pipe, width: int, height: int) -> int:
    """See the module docstring: 4 on the CPU, from free memory and image size on CUDA."""
    import torch

    if pipe.device.type != "cuda":
        return DEFAULT_CPU_BATCH
    free, _ = torch.cuda.mem_get_info(pipe.device)
    elem = torch.finfo(pipe.dtype).bits // 8
    per_image = CUDA_BYTES_PER_IMAGE_512 * (width * height) / (512 * 512) * elem / 2
    return max(1, min(MAX_AUTO_BATCH, int((free - CUDA_RESERVE_BYTES) // per_image)))


def is_out_of_memory(e: BaseException) -> bool:
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


@dataclass
class Worker:
    pipe: object
    batch_size: int
    emit: Callable                           # emit(BatchResult)
    console: Console

    def run_rows(self, rows: list[JobRow], images: dict[str, object]) -> None:
        """Generate `rows` (one batch key) in chunks of at most self.batch_size."""
        i = 0
        while i < len(rows):
            chunk = rows[i:i + self.batch_size]
            self._run_chunk(chunk, images)
            i += len(chunk)

    def _run_chunk(self, chunk: list[JobRow], images: dict) -> None:
        from batchsd.model.pipeline import GenerationRow
        from batchsd.job.writer import BatchResult

        gen_rows = [GenerationRow(prompt=r.prompt, negative_prompt=r.negative_prompt, seed=r.seed, steps=r.steps,
                                  cfg_scale=r.cfg_scale, sampler=r.sampler, width=r.width, height=r.height,
                                  init_image=images.get(r.id),
                                  strength=r.strength if r.strength is not None else 0.75)
                    for r in chunk]
        t0 = time.perf_counter()
        try:
            out = self.pipe.generate(gen_rows)
        except Exception as e:  # noqa: BLE001 - classified below; nothing escapes but KeyboardInterrupt
            if is_out_of_memory(e):
                self._free_memory()
                if len(chunk) == 1:
                    self.emit(BatchResult(records=[record(chunk[0])], images=[None],
                                          errors=[f"out of memory at batch size 1 ({_first_line(e)}); "
                                                  "use a smaller size, --low-memory or --dtype fp16"]))
                    return
                half = max(1, len(chunk) // 2)
                self.console.print(f"[yellow]out of memory at batch size {len(chunk)}: retrying at {half}[/yellow]")
                self.batch_size = min(self.batch_size, half)
                self.run_rows(chunk, images)
                return
            if len(chunk) > 1:  # find the row(s) that raise
                for r in chunk:
                    self._run_chunk([r], images)
                return
            self.emit(BatchResult(records=[record(chunk[0])], images=[None], errors=[_error_text(e)]))
            return
        elapsed = time.perf_counter() - t0
        self.emit(BatchResult(records=[record(r) for r in chunk], images=list(out.images),
                              latents=out.latents.float().numpy(), errors=[None] * len(chunk),
                              elapsed_s=elapsed, truncated=list(getattr(out, "prompt_truncated", []) or [])))

    @staticmethod
    def _free_memory() -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _error_text(e: BaseException) -> str:
    if isinstance(e, BatchSDError):
        return str(e)
    return f"{type(e).__name__}: {_first_line(e)}"


def record(row: JobRow) -> dict:
    rec = row.to_record()
    rec["params_hash"] = row.params_hash()
    return rec


def load_images(rows: Sequence[JobRow]) -> tuple[dict, dict]:
    from batchsd.job.planner import load_init_image

    images, errors = {}, {}
    for r in rows:
        if r.init_image is None:
            continue
        try:
            images[r.id] = load_init_image(r.init_image)
        except InputError as e:
            errors[r.id] = str(e)
    return images, errors
