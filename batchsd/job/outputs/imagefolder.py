"""--format imagefolder: the layout `datasets.load_dataset("imagefolder", data_dir=OUT)` reads.

    train/<id>.<png|jpg|webp>      each image, written atomically as it is made (outputs/files.py)
    train/metadata.jsonl           one line per ok row, in manifest order: file_name, text (the
                                   prompt), id, negative_prompt, seed, steps, cfg_scale, sampler,
                                   width, height, model

A process shard I/N writes into train/<I>-of-<N>/ with its own metadata.jsonl (datasets reads the
metadata file of each folder). metadata.jsonl is rewritten whole (atomically) after each journal
compaction and at the end of a run, so after a kill it may lack the rows made since; the next run
rewrites it. datasets skips an image that no line names.
"""
from __future__ import annotations

import json
from typing import Sequence

from batchsd.job.atomic import atomic_write_bytes, remove_stale_temps
from batchsd.job.journal import Journal, latest_records
from batchsd.job.layout import IMAGEFOLDER_METADATA_FILE, RunLayout
from batchsd.job.outputs.files import LooseFiles
from batchsd.job.outputs.spec import OutputSpec
from batchsd.job.rows import JobRow

METADATA_COLUMNS = ["id", "negative_prompt", "seed", "steps", "cfg_scale", "sampler", "width", "height", "model"]


def metadata_line(rec: dict) -> str:
    line = {"file_name": rec["image_path"].rsplit("/", 1)[-1], "text": rec.get("prompt") or ""}
    line.update((c, rec.get(c)) for c in METADATA_COLUMNS)
    return json.dumps(line, ensure_ascii=False, default=str)


class ImageFolder(LooseFiles):
    def __init__(self, layout: RunLayout, spec: OutputSpec, *, rows: Sequence[JobRow], todo: Sequence[JobRow],
                 journal: Journal, save_latents: bool):
        folder = layout.imagefolder_dir.relative_to(layout.out_dir).as_posix()
        layout.imagefolder_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(layout.imagefolder_dir)     # a killed run's; the folder is this layout's alone
        super().__init__(layout.out_dir, save_latents=save_latents, spec=spec, folder=folder)
        self.metadata_path = layout.imagefolder_dir / IMAGEFOLDER_METADATA_FILE
        self.order = [r.id for r in rows]
        todo_ids = {r.id for r in todo}
        self.lines: dict[str, str] = {}     # id -> its metadata line, for the ok rows
        done = [rid for rid in self.order if rid not in todo_ids]
        if done:
            for rec in latest_records(layout.parts_dir, journal.schema, done).to_pylist():
                if rec.get("status") == "ok" and rec.get("image_path"):
                    self.lines[rec["id"]] = metadata_line(rec)
        self._changed = True

    def journaled(self, records: list[dict]) -> None:
        for rec in records:
            if rec.get("status") == "ok":
                self.lines[rec["id"]] = metadata_line(rec)
            else:
                self.lines.pop(rec["id"], None)
            self._changed = True

    def checkpoint(self) -> None:
        if self._changed:
            text = "".join(self.lines[rid] + "\n" for rid in self.order if rid in self.lines)
            atomic_write_bytes(self.metadata_path, text.encode())
            self._changed = False

    def close(self) -> None:
        self.checkpoint()
