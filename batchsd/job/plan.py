"""The batch plan: rows grouped by what lets them share UNet forwards, split into batches.

    for batch in plan_batches(rows, batch_size): ...      # each batch is one Pipeline.generate call
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from batchsd.job.rows import JobRow
from batchsd.model import request


@dataclass(frozen=True)
class Batch:
    key: tuple              # (width, height, steps, sampler, img2img denoising steps or None, text chunks,
                            # LoRA set) = Pipeline.batch_key, then the row's own model (JobRow.model)
    rows: list[JobRow]      # in file order; len(rows) <= batch_size

    @property
    def is_img2img(self) -> bool:
        return self.key[4] is not None


def batch_key(row: JobRow) -> tuple:
    """The row's batch key (the rule: model/request.batch_key), with its own model last: rows of two
    models never share a batch. Rows must have their size resolved."""
    if row.width is None or row.height is None:
        raise ValueError(f"row {row.id!r} has no size yet: call resolve_image_sizes(rows) before planning")
    syntax = row.conditioning.get("prompt_syntax", "plain")
    loras = tuple((path, multiplier) for path, multiplier, _ in row.conditioning.get("loras", ()))
    vectors = {Path(path).stem: n for path, n, _ in row.conditioning.get("embeddings", ())}
    return request.batch_key(row.width, row.height, row.steps, row.sampler, row.denoise_steps,
                             request.prompt_chunks(syntax, row.prompt, row.negative_prompt, vectors), loras) + (row.model,)



def plan_batches(rows: list[JobRow], batch_size: int) -> list[Batch]:
    """Group rows by batch_key (whatever their order in the file) and split groups into batch_size chunks.

    Order: groups by first appearance, chunks of a group in file order, then the next group.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[tuple, list[JobRow]] = {}
    for row in rows:
        groups.setdefault(batch_key(row), []).append(row)
    return [Batch(key, group[start:start + batch_size])
            for key, group in groups.items()
            for start in range(0, len(group), batch_size)]

