"""What the two shard formats (webdataset, parquet) share: the shard plan, staging, and resume.

The plan. Dataset shard k of a run holds its rows k*N .. (k+1)*N-1 in manifest order (N =
--shard-size; a process shard's rows are its own, in manifest order): a function of the planned
rows alone, so the number of shards, ceil(rows / N), is known before anything runs, and a resumed
run groups rows exactly as an uninterrupted one. outputs/claim.py refuses a later run of the same
--out whose rows differ.

Staging. A finished row's image is written atomically to .batchsd/staging/<id>.<ext> (the run's
journal folder), and its record names that file, before the journal part that records it (the
write order of writer.py). So every finished row is durable, and resume's rule (the file the
record names is in place) holds unchanged.

A shard is written once every one of its rows is final (ok, or failed and not being retried in
this run), in this order:
    1. its files, each under a temporary name, fsynced and renamed (the format's done marker last)
    2. one journal part re-recording its ok rows with `image_path` naming the shard file
    3. its staged files deleted
A kill between any two steps is repaired by the next run: a shard is complete when its done
marker records the fingerprint of its rows' current records (id, status, image sha256 in order);
else it is written again from the staged files. A complete shard whose rows' records still name
staging gets steps 2-3 again. A shard that must be written again though its rows' records name
its file (a row remade with --retry-errors or changed parameters; a deleted marker) first gets
those rows' images back out of the shard file into staging. Shard files carry no time or host, so
a resumed run writes the same bytes as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from batchsd.job.atomic import atomic_write_bytes, fsync_dir, remove_stale_temps
from batchsd.job.journal import Journal, latest_records
from batchsd.job.layout import RunLayout, safe_output_path
from batchsd.job.outputs.encode import encode_image
from batchsd.job.outputs.files import LatentFiles
from batchsd.job.outputs.spec import OutputSpec
from batchsd.job.rows import JobRow
from batchsd.job.schema import records_to_table

# record fields a shard leaves out: they differ between runs (times) or say where the file went
NOT_IN_SHARD = ("finished_at", "elapsed_s", "image_path")


def plan_shards(ids: Sequence[str], shard_size: int) -> list[list[str]]:
    """Dataset shard k = ids[k*shard_size:(k+1)*shard_size] (module docstring)."""
    return [list(ids[i:i + shard_size]) for i in range(0, len(ids), shard_size)]


def rows_fingerprint(records: Sequence[dict]) -> str:
    """sha256 of the shard's rows as its files show them: (id, status, image sha256) in order."""
    key = [[r["id"], r.get("status"), r.get("image_sha256")] for r in records]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def shard_record(rec: dict) -> dict:
    """A row as a shard's files carry it: the result row without NOT_IN_SHARD."""
    return {k: v for k, v in rec.items() if k not in NOT_IN_SHARD}


