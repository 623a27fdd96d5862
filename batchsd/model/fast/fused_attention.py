"""Fused bf16 attention for the UNet on the CPU: one C++ kernel per kind of CPU, compiled once per
machine and loaded with ctypes.

    CPU                 source               both products by
    AMX                 attention_amx.cpp    TDPBF16PS on 16 x 16 tiles (the tile unit)
    avx512-bf16, no AMX attention_bf16.cpp   VDPBF16PS on 16-lane vectors

Why: torch's CPU flash attention runs bf16 at its fp32 rate without AMX (both products through a
generic GEMM), so in a bf16 UNet step it took about half the time; with AMX it is faster but its
softmax and head-size-40 products leave it at a quarter of the bf16 roof (docs/performance.md, "Where
the bf16 step goes"). The kernels run both products in bf16 and keep the softmax between them in
fp32, block by block in the cache. Which one runs is a rule of the CPU's kind (`kernel_source`), so
one machine runs the same code, and gives the same bits, on every run.

Building: the C++ source (no torch headers, so it compiles in about a second) is compiled with the
C++ compiler (`$CXX`, else `g++`) and its flags into

    $BATCHSD_CACHE_DIR/kernels/<source stem>-<hash>.so     (default: ~/.cache/batchsd, as hash_cache)

where the hash covers the source, the flags and the compiler's version, so a changed compiler or
source builds anew. The file is written under a temporary name and renamed, so processes that build
at once (a SLURM array) never load half a file. With the cache off (BATCHSD_CACHE_DIR=off) or not
writable, each process builds into a temporary folder, removed once the library is loaded.

The library links OpenMP with `-fopenmp`; libgomp.so.1 is then the one torch already loaded (the
same soname), so the kernel's threads are torch's OpenMP threads, and `torch.get_num_threads()`
sets how many it uses.

What it takes (`supports`): CPU bf16 tensors [B, H, L, d] whose last dimension is contiguous (any
other strides: the UNet's transposed views go in without a copy), an even head size d <= 256, at
least one key, no autograd. The UNet's attention calls it when its CrossAttention modules are
marked (`use_fused_attention`, which Pipeline applies by devices.default_attention's rule); any
other call shape goes to torch's scaled_dot_product_attention, a rule of the shapes alone.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from batchsd.model.devices import cpu_kind, has_avx512_bf16
from batchsd.model.hash_cache import cache_root

FLAGS = ("-O3", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16",
         "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared")


@dataclass(frozen=True)
class KernelSource:
    path: Path              # the C++ source
    flags: tuple[str, ...]  # the compiler's flags
    symbol: str             # the entry point, the same signature in every source


AVX512_BF16 = KernelSource(Path(__file__).with_name("attention_bf16.cpp"), FLAGS, "batchsd_attention_bf16")
AMX = KernelSource(Path(__file__).with_name("attention_amx.cpp"), FLAGS + ("-mamx-tile", "-mamx-bf16"),
                   "batchsd_attention_amx")
MAX_HEAD = 256                 # the kernel's widest head (16 vectors of 16 channels)
BUILD_TIMEOUT_S = 300
TEMP_PREFIX = "batchsd-kernels-"   # a per-process build folder (no writable cache), removed once loaded

_I64 = ctypes.c_int64


class KernelUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why (no compiler, its error)."""


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "g++"
    path = shutil.which(cxx)
    if path is None:
        raise KernelUnavailable(f"no C++ compiler: {cxx!r} is not on PATH (set $CXX to one)")
    return path


def kernel_source() -> KernelSource:
    """The kernel for this CPU: the tile kernel where AMX tiles are usable, else the vector one."""
    return AMX if cpu_kind().amx else AVX512_BF16


def _library_name(cxx: str, source: KernelSource) -> str:
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"the C++ compiler {cxx} does not run: {e}") from None
    digest = hashlib.sha256("\0".join([source.path.read_text(), " ".join(source.flags), version]).encode()).hexdigest()
    return f"{source.path.stem}-{digest[:16]}.so"


