"""The worker: Pipeline.generate over a batch's rows, with out-of-memory halving and per-row
failures, and what both engines share about batches (a row's record, the batch size, rows known to
fail). The local engine (run.py) and the Ray engine's actors (scale/ray_engine.RowMaker) run it.

Batch size: --batch-size N, else on the CPU DEFAULT_CPU_BATCH (4), on CUDA the free memory after
the model is loaded, minus CUDA_RESERVE_BYTES, divided by an estimate of one image's working
memory, CUDA_BYTES_PER_IMAGE_512 x (W*H / 512^2) x (bytes per element / 2), at the largest size in
the job; clamped to 1..MAX_AUTO_BATCH. Out of memory on a batch (torch.cuda.OutOfMemoryError, or a
RuntimeError saying "out of memory") halves it and retries, down to 1, and the smaller size is
kept for the rest of the run; only a single row that still does not fit fails. Any other
exception on a batch of several rows retries its rows one by one, so only the rows that raise
fail, with the reason in `error`. A row whose latents come out NaN or infinite (broken weights, an
overflowing dtype) fails alone with that reason; the rows beside it in the batch are unaffected
(every op of the model is per row). Every record the worker makes carries the pipe's numerics
(resume.Numerics: torch version, device type, dtype, exact mode), which resume compares.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from rich.console import Console

from batchsd.errors import BatchSDError
from batchsd.job.rows import JobRow

DEFAULT_CPU_BATCH = 4
MAX_AUTO_BATCH = 32
CUDA_RESERVE_BYTES = 2 * 1024**3
CUDA_BYTES_PER_IMAGE_512 = int(1.5 * 1024**3)
NON_FINITE = ("the row's latents came out NaN or infinite, so its image would be blank: the checkpoint may hold "
              "NaN/inf weights (`batchsd inspect` it), or the dtype overflows (try --dtype fp32); nothing was saved")


def batch_size_for(requested: int | None, pipe=None, rows: Sequence[JobRow] = ()) -> int:
    """The batch size a run uses: --batch-size when given; else, with a loaded pipe, the default for
    its device at the largest size among `rows`; else (planning before any model loads, or no rows
    to make) DEFAULT_CPU_BATCH."""
    if requested is not None:
        return requested
    if pipe is None or not rows:
        return DEFAULT_CPU_BATCH
    big = max(rows, key=lambda r: r.width * r.height)   # sizes are resolved by the reader
    return default_batch_size(pipe, big.width, big.height)


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

    def __post_init__(self):
        from batchsd.job.resume import ModelIdentity, Numerics

        self.numerics = Numerics.of(self.pipe)
        self.model = ModelIdentity.of(self.pipe)
        self.choices = speed_choices(self.pipe)

    def _record(self, row: JobRow) -> dict:
        return record(row, self.model, self.numerics, self.choices)

    def run_rows(self, rows: list[JobRow], images: dict[str, object]) -> None:
        """Generate `rows` (one batch key) in chunks of at most self.batch_size."""
        i = 0
        while i < len(rows):
            chunk = rows[i:i + self.batch_size]
            self._run_chunk(chunk, images)
            i += len(chunk)

    def encode_ahead(self, batch: Sequence[JobRow], later: Iterable[Sequence[JobRow]]) -> None:
        """Low-memory mode on the CPU: the prompts of the next batch and of the batches `later` (lazily
        read, in run order) encoded in one go when the next batch needs its text encoders
        (Pipeline.encode_ahead); nothing otherwise."""
        if not getattr(self.pipe, "low_memory_cpu", False) or not batch:
            return
        rows = (generation_row(r, {}) for rows in itertools.chain([batch], later) for r in rows)
        self.pipe.encode_ahead(rows, now=len(batch))

    def _run_chunk(self, chunk: list[JobRow], images: dict) -> None:
        from batchsd.job.writer import BatchResult

        gen_rows = [generation_row(r, images) for r in chunk]
        t0 = time.perf_counter()
        try:
            out = self.pipe.generate(gen_rows)
        except Exception as e:  # noqa: BLE001 - classified below; nothing escapes but KeyboardInterrupt
            if is_out_of_memory(e):
                self.free_memory()
                if len(chunk) == 1:
                    self.emit(BatchResult(records=[self._record(chunk[0])], images=[None],
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
            self.emit(BatchResult(records=[self._record(chunk[0])], images=[None],
                                  errors=[_error_text(e)]))
            return
        elapsed = time.perf_counter() - t0
        latents = out.latents.float()
        finite = latents.flatten(1).isfinite().all(dim=1).tolist()   # per row: rows never mix in a batch
        self.emit(BatchResult(records=[self._record(r) for r in chunk],
                              images=[im if ok else None for im, ok in zip(out.images, finite)],
                              latents=latents.numpy(), errors=[None if ok else NON_FINITE for ok in finite],
                              elapsed_s=elapsed, truncated=list(getattr(out, "prompt_truncated", []) or [])))

    @staticmethod
    def free_memory() -> None:
        """Collect Python garbage and hand freed memory back: the CPU heap's pages (the tuned allocator
        keeps them otherwise, fast/allocator.py) and cached CUDA blocks. After an out-of-memory error,
        and between the models of a run, so that one model's memory is not held beside the next's."""
        import gc

        import torch

        from batchsd.model.fast.allocator import release_free_memory

        gc.collect()
        release_free_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def generation_row(row: JobRow, images: dict[str, object]):
    """A job row as the pipeline's GenerationRow, with its init image from `images` (by row id)."""
    from batchsd.job.conditioning_columns import generation_fields
    from batchsd.model.pipeline import GenerationRow

    return GenerationRow(prompt=row.prompt, negative_prompt=row.negative_prompt, seed=row.seed, steps=row.steps,
                         cfg_scale=row.cfg_scale, sampler=row.sampler, width=row.width, height=row.height,
                         init_image=images.get(row.id),
                         strength=row.strength if row.strength is not None else 0.75,
                         **generation_fields(row.conditioning))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _error_text(e: BaseException) -> str:
    if isinstance(e, BatchSDError):
        return str(e)
    return f"{type(e).__name__}: {_first_line(e)}"


