"""Exact mode: a row's bits depend on the row, the model, the dtype, the device type and the library
versions only, not on the rows it is batched with nor on the intra-op thread count (issue 17; the
study: docs/reproducibility.md and tests/tools/repro/FINDINGS.md).

Two halves make it, each with the reason it is needed:

- **Fixed shapes per row** (Pipeline, exact=True): the UNet runs one forward per row, of a shape the
  row alone fixes (`rowwise_guided_eps`: [uncond_i, cond_i] for cfg != 1, [cond_i] for cfg == 1);
  each prompt is text-encoded alone; the VAE takes one image per call. Batch invariance cannot come
  from settings: fp32 MKL linears pick another kernel by their row count M (M = batch in the time
  embedding), and channels_last GroupNorm sums per-thread partials over N*H*W.
- **Thread pins** (`ExactNumerics`, CPU tensors only): the few ops whose result depends on how ATen
  or oneDNN splits the work between threads run on one thread. Every other op was measured
  thread-invariant at fixed shapes (MKL and oneDNN GEMMs from 12 rows, large convolutions,
  LayerNorm, NCHW or small GroupNorm, SDPA with 4 or more query tokens). The pinned ops:
    * GroupNorm on a channels_last input with H*W >= GROUPNORM_SPLIT_HW (ATen's per-thread
      partial sums over N*H*W);
    * silu, gelu, sigmoid (each thread's chunk ends in a scalar tail whose bits differ from the
      vectorised body, so the chunk boundaries, i.e. the thread count, move elements between them),
      from ELEMENTWISE_SERIAL elements up (below it ATen runs them on one thread anyway);
    * scaled_dot_product_attention with fewer than FEW_QUERIES query tokens (the 1x1, 1x2 or 1x3
      middle block of 64 px and of non-square images such as 128x64);
    * linear (F.linear, so every nn.Linear) with fewer than LINEAR_PIN_ROWS rows (the tokens times
      the batch of a small deep level, e.g. 136x64, or a cfg 1 row at 192x128: MKL's fp32 sgemm
      splits such calls by thread count);
    * oneDNN's packed convolution (PackedConv2d) when its output work B*OH*OW*C_out per thread is
      below CONV_PIN_WORK (oneDNN's fp32 blocking depends on the thread count for small outputs;
      the threshold is empirical, for oneDNN 3.12 on AVX512, checked up to 16 threads).
  The measurements behind the thresholds: docs/reproducibility.md, "Where the dependence enters".
- **MKL's strict mode** (`mkl_strict`): on some CPUs (Intel Xeons with AMX) MKL's fp32 GEMM splits
  the sum over K between threads for calls of a few hundred rows, so most linears of a UNet's deep
  levels follow the thread count; pins would run most of them on one thread. MKL's strict
  conditional-numerical-reproducibility mode (batchsd.MKL_CBWR_STRICT) keeps MKL's code path for the
  CPU and fixes the split (shapes and cost: docs/reproducibility.md). MKL reads the setting at its
  first call, so `import batchsd` sets it (batchsd/__init__.py); an exact Pipeline checks that it
  took and warns where it did not (torch's first product ran before batchsd was imported, or the
  user set MKL_CBWR to another value).

`ExactNumerics` is a torch function mode that an exact Pipeline enters around its model calls
(text encoders, each UNet forward, the VAE), so it is active for those calls on that thread only
(the mode stack is thread-local): no torch function is replaced, other pipelines and threads are
untouched. It is a mode rather than class swaps of the modules because the pinned functions are
called inside the models' forwards (vae.ResnetBlock's F.silu, the GEGLU gate, the text encoders'
activations): a mode covers every module of every family without copying their forwards.

On CUDA only the fixed shapes apply (no pins); whether that is bitwise stable there is not
measured. Bits still depend on the CPU's kernel dispatch (ISA, AMX), so two kinds of CPU give
different bits; the device type recorded with a result is "cpu", not the CPU model. In bf16 on CPUs
with AMX, oneDNN's products follow the thread count at most of the UNet's shapes and no pin covers
them (docs/reproducibility.md): there exact mode gives batch invariance only.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from batchsd import MKL_CBWR_STRICT
from batchsd.errors import InputError

GROUPNORM_SPLIT_HW = 1024     # ATen's channels_last GroupNorm sums per-thread partials from this H*W up
ELEMENTWISE_SERIAL = 32768    # ATen's GRAIN_SIZE: an elementwise op on fewer elements runs on one thread anyway
CONV_PIN_WORK = 16384         # pin a packed conv whose B*OH*OW*C_out per thread is below this
FEW_QUERIES = 4              # pin SDPA with fewer query tokens
LINEAR_PIN_ROWS = 12         # pin a linear with fewer rows


_CBWR_ALL, _CBWR_STRICT_BIT = -1, 0x10000    # mkl_cbwr.h: ask for the whole mode; its strict bit


@functools.lru_cache(maxsize=1)
def mkl_strict() -> bool | None:
    """Whether MKL runs in strict reproducible mode in this process (the module docstring); None
    where torch has no MKL to ask (no such library or symbol: another BLAS, another platform)."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    return bool(get(_CBWR_ALL) & _CBWR_STRICT_BIT)


def warn_unless_mkl_strict(log: logging.Logger) -> bool | None:
    """mkl_strict(), with a warning that names the fix when MKL is there and not strict."""
    strict = mkl_strict()
    if strict is False:
        log.warning("exact mode: MKL is not in its strict reproducible mode in this process (MKL_CBWR=%s), so "
                    "fp32 rows may depend on the thread count on this CPU; set MKL_CBWR=%s, or import "
                    "batchsd before torch computes its first product", os.environ.get("MKL_CBWR", "unset"),
                    MKL_CBWR_STRICT)
    return strict