class DatasetShards:
    """Base of the shard formats' OutputWriters (outputs/__init__.py). A subclass names its shard
    file (`shard_path`), writes a shard (`write_shard`), reads a written shard's fingerprint
    (`written_fingerprint`) and its images back (`read_images`)."""

    def __init__(self, layout: RunLayout, spec: OutputSpec, *, rows: Sequence[JobRow], todo: Sequence[JobRow],
                 journal: Journal, save_latents: bool):
        self.layout, self.spec, self.journal = layout, spec, journal
        self.out_dir = layout.out_dir
        self.latents = LatentFiles(self.out_dir, save_latents)
        self.staging_dir = layout.staging_dir
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.staging_dir)
        self.staging_rel = self.staging_dir.relative_to(self.out_dir).as_posix()
        self.shards = plan_shards([r.id for r in rows], spec.shard_size)
        self.count = len(self.shards)
        self.shard_index = {rid: k for k, ids in enumerate(self.shards) for rid in ids}
        todo_ids = {r.id for r in todo}
        self.pending = {k: {rid for rid in ids if rid in todo_ids} for k, ids in enumerate(self.shards)}
        # the latest record of every row not being made now (read once); this run's rows join as journaled
        self.records: dict[str, dict] = {}
        done_ids = [rid for rid in self.shard_index if rid not in todo_ids]
        if done_ids:
            table = latest_records(layout.parts_dir, journal.schema, done_ids)
            for rec in table.to_pylist():
                self.records[rec["id"]] = rec
        self._wrote = False
        self._catch_up()

    def remove_own_temps(self, folder: Path, prefix: str) -> None:
        """Temp files a killed run of this layout left in a dataset folder (atomic.py names them
        `.<name>.<random>.tmp`); `prefix` starts every shard file name of this layout, so another
        process shard's temps are left alone."""
        remove_stale_temps(folder, f".{prefix}*.tmp")

    # ------------------------------------------------------------------ the format's part
    def shard_path(self, k: int) -> Path:
        """The file a row's record names once its shard is written."""
        raise NotImplementedError

    def write_shard(self, k: int, records: list[dict], image_file) -> None:
        """Write shard k's files atomically, done marker last. `records`: its rows' latest records in
        plan order (failures too); `image_file(rec)`: the staged image of an ok row."""
        raise NotImplementedError

    def written_fingerprint(self, k: int) -> str | None:
        """The rows fingerprint shard k's done marker records; None if it is not complete."""
        raise NotImplementedError

    def read_images(self, k: int) -> Iterator[tuple[str, bytes]]:
        """(id, image bytes) of the ok rows in written shard k."""
        raise NotImplementedError

    def after_shards(self) -> None:
        """After a shard is written and journaled, and once after the start's catch-up (webdataset:
        sizes.json, which a kill may have left behind its last shard)."""

    # ------------------------------------------------------------------ OutputWriter
    def staged_path(self, row_id: str) -> Path:
        return safe_output_path(self.out_dir, self.staging_rel, row_id, self.spec.suffix)

    def write_row(self, rec: dict, image: Image.Image, latent: np.ndarray | None) -> None:
        if rec["id"] not in self.shard_index:
            raise RuntimeError(f"row {rec['id']!r} is not in this run's dataset-shard plan")
        data = encode_image(image, rec, self.spec)
        path = self.staged_path(rec["id"])
        self.latents.write(rec, latent)
        atomic_write_bytes(path, data, sync_dir=False)
        rec["image_path"] = f"{self.staging_rel}/{path.name}"
        rec["image_sha256"] = hashlib.sha256(data).hexdigest()
        self._wrote = True

    def flush(self) -> None:
        if self._wrote:
            fsync_dir(self.staging_dir)
            self.latents.flush()
        self._wrote = False

    def journaled(self, records: list[dict]) -> None:
        """The batch's records are durable: keep them (as the journal holds them) and write every
        shard they complete."""
        if not records:
            return
        due = set()
        for rec in records_to_table(records, self.journal.schema).to_pylist():
            k = self.shard_index.get(rec["id"])
            if k is None:
                continue
            self.records[rec["id"]] = rec
            self.pending[k].discard(rec["id"])
            if not self.pending[k]:
                due.add(k)
        for k in sorted(due):
            self._write(k)

    def checkpoint(self) -> None:
        """Nothing to rewrite at a compaction: shards are written as they complete."""

    def close(self) -> None:
        """Shards with rows still to make stay in staging: the next run writes them."""

    # ------------------------------------------------------------------ shards
    def _catch_up(self) -> None:
        """At the start: write the shards a killed run left complete but unwritten, finish the
        journal and staging steps of shards written just before a kill, and take back into
        staging the images of written shards that must be written again."""
        for k, ids in enumerate(self.shards):
            recs = [self.records.get(rid) for rid in ids]
            if not self.pending[k]:
                if any(r is None for r in recs):
                    raise RuntimeError(f"dataset shard {k}: a row has no record although none is left to make")
                if self.written_fingerprint(k) == rows_fingerprint(recs):
                    self._journal_moved(k, recs)
                else:
                    self._unstage_written(k, recs)
                    self._write(k)
            elif self.shard_path(k).is_file():
                self._unstage_written(k, [r for r in recs if r is not None])
        self.after_shards()

    def _unstage_written(self, k: int, recs: list[dict]) -> None:
        """Copy back into staging the images of rows whose record names shard k's file."""
        target = self.shard_path(k).relative_to(self.out_dir).as_posix()
        wanted = {r["id"] for r in recs if r.get("status") == "ok" and r.get("image_path") == target}
        if not wanted or not self.shard_path(k).is_file():
            return
        for rid, data in self.read_images(k):
            if rid in wanted:
                atomic_write_bytes(self.staged_path(rid), data, sync_dir=False)
        fsync_dir(self.staging_dir)

    def _image_file(self, rec: dict) -> Path:
        path = self.staged_path(rec["id"])
        if not path.is_file():
            raise RuntimeError(f"row {rec['id']!r}: its image is neither in {self.staging_dir} nor in its written "
                               f"dataset shard; delete {self.shard_path(self.shard_index[rec['id']])} and run again "
                               "(its rows are then made again)")
        return path

    def _write(self, k: int) -> None:
        recs = [self.records[rid] for rid in self.shards[k]]
        self.write_shard(k, recs, self._image_file)
        self._journal_moved(k, recs)
        self.after_shards()

    def _journal_moved(self, k: int, recs: list[dict]) -> None:
        """Steps 2 and 3 (module docstring) for written shard k."""
        target = self.shard_path(k).relative_to(self.out_dir).as_posix()
        moved = []
        for rec in recs:
            if rec.get("status") == "ok" and rec.get("image_path") != target:
                rec = dict(rec, image_path=target)
                self.records[rec["id"]] = rec
                moved.append(rec)
        if moved:
            self.journal.append(moved)
        removed = False
        for rid in self.shards[k]:
            try:
                os.unlink(self.staged_path(rid))
                removed = True
            except FileNotFoundError:
                pass
        if removed:
            fsync_dir(self.staging_dir)
        for rid in self.shards[k]:      # a written shard's rows are not needed again in this run
            self.records.pop(rid, None)
