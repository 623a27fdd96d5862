"""The fused bf16 attention kernel (batchsd/model/fast/fused_attention.py) against a float64
reference and torch's own bf16 scaled_dot_product_attention, its invariances, and the rules that
pick it (devices.default_attention) and its source (fused_attention.kernel_source). The numerical
tests check the kernel this machine runs: the tile kernel (attention_amx.cpp) on CPUs with AMX, the
vector kernel (attention_bf16.cpp) on the others; both sources are compiled everywhere."""
from __future__ import annotations

import ctypes
import logging
import re

import pytest
import torch
import torch.nn.functional as F

from batchsd.errors import InputError
from batchsd.model import pipeline as pipeline_module
from batchsd.model.devices import CpuKind, default_attention, has_avx512_bf16
from batchsd.model.fast import fused_attention as fa
from batchsd.model.pipeline import GenerationRow, Pipeline
from batchsd.model.unet import CrossAttention


@pytest.fixture(scope="module")
def kernel_here():
    if not has_avx512_bf16():
        pytest.skip("this CPU has no avx512-bf16: the fused kernel does not run here")
    if (why := fa.available()) is not None:
        pytest.skip(f"the fused kernel cannot be built here: {why}")


def heads(b: int, n: int, h: int, d: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """[B, H, N, d] bf16 as the UNet makes them: a transposed view of [B, N, H*d] (strided, not
    contiguous)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, h * d, generator=g) * scale
    return x.to(torch.bfloat16).view(b, n, h, d).transpose(1, 2)


# (batch, heads, queries, keys, head size): SD 1.5's three head sizes, SDXL's 64, cross-attention to
# 77 tokens, and sizes with tails in every blocking of either kernel (24- and 32-row query blocks,
# 16- and 32-key blocks, 64-key tiles, odd key counts for the key pairs, 16-channel head vectors,
# 32-channel tile rows)
SHAPES = [(2, 8, 256, 256, 40), (2, 8, 64, 64, 80), (1, 8, 16, 16, 160), (2, 4, 130, 130, 64),
          (2, 8, 200, 77, 40), (1, 3, 37, 19, 38), (1, 2, 5, 1, 2), (1, 1, 25, 83, 250), (2, 2, 49, 65, 16)]


@pytest.mark.parametrize("b,h,n,m,d", SHAPES)
def test_fused_attention_is_as_close_to_float64_as_torch_bf16(kernel_here, b, h, n, m, d):
    """Its error against float64 (on the same bf16 inputs) is no larger than torch's bf16 SDPA's by
    more than 25% (max) and 10% (mean): both round the probabilities and the output to bf16."""
    q, k, v = heads(b, n, h, d, 1.5, 1), heads(b, m, h, d, 1.0, 2), heads(b, m, h, d, 1.0, 3)
    assert fa.supports(q, k, v)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    out = fa.fused_attention(q, k, v)
    torch_out = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    err, torch_err = (out.double() - ref).abs(), (torch_out.double() - ref).abs()
    assert err.max() <= 1.25 * torch_err.max() + 1e-6, (err.max(), torch_err.max())
    assert err.mean() <= 1.10 * torch_err.mean() + 1e-7, (err.mean(), torch_err.mean())
    assert err.max() < 0.02          # and in absolute terms, against |v| ~ 1


def test_fused_attention_output_layout_makes_the_unet_reshape_free(kernel_here):
    q, k, v = heads(2, 10, 8, 40), heads(2, 10, 8, 40, seed=1), heads(2, 10, 8, 40, seed=2)
    out = fa.fused_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()


def test_fused_attention_bits_depend_on_the_row_only(kernel_here):
    """Exact mode's contract (fast/exact.py): the same bits at 1 and 2 threads, and a row's result
    is the same whether its batch holds other rows or not."""
    q, k, v = heads(3, 100, 4, 40, 1.5), heads(3, 100, 4, 40, seed=1), heads(3, 100, 4, 40, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fa.fused_attention(q, k, v)
        torch.set_num_threads(2)
        two = fa.fused_attention(q, k, v)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    alone = fa.fused_attention(q[1:2], k[1:2], v[1:2])
    assert torch.equal(alone[0], two[1])
    assert not torch.equal(two[0], two[1])


def test_supports_only_what_the_kernel_takes():
    q = heads(1, 8, 2, 40)
    assert fa.supports(q, q, q)
    assert not fa.supports(q.float(), q.float(), q.float())                 # bf16 only
    odd = heads(1, 8, 2, 41)
    assert not fa.supports(odd, odd, odd)                                   # even head sizes
    wide = heads(1, 8, 1, 258)
    assert not fa.supports(wide, wide, wide)                                # at most MAX_HEAD
    t = torch.randn(1, 2, 40, 8).to(torch.bfloat16).transpose(2, 3)         # last dim strided
    assert not fa.supports(t, t, t)
    empty = heads(1, 0, 2, 40)
    assert not fa.supports(q, empty, empty)                                 # no keys


def test_auto_attention_is_keyed_on_the_cpu_kind():
    """--attention auto: fused for bf16 on CPUs with avx512-bf16, AMX or not (devices.py's table)."""
    cpu = torch.device("cpu")
    dot, plain, amx = CpuKind("AVX512", False, avx512_bf16=True), CpuKind("AVX512", False), \
        CpuKind("AVX512", True, avx512_bf16=True)
    assert default_attention(cpu, torch.bfloat16, dot) and default_attention(cpu, torch.bfloat16, amx)
    assert not default_attention(cpu, torch.bfloat16, plain)
    assert not default_attention(cpu, torch.float32, dot) and not default_attention(torch.device("cuda"), torch.bfloat16, dot)


def test_the_kernel_is_chosen_by_the_cpu_kind(monkeypatch):
    """The tile kernel where AMX tiles are usable, the vector kernel elsewhere: a rule of the CPU, so
    that one machine runs the same code on every run."""
    monkeypatch.setattr(fa, "cpu_kind", lambda: CpuKind("AVX512", True, avx512_bf16=True))
    assert fa.kernel_source() is fa.AMX
    monkeypatch.setattr(fa, "cpu_kind", lambda: CpuKind("AVX512", False, avx512_bf16=True))
    assert fa.kernel_source() is fa.AVX512_BF16
    assert {fa.AMX.symbol, fa.AVX512_BF16.symbol} == {"batchsd_attention_amx", "batchsd_attention_bf16"}


@pytest.mark.parametrize("source", [fa.AVX512_BF16, fa.AMX], ids=["avx512-bf16", "amx"])
def test_both_kernels_compile_on_any_machine(source, monkeypatch, tmp_path):
    """Each source builds (compiling needs no such CPU), so a kernel that only an AMX machine runs
    cannot break unseen; what each computes is checked above on the machines that have it."""
    if fa.shutil.which(__import__("os").environ.get("CXX") or "g++") is None:
        pytest.skip("no C++ compiler here")
    monkeypatch.setenv("BATCHSD_CACHE_DIR", str(tmp_path))
    try:
        built = fa.build(source)
    except fa.KernelUnavailable as e:
        # only an older compiler that rejects the flags themselves is skipped, not an error in the source
        if re.search(r"(unrecognized|unknown) (command[- ]line option|argument).*-mamx", str(e)):
            pytest.skip(f"this compiler does not know the AMX flags: {e}")
        raise
    assert built.is_file() and built.name.startswith(source.path.stem + "-")
    assert hasattr(ctypes.CDLL(str(built)), source.symbol)   # loading runs none of its instructions


def test_the_kernel_leaves_torch_bf16_matmuls_as_they_were(kernel_here):
    """The tile kernel loads its own tile configuration on torch's OpenMP threads and puts torch's
    back (torch's brgemm keeps one between calls): bf16 products after a kernel call equal those before."""
    g = torch.Generator().manual_seed(5)
    a, w = torch.randn(300, 640, generator=g).bfloat16(), torch.randn(320, 640, generator=g).bfloat16()
    qa, ka = torch.randn(2, 4, 200, 64, generator=g).bfloat16(), torch.randn(2, 4, 200, 64, generator=g).bfloat16()
    before = (F.linear(a, w), a @ w.T, F.scaled_dot_product_attention(qa, ka, ka))
    q = heads(2, 100, 8, 40)
    fa.fused_attention(q, q, q)
    after = (F.linear(a, w), a @ w.T, F.scaled_dot_product_attention(qa, ka, ka))
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_cpu_flags_are_read(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert has_avx512_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16x\n")
    assert not has_avx512_bf16(str(info))
    assert not has_avx512_bf16(str(tmp_path / "missing"))


def _count_fused(pipe) -> int:
    return sum(1 for m in pipe.model.unet.modules() if getattr(m, "fused", False))


def test_pipeline_marks_the_unet_by_the_rule(kernel_here, monkeypatch):
    monkeypatch.setattr(pipeline_module, "cpu_kind", lambda: CpuKind("AVX512", False, avx512_bf16=True))
    pipe = Pipeline.load("tiny", device="cpu", dtype="bf16")
    attentions = sum(isinstance(m, CrossAttention) for m in pipe.model.unet.modules())
    assert pipe.fused_attention and attentions > 0 and _count_fused(pipe) == attentions
    assert not Pipeline.load("tiny", device="cpu", dtype="bf16", fused_attention=False).fused_attention
    assert not Pipeline.load("tiny", device="cpu", dtype="fp32").fused_attention
    monkeypatch.setattr(pipeline_module, "cpu_kind", lambda: CpuKind("AVX512", False))
    pipe = Pipeline.load("tiny", device="cpu", dtype="bf16")
    assert not pipe.fused_attention and _count_fused(pipe) == 0
    assert Pipeline.load("tiny", device="cpu", dtype="bf16", fused_attention=True).fused_attention
    with pytest.raises(InputError, match="bf16 on the CPU"):
        Pipeline.load("tiny", device="cpu", dtype="fp32", fused_attention=True)


def test_a_kernel_that_cannot_be_built_is_said(monkeypatch, tmp_path, caplog):
    """auto: torch's attention, a warning that says why, and the Pipeline records it; asked for: an
    InputError naming the compiler."""
    monkeypatch.setattr(pipeline_module, "cpu_kind", lambda: CpuKind("AVX512", False, avx512_bf16=True))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("BATCHSD_CACHE_DIR", str(tmp_path / "cache"))
    fa.kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="batchsd.model.pipeline"):
            pipe = Pipeline.load("tiny", device="cpu", dtype="bf16")
        assert not pipe.fused_attention and _count_fused(pipe) == 0
        assert "no-such-compiler" in caplog.text and "fused attention unavailable" in caplog.text
        with pytest.raises(InputError, match="no-such-compiler"):
            Pipeline.load("tiny", device="cpu", dtype="bf16", fused_attention=True)
    finally:
        fa.kernel.cache_clear()


def test_a_compile_error_is_said(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setenv("BATCHSD_CACHE_DIR", str(tmp_path / "cache"))
    if fa.shutil.which("g++") is None and not __import__("os").environ.get("CXX"):
        pytest.skip("no C++ compiler here")
    with pytest.raises(fa.KernelUnavailable, match="broken.cpp .*failed"):
        fa.build(fa.KernelSource(broken, fa.FLAGS, "batchsd_attention_bf16"))
    assert not list((tmp_path / "cache" / "kernels").glob("*.tmp"))   # nothing half-written is left


def test_the_build_is_cached_per_source_and_compiler(kernel_here, monkeypatch, tmp_path):
    monkeypatch.setenv("BATCHSD_CACHE_DIR", str(tmp_path))
    first = fa.build()
    assert first.parent == tmp_path / "kernels" and first.is_file()
    mtime = first.stat().st_mtime_ns
    assert fa.build() == first and first.stat().st_mtime_ns == mtime       # found, not built again


def test_bf16_images_with_the_fused_kernel_stay_as_close_to_fp32(kernel_here):
    """The tiny model's bf16 latents with the fused kernel are no further from fp32's than with torch's
    attention (by 10%), and a row's latents do not depend on its batch."""
    rows = [GenerationRow(prompt=p, seed=s, steps=3, width=64, height=96, cfg_scale=6.0)
            for s, p in enumerate(["a cat", "a dog on a hill", "a red house", "snow"])]
    ref = Pipeline.load("tiny", dtype="fp32").generate(rows).latents
    fused = Pipeline.load("tiny", dtype="bf16", fused_attention=True)
    plain = Pipeline.load("tiny", dtype="bf16", fused_attention=False)
    out, torch_out = fused.generate(rows).latents, plain.generate(rows).latents
    err = ((out - ref).norm() / ref.norm()).item()
    torch_err = ((torch_out - ref).norm() / ref.norm()).item()
    assert err <= 1.10 * torch_err and err < 0.05, (err, torch_err)
    assert not torch.equal(out, torch_out)                 # the kernel did run
    assert fused.exact and torch.equal(fused.generate(rows[2:3]).latents[0], out[2])


def test_a_cpu_without_avx512_bf16_never_loads_the_kernel(monkeypatch):
    """Asked for on such a CPU, the kernel is refused with the reason (loading it would stop the
    process with an illegal instruction at the first call)."""
    monkeypatch.setattr(fa, "has_avx512_bf16", lambda: False)
    fa.kernel.cache_clear()
    try:
        assert "avx512-bf16" in fa.available()
        with pytest.raises(InputError, match="avx512-bf16"):
            Pipeline.load("tiny", device="cpu", dtype="bf16", fused_attention=True)
    finally:
        fa.kernel.cache_clear()


def test_without_a_cache_the_build_leaves_nothing_behind(kernel_here, monkeypatch, tmp_path):
    monkeypatch.setenv("BATCHSD_CACHE_DIR", "off")
    monkeypatch.setattr(fa.tempfile, "tempdir", str(tmp_path))
    fa.kernel.cache_clear()
    try:
        q = heads(1, 30, 2, 40)
        out = fa.fused_attention(q, q, q)
        assert torch.allclose(out.float(), F.scaled_dot_product_attention(q, q, q).float(), atol=2e-2)
        assert list(tmp_path.iterdir()) == []
    finally:
        fa.kernel.cache_clear()
