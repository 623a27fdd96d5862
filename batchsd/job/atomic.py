"""Atomic files: written under a temporary name in the same folder, fsynced, then renamed, so a
reader (or a run after a crash) never sees a half-written file. Temp names are `.<name>.<random>.tmp`;
`remove_stale_temps` deletes those a killed run left behind.
"""
from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_current_umask()   # what open() would give; mkstemp makes 0600 files


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path, sync_dir: bool = True) -> Iterator[str]:
    """Yield a temp file name in `path`'s folder to write; then fsync it and os.replace it onto
    `path`, so `path` is never seen half-written. On an exception the temp file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, sync_dir: bool = True) -> None:
    with atomic_path(path, sync_dir) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_table(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def remove_stale_temps(folder: Path, pattern: str = ".*.tmp", min_age_s: float = 0.0) -> int:
    """Delete temp files a killed run left behind (`.<name>.<random>.tmp`). Where other processes
    write into the same folder (shards sharing images/), pass min_age_s so that their temp files,
    alive for a moment, are left alone."""
    if not folder.is_dir():
        return 0
    n = 0
    cutoff = time.time() - min_age_s
    for p in folder.glob(pattern):
        try:
            if min_age_s and p.stat().st_mtime > cutoff:
                continue
            p.unlink()
            n += 1
        except OSError:
            pass
    return n