def speed_choices(pipe) -> dict:
    """The results' `cpu`, `winograd`, `fused_attention` and `fused_epilogues`: the CPU kind the speed
    choices were keyed on (devices.cpu_kind; None off the CPU), whether Winograd ran, whether the fused
    attention ran and whether the transformers' GEGLU and residual adds ran in oneDNN linears' epilogues."""
    kind = getattr(pipe, "cpu_kind", None)
    return {"cpu": None if kind is None else str(kind), "winograd": bool(getattr(pipe, "winograd", False)),
            "fused_attention": bool(getattr(pipe, "fused_attention", False)),
            "fused_epilogues": bool(getattr(pipe, "fused_epilogues", False))}


def record(row: JobRow, model, numerics=None, choices: dict | None = None) -> dict:
    """The row's manifest record, its params_hash, the model that makes it (resume.ModelIdentity:
    the row's own, or the run's) and, for a row the model made or tried, the numerics
    (resume.Numerics) it was made with."""
    from batchsd.job.embeddings import embedding_record

    rec = row.to_record()
    rec["embeddings"] = embedding_record(row.conditioning.get("embeddings"))
    rec["params_hash"] = row.params_hash()
    rec["model"], rec["model_sha256"] = (model.name, model.sha256) if model is not None else (None, None)
    if numerics is not None:
        rec.update(numerics.columns())
    if choices is not None:
        rec.update(choices)
    return rec


def failed_rows(failures: Sequence[tuple[JobRow, str]], model_of: Callable):
    """A BatchResult recording rows that fail without a model call (e.g. an unusable init image), each
    with the model that would have made it (`model_of(row)`: a resume.ModelIdentity)."""
    from batchsd.job.writer import BatchResult

    return BatchResult(records=[record(r, model_of(r)) for r, _ in failures], images=[None] * len(failures),
                       errors=[why for _, why in failures])