def build(source: KernelSource | None = None) -> Path:
    """The compiled library of `source` (default: kernel_source()), built now unless this machine's
    cache has it."""
    source = source or kernel_source()
    cxx = _compiler()
    name = _library_name(cxx, source)
    root = cache_root()
    folder = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX)) if root is None else root / "kernels"
    target = folder / name
    if target.is_file():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=folder)
        os.close(fd)
    except OSError:                      # a read-only cache: build where this process can write
        folder = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
        target, tmp = folder / name, str(folder / (name + ".tmp"))
    try:
        done = subprocess.run([cxx, *source.flags, str(source.path), "-o", tmp], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as e:
        Path(tmp).unlink(missing_ok=True)
        raise KernelUnavailable(f"building {source.path.name} with {cxx} failed: {e}") from None
    if done.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        first = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise KernelUnavailable(f"building {source.path.name} with {cxx} failed (exit {done.returncode}): {first}")
    os.replace(tmp, target)
    return target


@functools.lru_cache(maxsize=1)
def kernel():
    """The loaded entry point of kernel_source() (built on first use); KernelUnavailable when it cannot
    be had, or when the CPU lacks avx512-bf16 (the library would stop the process with an illegal
    instruction; every AMX CPU has it)."""
    if not has_avx512_bf16():
        raise KernelUnavailable("this CPU has no avx512-bf16 instructions, which the fused kernel needs")
    source = kernel_source()
    path = build(source)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelUnavailable(f"loading {path} failed: {e}") from None
    finally:
        if path.parent.name.startswith(TEMP_PREFIX):      # loaded (or not): the file is no longer needed
            shutil.rmtree(path.parent, ignore_errors=True)
    fn = getattr(lib, source.symbol)
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [_I64] * 5 + [ctypes.POINTER(_I64)] * 4 + [ctypes.c_float, ctypes.c_int]
    return fn


def available() -> str | None:
    """None when the kernel loads here, else why not."""
    try:
        kernel()
    except KernelUnavailable as e:
        return str(e)
    return None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether fused_attention takes these (the module docstring)."""
    d = q.shape[-1]
    return (q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and q.device.type == "cpu"
            and q.dtype == k.dtype == v.dtype == torch.bfloat16 and d % 2 == 0 and d <= MAX_HEAD
            and k.shape[-1] == d and v.shape[-1] == d and k.shape[2] == v.shape[2] >= 1
            and q.shape[:2] == k.shape[:2] == v.shape[:2]
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def _strides(t: torch.Tensor):
    return (_I64 * 3)(t.stride(0), t.stride(1), t.stride(2))


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q [B, H, N, d], k and v [B, H, M, d] (bf16, `supports`):
    [B, H, N, d], a transposed view of a contiguous [B, N, H, d] tensor, so that the UNet's
    transpose(1, 2).reshape(B, N, H*d) after it is free."""
    B, H, N, d = q.shape
    out = torch.empty(B, N, H, d, dtype=q.dtype).transpose(1, 2)
    if out.numel() == 0:
        return out
    with torch.profiler.record_function("batchsd::fused_attention"):     # seen by torch.profiler
        rc = kernel()(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, H, N, k.shape[2], d,
                      _strides(q), _strides(k), _strides(v), _strides(out), d ** -0.5, torch.get_num_threads())
    if rc == 1:
        raise MemoryError(f"fused attention: out of memory for q {tuple(q.shape)}, k {tuple(k.shape)}")
    if rc == 3:
        raise RuntimeError("fused attention: the operating system refused this process the AMX tiles")
    if rc != 0:
        raise RuntimeError(f"fused attention refused q {tuple(q.shape)}, k {tuple(k.shape)} (code {rc})")
    return out


def use_fused_attention(unet: nn.Module) -> int:
    """Marks every attention module of `unet` (those with a `fused` attribute: unet.CrossAttention)
    to call fused_attention where `supports` allows; returns how many. Loads the kernel first, so
    KernelUnavailable comes here, not at the first step."""
    kernel()
    marked = 0
    for m in unet.modules():
        if hasattr(m, "fused"):
            m.fused = True
            marked += 1
    return marked
