"""Speed settings below the model code: a compiled UNet forward, the CPU allocator, host copies.

Each is measured in tests/bench (README there); none changes the arithmetic, only (compile) the
order of floating-point operations:

- `pack_convolutions`: on the CPU, each convolution's weight is reordered once into oneDNN's blocked
  layout (at its first call, for that input's shape) instead of on every call, as eager PyTorch
  does: fp32 weights over 32 MiB also cost fresh zeroed pages on every reorder. Same kernels, same
  results (bit-identical for channels_last inputs; tests/test_runtime.py). `pack_now` packs the
  large ones at load instead, largest first, so that the packed copies reuse the pages the plain
  weights free (Pipeline; `bench_levers.py --only packnow`: fp32 load + first image 1.1x faster,
  up to 1.4x where fresh pages cost more).
- `CompiledUNet`: `torch.compile` of the UNet (inductor), one graph per input shape (`dynamic=False`:
  a job has few shapes). Mode "reduce-overhead" also captures CUDA graphs on CUDA: each fixed
  shape replays one recorded graph per step instead of ~1,000 kernel launches. The first call per
  shape compiles; its time is kept in `compile_seconds` and reported by the run.
- `tune_cpu_allocator`: glibc malloc serves every allocation from its heap and keeps freed memory
  for reuse, instead of mapping fresh zeroed pages for each allocation over its mmap threshold and
  unmapping them on free. A fp32 VAE decode at 512x512 allocates ~6 GB that way per image (1.6 M
  page faults); the faults go to ~0 and the decode is ~1.5x faster. The cost: freed blocks stay in
  the process, so its peak grows where they cannot be reused (fp32 UNet step + decode at 512x512:
  5.0 -> 6.4 GiB). `batchsd run` sets it on the CPU; `release_free_memory` returns what is known to
  be done with.
- `to_host` / `host_array`: device results come back through pinned memory with a non-blocking copy,
  so the CPU converts one chunk to PNG-ready arrays while the GPU decodes the next.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1               # an int: keep up to 2 GiB of free memory at the heap's top
_allocator_tuned: bool | None = None
_malloc_trim = None                      # libc.malloc_trim once the allocator is tuned


def onednn_available() -> bool:
    """Whether this torch has the oneDNN (mkldnn) convolution ops that PackedConv2d uses."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class KeepsDerivedWeight:
    """Mixin for modules that keep a tensor computed from their own weights (a folded or transformed
    copy; not in the state dict): `derived(build, *tensors)` returns it, built again when the tensors
    are other tensors than last time; `.to()`/casts and `load_state_dict` (which writes in place)
    drop it. (Writing into a weight in place by hand is not seen.)"""

    _derived: tuple | None = None           # (identity of the tensors it was built from, the result)

    def derived(self, build, *tensors: torch.Tensor | None):
        key = tuple((id(t), t.data_ptr(), t.dtype, t.device) for t in tensors if t is not None)
        if self._derived is None or self._derived[0] != key:
            self._derived = None                                  # free the old one first
            with torch.no_grad():
                self._derived = (key, build())
        return self._derived[1]

    def _load_from_state_dict(self, *args, **kwargs):
        self._derived = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._derived = None
        return super()._apply(fn, recurse)


