"""What the checkpoint loader tells the kernel about memory pages (madvise), to load faster and
smaller; neither changes a byte that is loaded.

- `PageDropper`: drops the pages of a tensor read through a private file mapping (torch.load mmap)
  once it has been copied out, so the mapping does not accumulate the whole file in the process.
- `populate_ahead`: while the loader reads the checkpoint into freshly allocated model tensors on
  one thread, another thread has the kernel map and zero their pages first (MADV_POPULATE_WRITE),
  in the order the loader fills them. A page written for the first time otherwise costs the reading
  thread a page fault; this way the faults are taken on the other core, ahead of the reads.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

log = logging.getLogger(__name__)

MADV_DONTNEED = 4
MADV_POPULATE_WRITE = 23   # Linux 5.14+; older kernels answer EINVAL


@lru_cache(maxsize=None)
def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's madvise(addr, length, advice) -> 0 or -1 (errno set); None where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def _whole_pages(tensor: torch.Tensor) -> tuple[int, int]:
    """[lo, hi): the whole pages inside a dense tensor's memory (empty when none: the partial pages at
    its ends may be shared with neighbours and are left alone)."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    return -(-start // page) * page, end // page * page


class PageDropper:
    """Call with a tensor that was read through a private file mapping of one of `files`, once it has
    been copied out: its pages are dropped (MADV_DONTNEED).

    Only addresses inside a mapping of one of the checkpoint's own files are touched (found in
    /proc/self/maps); dropped pages of a private file mapping that was never written to are read
    again from the file on the next access, so no data can be lost. No-op where unsupported.
    """

    def __init__(self, files: Iterable[Path]):
        self.ranges: list[tuple[int, int]] = []
        names = {os.path.realpath(f) for f in files}
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5].rstrip("\n") in names and parts[1].endswith("p"):
                        start, end = (int(x, 16) for x in parts[0].split("-"))
                        self.ranges.append((start, end))
        except OSError:
            self.ranges = []
        self.madvise = _madvise() if self.ranges else None

    def __call__(self, tensor: torch.Tensor) -> None:
        lo, hi = _whole_pages(tensor)
        if self.madvise is not None and hi > lo and any(a <= lo and hi <= b for a, b in self.ranges):
            self.madvise(lo, hi - lo, MADV_DONTNEED)


def _populate(madvise: Callable[[int, int, int], int], tensors: Sequence[torch.Tensor], stop: threading.Event) -> None:
    for t in tensors:
        if stop.is_set():
            return
        lo, hi = _whole_pages(t)
        if hi > lo and madvise(lo, hi - lo, MADV_POPULATE_WRITE) != 0:
            # only speed is lost: each page is still mapped when the loader first writes it
            log.debug("MADV_POPULATE_WRITE refused (errno %d); pages fault on first write", ctypes.get_errno())
            return


@contextlib.contextmanager
def populate_ahead(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Map the pages of freshly allocated CPU tensors on a second thread, in their order, while the
    body fills them in the same order; waits for the thread on exit. `madvise` runs without the GIL
    (ctypes releases it), so the two threads overlap."""
    cpu = [t for t in tensors if t.device.type == "cpu" and t.numel()]
    madvise = _madvise()
    if not cpu or madvise is None:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=_populate, args=(madvise, cpu, stop), name="batchsd-populate", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
