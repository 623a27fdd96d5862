"""Where a model's parts (text encoders, UNet, VAE) are held while rows run: `Pipeline` wraps each
use of a part in `residency.using(part)`.

- `AllHeld`: every part on the run's device the whole time (Pipeline.load's default, and CUDA's).
- `GpuOffload` (`--low-memory` on CUDA): a part sits on the GPU only while it is used, in CPU memory
  otherwise.
- `CpuReread` (`--low-memory` on the CPU): the text encoders and the UNet are never held together.
  The UNet is not read at load; using the text encoders frees the UNet, using the UNet frees the text
  encoders, and a freed part is read again from the checkpoint (`checkpoint.read_part`) when it is
  next used. The VAE is held throughout (it is small). The weights held are then the larger of the
  two parts, not their sum; the price is reading a part again each time the work switches between
  encoding prompts and denoising (`Pipeline.encode_ahead` makes that once per many batches).
  `batchsd run` turns it on for the CPU (devices.default_low_memory).

The same bits either way: a part read again is read and converted exactly as at load, its speed
paths (packed convolutions, Winograd, fused kernels: marks on the modules, which survive a release)
rebuild their derived weights from it, and adapters (model/lora.py) are hooks that read the weights
at each call.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from batchsd.model.fast.allocator import release_free_memory
from batchsd.model.fast.packed_conv import PackedConv2d


def is_released(module: nn.Module) -> bool:
    """Whether `module`'s tensors are on the meta device (deferred at load, or released)."""
    return any(p.is_meta for p in module.parameters())


def release(module: nn.Module) -> None:
    """Free `module`'s weights: every parameter and buffer to the meta device, derived weights dropped
    (KeepsDerivedWeight, PackedConv2d's packed copy), the pages handed back to the kernel."""
    for m in module.modules():
        if isinstance(m, PackedConv2d) and m.packed is not None:
            # not `unpack()`: that would rebuild the plain weight only to drop it
            shape = (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
            dtype, m.packed = m.packed.dtype, None
            m.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)
    module.to("meta")
    release_free_memory()


class AllHeld:
    """Every part held on the run's device throughout."""

    @contextlib.contextmanager
    def using(self, part: nn.Module) -> Iterator[None]:
        yield


class GpuOffload(AllHeld):
    """CUDA low memory: a part sits on the GPU only while it is used."""

    def __init__(self, device: torch.device):
        self.device = device

    @contextlib.contextmanager
    def using(self, part: nn.Module) -> Iterator[None]:
        part.to(self.device)
        try:
            yield
        finally:
            part.to("cpu")
            torch.cuda.empty_cache()


class CpuReread(AllHeld):
    """CPU low memory: `text` (the text encoders) and `unet` never held together; a part freed for
    the other is read again from the checkpoint at `path` when next used (the module docstring).
    `after_unet_read(unet)` runs after each read of the UNet (Pipeline: packing its convolutions)."""

    def __init__(self, model: nn.Module, path: Path, files_stamp: str, dtype: torch.dtype,
                 memory_format: torch.memory_format, text: nn.Module, unet: nn.Module,
                 after_unet_read: Callable[[nn.Module], None]):
        self.model, self.path, self.files_stamp = model, path, files_stamp
        self.dtype, self.memory_format = dtype, memory_format
        self.text, self.unet = text, unet
        self.after_unet_read = after_unet_read
        self.reads = {"text": 0, "unet": 0}          # reads of each part after load (tests, bench)

    @contextlib.contextmanager
    def using(self, part: nn.Module) -> Iterator[None]:
        if part is self.text:
            self._hold(self.text, "text", free=self.unet)
        elif part is self.unet:
            self._hold(self.unet, "unet", free=self.text)
        yield

    def _hold(self, part: nn.Module, name: str, free: nn.Module) -> None:
        from batchsd.model.checkpoint import read_part

        if not is_released(free):
            release(free)
        if is_released(part):
            for sub in part.children() if isinstance(part, nn.ModuleList) else [part]:
                read_part(self.path, self.model, sub, self.dtype, self.memory_format, self.files_stamp)
            self.reads[name] += 1
            if part is self.unet:
                self.after_unet_read(part)
