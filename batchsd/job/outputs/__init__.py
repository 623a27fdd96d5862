"""The output-writer seam: where a row's image (and latents) go.

An OutputWriter is called from the writer thread only (writer.ResultWriter), one batch at a time:

    write_row(rec, image, latent)   each ok row: its files written atomically; fills the record's
                                    `image_path`, `image_sha256` and `latents_path`; an InputError
                                    fails that row only
    flush()                         once, before the batch's journal part is written, so that a
                                    record never names a file that is not durable
    journaled(records)              after the batch's part is durable (every record of the batch,
                                    failures too): a shard format writes the dataset shards now
                                    complete and journals their rows' new `image_path`
    checkpoint()                    after a journal compaction: rewrite a whole-dataset index
                                    (imagefolder's metadata.jsonl)
    close()                         at the end of the run (also after an interrupt)

Formats (outputs/spec.py; the names of their files are in job/layout.py):
    files        outputs/files.py        images/<id>.<ext> (+ <id>.txt with --captions)
    imagefolder  outputs/imagefolder.py  train/<id>.<ext> + train/metadata.jsonl
    webdataset   outputs/webdataset.py   tar shards in img2dataset's layout
    parquet      outputs/hf_parquet.py   Hugging Face parquet shards with embedded images
The two shard formats share outputs/dataset_shards.py (staging, the shard plan, resume).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from batchsd.job.journal import Journal
    from batchsd.job.layout import RunLayout
    from batchsd.job.outputs.spec import OutputSpec
    from batchsd.job.rows import JobRow


class OutputWriter(Protocol):
    def write_row(self, rec: dict, image: Image.Image, latent: np.ndarray | None) -> None: ...

    def flush(self) -> None: ...

    def journaled(self, records: list[dict]) -> None: ...

    def checkpoint(self) -> None: ...

    def close(self) -> None: ...


def open_output(spec: OutputSpec, layout: RunLayout, *, rows: Sequence[JobRow], todo: Sequence[JobRow],
                journal: Journal, save_latents: bool) -> OutputWriter:
    """The OutputWriter of `spec` for a run of `layout` whose rows are `rows` (manifest order) and
    which makes `todo` of them; `journal` is the run's, already opened (session.start)."""
    common = dict(save_latents=save_latents)
    if spec.format == "files":
        from batchsd.job.outputs.files import LooseFiles

        return LooseFiles(layout.out_dir, spec=spec, **common)
    if spec.format == "imagefolder":
        from batchsd.job.outputs.imagefolder import ImageFolder

        return ImageFolder(layout, spec, rows=rows, todo=todo, journal=journal, **common)
    if spec.format == "webdataset":
        from batchsd.job.outputs.webdataset import WebDataset

        return WebDataset(layout, spec, rows=rows, todo=todo, journal=journal, **common)
    if spec.format == "parquet":
        from batchsd.job.outputs.hf_parquet import HFParquet

        return HFParquet(layout, spec, rows=rows, todo=todo, journal=journal, **common)
    raise ValueError(f"unknown output format {spec.format!r}")