class PackedConv2d(nn.Conv2d):
    """An nn.Conv2d (same attributes, same state dict) whose weight, on the CPU, is kept in oneDNN's
    blocked layout after its first call instead of being reordered on every call.

    The plain weight is dropped once packed (no second copy in memory) and rebuilt exactly
    (`to_dense`) when the module is moved or cast (`.to()`), or its state dict is read; it is packed
    again at the next call. Inputs other than CPU float tensors take nn.Conv2d's path. The output is
    channels_last (oneDNN's native layout), which every op of the models accepts.
    """

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.padding_mode != "zeros":
            return super().forward(x)
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous(memory_format=torch.channels_last)  # oneDNN reads NCHW or NHWC strides only
        if self.packed is None:
            if self.weight.dtype != x.dtype:
                return super().forward(x)     # let nn.Conv2d raise its dtype error
            self.pack(x.shape)
            release_free_memory()             # the plain weight's pages, not kept for reuse (RSS)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.packed, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "none", [], "")

    def pack(self, input_shape: Sequence[int]) -> None:
        """Reorder the weight into oneDNN's blocked layout for inputs of `input_shape` [B, C, H, W] and
        drop the plain one (forward does this at the first call, for that call's shape)."""
        self.packed = torch.ops.mkldnn._reorder_convolution_weight(
            self.weight.detach(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
            list(input_shape))
        self.weight = None

    def unpack(self) -> None:
        """Back to a plain weight Parameter (exactly the one packed)."""
        if self.packed is not None:
            self.weight = nn.Parameter(self.packed.to_dense(), requires_grad=False)
            self.packed = None

    def _apply(self, fn, recurse=True):
        self.unpack()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.unpack()
        super()._save_to_state_dict(destination, prefix, keep_vars)


def pack_convolutions(module: nn.Module) -> int:
    """Turn every plain nn.Conv2d inside `module` into a PackedConv2d in place (attribute paths and
    checkpoint keys unchanged); returns how many. Convolutions whose weight other code reads directly
    (1x1 projections applied as matmuls) keep working: a module that is never called is never packed."""
    if not onednn_available():
        return 0
    count = 0
    for m in module.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = PackedConv2d
            count += 1
    return count


def pack_now(*modules: nn.Module, input_hw: tuple[int, int] = (64, 64)) -> int:
    """Pack now, largest weight first, the PackedConv2d inside `modules` that forward calls as
    convolutions: the 3x3 ones, and the folded 2x2 conv of each upsample (upsample.NearestUpsampleConv,
    built here), whose own 3x3 conv is only folded. The 1x1 ones stay to their first call (some
    modules read those weights as matrices). Then the freed pages go back once; returns how many.

    Why (start-up): packing at the first call, in forward order, writes every packed copy into fresh
    pages, since the weights grow along the UNet's encoder and no weight freed before fits the next
    one (fp32: 0.84 M page faults in the first UNet call). Largest first, each copy mostly lands in
    memory that a plain weight freed just before (0.03 M). The weight packed for any input size
    gives the same output bits at 4x4-64x64 maps, batch 2 and 16, at the same speed
    (`bench_levers.py --only packshape`), so `input_hw` is a nominal shape."""
    if not onednn_available():
        return 0
    convs: list[nn.Module] = []
    folded_from: set[int] = set()
    for m in (m for module in modules for m in module.modules()):
        if hasattr(m, "folded_conv"):                        # its own conv is folded, never called
            folded_from.add(id(m.conv))
            if isinstance(m.conv, PackedConv2d):
                convs.append(m.folded_conv())
        elif isinstance(m, PackedConv2d) and m.kernel_size != (1, 1):
            convs.append(m)
    convs = [c for c in convs if isinstance(c, PackedConv2d) and id(c) not in folded_from
             and not getattr(c, "winograd", False) and c.packed is None and c.weight is not None
             and c.weight.device.type == "cpu"]
    for conv in sorted(convs, key=lambda c: c.weight.numel(), reverse=True):
        conv.pack((1, conv.in_channels, *input_hw))
    release_free_memory()
    return len(convs)


class CompiledUNet:
    """The UNet's forward through torch.compile; called like the UNet: (x, timesteps, context) -> eps."""

    def __init__(self, unet: torch.nn.Module, mode: str, device: torch.device):
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}: use one of {', '.join(COMPILE_MODES)}")
        self.mode = mode
        self.forward = torch.compile(unet, mode=mode, dynamic=False)
        # CUDA graphs reuse their output buffers on the next replay: results are cloned out
        self.cudagraphs = mode == "reduce-overhead" and device.type == "cuda"
        self.compile_seconds: dict[tuple, float] = {}   # (x shape, context shape, dtype) -> first call's s

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
