"""Speed settings below the model code: a compiled UNet forward, the CPU allocator, host copies.

None of these change what is computed; each is measured in tests/bench (README there):

- `CompiledUNet`: `torch.compile` of the UNet (inductor), one graph per input shape (`dynamic=False`:
  a job has few shapes). Mode "reduce-overhead" also captures CUDA graphs on CUDA: each fixed
  shape replays one recorded graph per step instead of ~1,000 kernel launches. The first call per
  shape compiles; its time is kept in `compile_seconds` and reported by the run.
- `tune_cpu_allocator`: glibc malloc keeps freed activation memory instead of returning it to the
  kernel after every op, so a UNet forward stops paying page faults (zeroed pages) for the ~2 GB of
  activations it allocates and frees (measured: hundreds of thousands of faults per forward).
- `to_host` / `host_array`: device results come back through pinned memory with a non-blocking copy,
  so the CPU converts one chunk to PNG-ready arrays while the GPU decodes the next.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time

import numpy as np
import torch

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024    # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 2**31 - 1               # an int: keep up to 2 GiB of freed heap before trimming
_allocator_tuned: bool | None = None


class CompiledUNet:
    """The UNet's forward through torch.compile; called like the UNet: (x, timesteps, context) -> eps."""

    def __init__(self, unet: torch.nn.Module, mode: str, device: torch.device):
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}: use one of {', '.join(COMPILE_MODES)}")
        self.mode = mode
        self.forward = torch.compile(unet, mode=mode, dynamic=False)
        # CUDA graphs reuse their output buffers on the next replay: results are cloned out
        self.cudagraphs = mode == "reduce-overhead" and device.type == "cuda"
        self.compile_seconds: dict[tuple, float] = {}   # (x shape, context shape) -> first call's seconds

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), tuple(context.shape), x.dtype)
        first = key not in self.compile_seconds
        t0 = time.perf_counter()
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = self.forward(x, timesteps, context)
        if self.cudagraphs:
            out = out.clone()
        if first:
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            self.compile_seconds[key] = time.perf_counter() - t0
            log.info("compiled the UNet (%s) for %s in %.1f s", self.mode, tuple(x.shape), self.compile_seconds[key])
        return out


def tune_cpu_allocator() -> bool:
    """Make glibc malloc keep freed memory for reuse (see the module docstring). Process-wide and
    idempotent; returns False where there is no glibc mallopt (other libcs, other systems)."""
    global _allocator_tuned
    if _allocator_tuned is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            _allocator_tuned = False
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok_mmap = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
            ok_trim = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            _allocator_tuned = ok_mmap and ok_trim
    return _allocator_tuned


def to_host(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying a tensor to CPU memory: pinned and non-blocking from CUDA (with the event that
    says it is done), the tensor itself when it is already on the CPU."""
    if t.device.type != "cuda":
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(t.device))
    return host, done


def host_array(copy: tuple[torch.Tensor, torch.cuda.Event | None]) -> np.ndarray:
    """The numpy array of a `to_host` copy, once the copy has finished."""
    host, done = copy
    if done is not None:
        done.synchronize()
    return host.numpy()
