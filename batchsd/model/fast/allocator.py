"""The CPU allocator setting of a batch run: `tune_cpu_allocator`, `release_free_memory`.

glibc malloc normally maps fresh zeroed pages for every allocation above its mmap threshold and
unmaps them on free; the VAE decode and the UNet make many such large, short-lived allocations, so
each one pays page faults. Tuned, malloc serves every allocation from its heap and keeps freed
memory for reuse: the faults go away and the decode is faster. The cost: freed blocks stay in the
process, so its peak memory grows where they cannot be reused (figures: docs/performance.md).
`batchsd run` tunes it on the CPU; `release_free_memory` returns what is known to be done with
(weights replaced by their packed copies). Neither changes any result.
"""
from __future__ import annotations

import ctypes
import ctypes.util

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1               # an int: keep up to 2 GiB of free memory at the heap's top
_allocator_tuned: bool | None = None
_malloc_trim = None                      # libc.malloc_trim once the allocator is tuned


def tune_cpu_allocator() -> bool:
    """Make glibc malloc keep freed memory for reuse (see the module docstring). Process-wide and
    idempotent; returns False where there is no glibc mallopt (other libcs, other systems)."""
    global _allocator_tuned, _malloc_trim
    if _allocator_tuned is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            _allocator_tuned = False
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok_mmap = mallopt(_M_MMAP_MAX, 0) == 1          # no per-allocation mmap (heap only)
            ok_trim = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            _allocator_tuned = ok_mmap and ok_trim
            _malloc_trim = getattr(libc, "malloc_trim", None)
    return _allocator_tuned


def release_free_memory() -> None:
    """With the tuned allocator, give the kernel back the pages of freed heap memory (malloc_trim):
    for memory freed once that is not going to be reused soon, such as weights replaced by their
    packed copies. A no-op otherwise (glibc then unmaps large blocks on free by itself)."""
    if _allocator_tuned and _malloc_trim is not None:
        _malloc_trim(0)
