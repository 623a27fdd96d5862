"""The UNet forward through `torch.compile` (inductor): `CompiledUNet`.

One graph per input shape (`dynamic=False`: a job has few shapes). Mode "reduce-overhead" also
captures CUDA graphs on CUDA: each fixed shape replays one recorded graph per step instead of
launching every kernel from Python. The first call per shape compiles; its time is kept in
`compile_seconds` and reported by the run. Compiling changes only the order of floating-point
operations, not the arithmetic.
"""
from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


class CompiledUNet:
    """The UNet's forward through torch.compile; called like the UNet: (x, timesteps, context[, y]) -> eps."""

    def __init__(self, unet: torch.nn.Module, mode: str, device: torch.device):
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}: use one of {', '.join(COMPILE_MODES)}")
        self.mode = mode
        self.forward = torch.compile(unet, mode=mode, dynamic=False)
        # CUDA graphs reuse their output buffers on the next replay: results are cloned out
        self.cudagraphs = mode == "reduce-overhead" and device.type == "cuda"
        self.compile_seconds: dict[tuple, float] = {}   # (x shape, context shape, dtype) -> first call's s

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                 *y: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), tuple(context.shape), x.dtype)
        first = key not in self.compile_seconds
        t0 = time.perf_counter()
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = self.forward(x, timesteps, context, *y)
        if self.cudagraphs:
            out = out.clone()
        if first:
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            self.compile_seconds[key] = time.perf_counter() - t0
            log.info("compiled the UNet (%s) for %s in %.1f s", self.mode, tuple(x.shape), self.compile_seconds[key])
        return out
