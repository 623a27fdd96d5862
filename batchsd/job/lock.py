"""One run per output folder (or per shard) at a time: an flock on the layout's lock file.

The kernel releases it when the process exits, even on SIGKILL, so a lock file left behind never
blocks a later run. A filesystem without flock (some Lustre mounts) runs unlocked.
"""
from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from batchsd.job.options import UsageError

_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)


@contextmanager
def out_dir_lock(out_dir: Path, lock_path: Path):
    """Hold `lock_path` (a RunLayout's lock) for the block; UsageError when another run holds it."""
    lock_path = Path(lock_path)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UsageError(f"cannot write to --out {out_dir} ({lock_path}: {e.strerror or e}); nothing was run: "
                         "choose a writable folder with --out") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            shard = lock_path.parent.name if lock_path.parent.name.startswith("shard-") else None
            raise UsageError(f"another batchsd run is writing to {out_dir}" + (f" as {shard}" if shard else "")
                             + "; wait for it or use another --out") from None
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
        yield
    finally:
        os.close(fd)


def is_locked(lock_path: Path) -> bool:
    """Whether a live process holds `lock_path` now (without taking it for longer than the test)."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False
