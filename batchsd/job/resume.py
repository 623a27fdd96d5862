"""Resume: which of a run's rows are made again and which count as done.

The journal (results.py) holds the latest record of every row made. A row is skipped when its
record is "ok", its params_hash and model are the current ones and its image (and latents with
--save-latents) exist. Rows whose params or model changed are made again; "error" rows only with
--retry-errors; --overwrite makes everything again. Rows are deterministic (a CPU generator per
row, README "Seeding contract"), so an interrupted and resumed run equals an uninterrupted one up
to the floating-point rounding of another batch composition (within 1/255 per pixel; the tests
check it).

Rows of a run whose latest record is in another journal of the folder (an earlier unsharded run,
or shards: sharding.RunLayout) are skipped and their records copied into the run's own journal
(`adopt_records`), so its results file covers all its rows.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from batchsd.job.rows import JobRow
from batchsd.job.results import Journal, latest_records

SCAN_ENTRIES_PER_NAME = 4    # resume lists a folder rather than stat its files, up to this many entries per file


def decide(rows: Sequence[JobRow], prior: dict, out_dir: Path, *, model: str, model_sha256: str | None,
           save_latents: bool, overwrite: bool, retry_errors: bool) -> tuple[list[JobRow], int, int]:
    """Split rows into (to make, skipped ok, skipped earlier failures)."""
    states = [_resume_state(row, prior.get(row.id), model=model, model_sha256=model_sha256,
                            save_latents=save_latents, overwrite=overwrite, retry_errors=retry_errors)
              for row in rows]
    present = existing_files(out_dir, [f for s in states if isinstance(s, list) for f in s if f])
    todo, skipped, prev_failed = [], 0, 0
    for row, state in zip(rows, states):
        if isinstance(state, list):   # ok earlier: done if its files are still there
            state = "skip" if all(f and f in present for f in state) else "make"
        if state == "make":
            todo.append(row)
        elif state == "skip":
            skipped += 1
        else:
            prev_failed += 1
    return todo, skipped, prev_failed


def _resume_state(row: JobRow, rec, *, model: str, model_sha256: str | None, save_latents: bool,
                  overwrite: bool, retry_errors: bool) -> str | list:
    """What resume does with `row` given its latest record `rec` (or None): "make", "failed" (an
    earlier failure, not retried), or, for an ok record of the current params and model, the
    files (relative to out_dir; None where the record names none) it needs to count as done."""
    if overwrite or rec is None or rec.params_hash != row.params_hash():
        return "make"
    same_model = rec.model_sha256 == model_sha256 if model_sha256 else (rec.model == model and not rec.model_sha256)
    if not same_model:
        return "make"
    if rec.status == "ok":
        return [rec.image_path] + ([rec.latents_path] if save_latents else [])
    return "make" if retry_errors else "failed"


def existing_files(out_dir: Path, paths: Iterable[str]) -> set[str]:
    """The `paths` (relative to out_dir, as records name them) that are files, as Path.is_file
    says (a regular file, or a link to one). Names directly under a folder of out_dir
    (images/<id>.png, latents/<id>.npy) are looked up in one os.scandir listing of that folder
    instead of one stat each, when it holds at most SCAN_ENTRIES_PER_NAME entries per name asked
    (a shard's few rows in a big shared images/ are cheaper to stat); any other path, and a name
    the listing lacks (a case- or normalization-insensitive filesystem), is one stat."""
    by_folder: dict[str, list[str]] = {}
    to_stat: list[str] = []
    for p in set(paths):
        folder, _, name = p.partition("/")
        if _plain_name(folder) and _plain_name(name):
            by_folder.setdefault(folder, []).append(p)
        else:
            to_stat.append(p)
    found = set()
    for folder, group in by_folder.items():
        names = _file_names(out_dir / folder, max_entries=SCAN_ENTRIES_PER_NAME * len(group))
        for p in group:
            if names is not None and p.partition("/")[2] in names:
                found.add(p)
            else:
                to_stat.append(p)
    found.update(p for p in to_stat if (out_dir / p).is_file())
    return found


def _plain_name(name: str) -> bool:
    """Whether `name` is one plain path component (not empty, '.', '..', nor holding a '/')."""
    return name not in ("", ".", "..") and "/" not in name


def _file_names(folder: Path, max_entries: int) -> set[str] | None:
    """Names of the files (DirEntry.is_file: links followed) in `folder`; None when it holds more
    than `max_entries` entries or cannot be listed (the caller then stats)."""
    names = set()
    try:
        with os.scandir(folder) as entries:
            for n, entry in enumerate(entries):
                if n >= max_entries:
                    return None
                if entry.is_file():
                    names.add(entry.name)
    except OSError:
        return None
    return names


def adopt_records(journal: Journal, rows: Sequence[JobRow], todo: Sequence[JobRow], prior: dict) -> int:
    """Copy into `journal` the records of rows it will not make whose latest record is in another
    journal of the folder (made by an unsharded run, or by shards), so that this run's results
    file covers all its rows. Returns how many were copied."""
    todo_ids = {r.id for r in todo}
    own = str(journal.parts_dir)
    by_journal: dict[str, list[str]] = {}
    for r in rows:
        rec = prior.get(r.id)
        if r.id not in todo_ids and rec is not None and rec.parts_dir and rec.parts_dir != own:
            by_journal.setdefault(rec.parts_dir, []).append(r.id)
    n = 0
    for parts_dir, ids in by_journal.items():
        table = latest_records(Path(parts_dir), journal.schema, ids)
        journal.append_table(table)
        n += table.num_rows
    return n