def default_exact(device_type: str, compile: str | None = None) -> bool:
    """The default: on for the CPU (where batching buys little, so exactness costs little: figures in
    docs/reproducibility.md), off on CUDA (its cost there is not measured) and under torch.compile
    (whose kernels the pins do not cover)."""
    return device_type == "cpu" and not compile


def resolve_exact(exact: bool | None, device_type: str, compile: str | None = None) -> bool:
    """`exact` as asked (None: `default_exact`); InputError for exact with torch.compile."""
    if exact is None:
        return default_exact(device_type, compile)
    if exact and compile:
        raise InputError("exact mode and --compile do not go together: the compiled kernels are not covered by "
                         "exact mode's pins; drop --compile, or pass --no-exact")
    return bool(exact)


@contextlib.contextmanager
def one_thread():
    """Run the block on one intra-op thread, then restore the thread count."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _on_cpu(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "cpu"


def _pin_elementwise(args, kwargs) -> bool:
    x = args[0] if args else kwargs.get("input")
    return _on_cpu(x) and x.numel() >= ELEMENTWISE_SERIAL


def _pin_group_norm(args, kwargs) -> bool:
    x = args[0] if args else kwargs.get("input")
    if not _on_cpu(x) or x.dim() != 4:
        return False
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return channels_last and x.shape[2] * x.shape[3] >= GROUPNORM_SPLIT_HW


def _pin_few_queries(args, kwargs) -> bool:
    q = args[0] if args else kwargs.get("query")
    return _on_cpu(q) and q.shape[-2] < FEW_QUERIES


def _pin_few_rows(args, kwargs) -> bool:
    x = args[0] if args else kwargs.get("input")
    return _on_cpu(x) and x.dim() >= 1 and x.numel() < LINEAR_PIN_ROWS * x.shape[-1]


def _pin_small_conv(args, kwargs) -> bool:
    """torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups, ...)."""
    x, weight = args[0], args[1]
    if not _on_cpu(x) or x.dim() != 4:
        return False
    padding, stride, dilation = args[3], args[4], args[5]
    out_hw = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
              for i in (0, 1)]
    work = x.shape[0] * out_hw[0] * out_hw[1] * weight.shape[0]
    return work < CONV_PIN_WORK * torch.get_num_threads()


# function -> whether this call runs on one thread
_PINS: dict[object, Callable] = {
    F.group_norm: _pin_group_norm,
    F.silu: _pin_elementwise,
    F.gelu: _pin_elementwise,
    torch.sigmoid: _pin_elementwise,
    torch.Tensor.sigmoid: _pin_elementwise,
    F.scaled_dot_product_attention: _pin_few_queries,
    F.linear: _pin_few_rows,
    torch.ops.mkldnn._convolution_pointwise: _pin_small_conv,
}


class ExactNumerics(TorchFunctionMode):
    """While active (on this thread): the thread-dependent ops of the module docstring run on one
    intra-op thread; every other call passes through unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        pin = _PINS.get(func)
        if pin is not None and torch.get_num_threads() > 1 and pin(args, kwargs):
            with one_thread():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def exact_numerics(on: bool, device: torch.device):
    """The context Pipeline.generate runs in: ExactNumerics when exact on the CPU, else nothing."""
    return ExactNumerics() if on and device.type == "cpu" else contextlib.nullcontext()


def rowwise_guided_eps(unet: Callable, cond: torch.Tensor, uncond: torch.Tensor, scales: Sequence[float],
                       y_cond: torch.Tensor | None, y_uncond: torch.Tensor | None, *, dtype: torch.dtype,
                       memory_format: torch.memory_format, device: torch.device):
    """eps(x, t) with classifier-free guidance, one UNet forward per row, of a shape the row fixes:
    x [x_i, x_i] with context [uncond_i, cond_i] (batch 2) for cfg != 1, x_i with cond_i (batch 1)
    for cfg == 1; y_cond/y_uncond (the UNet's vector input, SDXL's) likewise when given. Guidance
    then combines as the batched path does, e = e_uncond + s * (e_cond - e_uncond) with s a float32
    tensor, under ExactNumerics on the CPU."""
    scale = [torch.tensor([s], dtype=torch.float32, device=device).view(-1, 1, 1, 1) for s in scales]
    def row_input(u: torch.Tensor, c: torch.Tensor, i: int) -> torch.Tensor:
        """Row i's [uncond_i, cond_i] (guided) or cond_i."""
        return torch.cat([u[i:i + 1], c[i:i + 1]]) if scales[i] != 1.0 else c[i:i + 1]

    # each row's context (and vector) built once: the same tensors at every step, whose cross-attention
    # projections the UNet may keep (fast/context_projections.py)
    contexts = [row_input(uncond, cond, i) for i in range(len(scales))]
    extras = [() if y_cond is None else (row_input(y_uncond, y_cond, i),) for i in range(len(scales))]

    def eps_model(x: torch.Tensor, t: float) -> torch.Tensor:
        outs = []
        for i, s in enumerate(scales):
            row, guided = slice(i, i + 1), s != 1.0
            x_in = torch.cat([x[row], x[row]]) if guided else x[row]
            context, extra = contexts[i], extras[i]
            timesteps = torch.full((x_in.shape[0],), float(t), dtype=torch.float32, device=x.device)
            with exact_numerics(True, device):
                out = unet(x_in.to(dtype).contiguous(memory_format=memory_format), timesteps, context, *extra).float()
            if guided:
                eps_uncond, eps = out[:1], out[1:]
                out = eps_uncond + scale[i] * (eps - eps_uncond)
            outs.append(out)
        return torch.cat(outs)

    return eps_model
