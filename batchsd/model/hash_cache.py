"""Checkpoint sha256 values kept across processes, so that a multi-GB file is hashed once per version,
not once per run (a SLURM array of 100 tasks would otherwise read a 7 GB checkpoint 100 times just to
hash it).

A value is kept under the stamp of the files it was computed from: for each file its real path, size,
modification time and change time (ns) and inode. Writing a file, or replacing it (a copy, `cp -p`
or rsync keeping the modification time included), changes its change time or inode, so a stale
value is never returned. The cache is one JSON file,

    $BATCHSD_CACHE_DIR/checkpoint-sha256.json     (default: $XDG_CACHE_HOME/batchsd, else ~/.cache/batchsd)

holding the newest MAX_ENTRIES values; it is replaced atomically (temp file + rename), so processes
that write at once lose at most each other's newest value, never the file. A cache that cannot be
read is treated as empty; one that cannot be written (a read-only home) is skipped: the value is
then computed again by the next process. BATCHSD_CACHE_DIR=off turns the cache off.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

CACHE_ENV = "BATCHSD_CACHE_DIR"
CACHE_FILE = "checkpoint-sha256.json"
MAX_ENTRIES = 512


def cache_root() -> Path | None:
    """batchsd's cache folder ($BATCHSD_CACHE_DIR, else $XDG_CACHE_HOME/batchsd or ~/.cache/batchsd),
    or None when turned off; the hash cache and the compiled kernels (fused_attention.py) live there."""
    root = os.environ.get(CACHE_ENV)
    if root == "off":
        return None
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "batchsd")
    return Path(root)


def cache_path() -> Path | None:
    """The cache file, or None when turned off."""
    root = cache_root()
    return None if root is None else root / CACHE_FILE


def stamp(files: Sequence[Path]) -> str:
    """The key of a value computed over `files` in this order (the module docstring)."""
    parts = []
    for f in files:
        st = os.stat(f)
        parts.append([os.path.realpath(f), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return json.dumps(parts)


def _read(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) else {}


def lookup(key: str) -> str | None:
    path = cache_path()
    return None if path is None else _read(path).get(key)


def store(key: str, sha256: str) -> None:
    path = cache_path()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        values = _read(path)
        values.pop(key, None)
        values[key] = sha256                                  # newest last
        kept = dict(list(values.items())[-MAX_ENTRIES:])
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint-sha256.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(kept, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass    # not writable: the next process hashes again (module docstring)
