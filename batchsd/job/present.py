"""Which of the files that records name are in place in an output folder (resume's DONE needs a
row's files; the results table names only rows whose files are there).

A path counts when it is a regular file. A link does not: the writer only ever renames regular
files into place, so a link there (to another row's image, or outside --out) is not this row's
output.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Iterable

SCAN_ENTRIES_PER_NAME = 4    # list a folder rather than stat its files, up to this many entries per file


def existing_files(out_dir: Path, paths: Iterable[str]) -> set[str]:
    """The `paths` (relative to out_dir, as records name them) that are regular files. Names directly under a folder of out_dir
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
    found.update(p for p in to_stat if _is_regular_file(out_dir / p))
    return found


def _plain_name(name: str) -> bool:
    """Whether `name` is one plain path component (not empty, '.', '..', nor holding a '/')."""
    return name not in ("", ".", "..") and "/" not in name


def _file_names(folder: Path, max_entries: int) -> set[str] | None:
    """Names of the regular files (links not followed) in `folder`; None when it holds more
    than `max_entries` entries or cannot be listed (the caller then stats)."""
    names = set()
    try:
        with os.scandir(folder) as entries:
            for n, entry in enumerate(entries):
                if n >= max_entries:
                    return None
                if entry.is_file(follow_symlinks=False):
                    names.add(entry.name)
    except OSError:
        return None
    return names


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def file_sha256(path: Path) -> str:
    """sha256 of the file's bytes, streamed (OSError when it cannot be read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stray_images(folder: Path, suffix: str, row_ids) -> list[str]:
    """The images (`*<suffix>`, temporary files aside) in `folder` that no id of `row_ids` names: rows
    removed or renamed since they were made. A loader reading the folder takes them too; batchsd never
    deletes them (they are the user's files), the run warns."""
    expected = {rid + suffix for rid in row_ids}
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries
                          if e.name.endswith(suffix) and not e.name.startswith(".") and e.name not in expected)
    except OSError:
        return []
