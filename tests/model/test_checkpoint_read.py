"""Reading a checkpoint's tensors into the model's dtype and layout (checkpoint_files._read_converted:
block by block through small buffers) and mapping their pages ahead of the reads (page_advice):
the values are torch's one-step conversion of the file's, bit for bit, whatever the block size."""
from __future__ import annotations

import mmap
import os
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import batchsd.model.checkpoint_files as checkpoint_files
from batchsd.model.checkpoint_files import Source, empty_for, read_into
from batchsd.model.page_advice import MADV_POPULATE_WRITE, _madvise, _whole_pages, populate_ahead

pytestmark = pytest.mark.usefixtures("one_thread")

FLOATS = [torch.float16, torch.bfloat16, torch.float32]


def every_16_bit_pattern(dtype: torch.dtype) -> torch.Tensor:
    """All 65536 values of a 16-bit float (infinities, NaNs, subnormals included), as [1024, 4, 4, 4]."""
    return torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(1024, 4, 4, 4)


def open_file(path, tensors: dict[str, torch.Tensor]) -> Source:
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    source = Source(path, path.suffix[1:], "single-file", [path])
    source.add_file(path, lambda keys: {k: k for k in keys}, None)
    return source


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaNs included (compared as NaN, their payloads aside)."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(
        ((a == b) | (a.isnan() & b.isnan())).all()) and torch.equal(a.signbit() & ~a.isnan(), b.signbit() & ~b.isnan())


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("chunk", [checkpoint_files.CONVERT_CHUNK, 100, 1])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("source_dtype,target", [(s, t) for s in FLOATS[:2] for t in FLOATS if s != t]
                         + [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
def test_read_converts_like_torch_bit_for_bit(tmp_path, monkeypatch, suffix, chunk, memory_format, source_dtype,
                                              target):
    """Every value of the file's dtype (16-bit ones: all bit patterns), read in blocks of `chunk`
    elements, into either layout, from either format: torch's direct conversion of the same tensor,
    in the layout asked for."""
    monkeypatch.setattr(checkpoint_files, "CONVERT_CHUNK", chunk)
    if source_dtype == torch.float32:
        values = torch.randn(1024, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 1e3
        values.view(-1)[:4] = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e-40])
    else:
        values = every_16_bit_pattern(source_dtype)
    with open_file(tmp_path / f"t{suffix}", {"w": values, "b": values[:, 0, 0, 0].contiguous()}) as source:
        for key, expected in (("w", values.to(target, memory_format=memory_format)), ("b", values[:, 0, 0, 0].to(target))):
            out = empty_for(source, key, target, torch.device("cpu"), memory_format)
            read_into(source, key, out)
            assert same_bits(out, expected), key
            assert out.is_contiguous(memory_format=memory_format if out.dim() == 4 else torch.contiguous_format)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def populate_supported() -> bool:
    """Whether this kernel takes MADV_POPULATE_WRITE (Linux 5.14+)."""
    madvise = _madvise()
    if madvise is None or not sys.platform.startswith("linux"):
        return False
    probe = torch.empty(1 << 16, dtype=torch.uint8)
    lo, hi = _whole_pages(probe)
    return hi <= lo or madvise(lo, hi - lo, MADV_POPULATE_WRITE) == 0


@pytest.mark.skipif(not populate_supported(), reason="the kernel has no MADV_POPULATE_WRITE (Linux < 5.14)")
def test_populate_ahead_maps_the_pages_and_keeps_what_was_written():
    """Freshly allocated tensors are resident after populate_ahead (their pages mapped by its thread,
    not by writes), and values written while the thread runs are not touched by it."""
    size = 64 << 20
    maps = [mmap.mmap(-1, size) for _ in range(4)]    # fresh anonymous pages, none resident yet
    tensors = [torch.frombuffer(m, dtype=torch.float32) for m in maps]
    before = resident_bytes()
    with populate_ahead(tensors):   # the thread stops when the body ends: the body waits for it
        tensors[3][:1000] = 7.0    # the last one, which the thread reaches after this write
        deadline = time.monotonic() + 60
        while resident_bytes() - before < 0.9 * 4 * size and time.monotonic() < deadline:
            time.sleep(0.01)
    assert resident_bytes() - before >= 0.9 * 4 * size
    assert torch.equal(tensors[3][:1000], torch.full((1000,), 7.0))
