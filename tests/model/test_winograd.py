"""Winograd F(2x2,3x3) convolutions (batchsd/model/fast/winograd.py) against F.conv2d."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from batchsd.model.config import TINY
from batchsd.model.devices import CpuKind
from batchsd.model.stable_diffusion import StableDiffusionModel
from batchsd.model.pipeline import GenerationRow, Pipeline
from batchsd.model.fast.packed_conv import onednn_available, pack_convolutions, PackedConv2d
from batchsd.model.fast.upsample import NearestUpsampleConv
from batchsd.model.fast.winograd import (WinogradConv2d, transform_weight, use_winograd, use_winograd_in_model,
                              winograd_conv3x3, winograd_eligible)

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN convolution ops")


def conv(ci: int, co: int, dtype=torch.float32, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    c = nn.Conv2d(ci, co, 3, padding=1).to(dtype).eval().requires_grad_(False)
    nn.init.normal_(c.bias)
    return c


@pytest.mark.parametrize("b,ci,co,h,w", [(1, 8, 16, 4, 4), (2, 16, 8, 5, 7), (3, 4, 4, 1, 1), (1, 8, 8, 2, 9),
                                         (2, 32, 32, 6, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_same_function_in_float64(b, ci, co, h, w, channels_last):
    c = conv(ci, co, torch.float64)
    x = torch.randn(b, ci, h, w, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got = winograd_conv3x3(x, transform_weight(c.weight), c.bias)
    expected = F.conv2d(x, c.weight, c.bias, padding=1)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-12 * expected.abs().max().item()
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_transform_of_a_delta_kernel_is_g_g_transposed():
    w = torch.zeros(1, 1, 3, 3)
    w[0, 0, 1, 1] = 1.0                          # the middle tap: G[:, 1] outer G[:, 1]
    u = transform_weight(w).view(4, 4)
    g1 = torch.tensor([0.0, 0.5, -0.5, 0.0])
    assert torch.equal(u, torch.outer(g1, g1))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 3e-2)])
def test_rounding_is_that_of_the_dtype(dtype, tol):
    c64 = conv(64, 32, torch.float64)
    c = copy.deepcopy(c64).to(dtype)
    x64 = torch.randn(2, 64, 12, 10, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x = x64.to(dtype)
    exact = F.conv2d(x64, c64.weight, c64.bias, padding=1)
    scale = exact.abs().max().item()
    err_wino = (winograd_conv3x3(x, transform_weight(c.weight), c.bias).double() - exact).abs().max().item() / scale
    err_direct = (F.conv2d(x, c.weight, c.bias, padding=1).double() - exact).abs().max().item() / scale
    assert err_wino <= tol
    assert err_wino <= 3 * err_direct + 1e-7


def test_use_winograd_takes_only_wide_stride_1_3x3_convs():
    m = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1),
                      nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.Conv2d(64, 64, 1), PackedConv2d(64, 64, 3, padding=1))
    assert use_winograd(m, min_channels=64) == 2
    assert [type(x).__name__ for x in m] == ["WinogradConv2d", "Conv2d", "Conv2d", "Conv2d", "WinogradConv2d"]
    x = torch.randn(1, 64, 6, 6)
    assert m[0].winograd and not WinogradConv2d(64, 64, 3, padding=1).winograd
    torch.testing.assert_close(m[0](x), F.conv2d(x, m[0].weight, m[0].bias, padding=1), rtol=1e-5, atol=1e-5)


def test_module_keeps_its_state_dict_and_follows_loads_and_casts():
    c = conv(16, 16)
    plain = copy.deepcopy(c)
    use_winograd(c, min_channels=16)
    x = torch.randn(2, 16, 6, 6)
    c(x)
    assert list(c.state_dict()) == ["weight", "bias"]
    assert torch.equal(c.state_dict()["weight"], plain.weight)      # the plain weight stays the file's tensor
    other = conv(16, 16, seed=1)
    c.load_state_dict(other.state_dict())                            # in place: the transform must be redone
    torch.testing.assert_close(c(x), F.conv2d(x, other.weight, other.bias, padding=1), rtol=1e-5, atol=1e-5)
    c64 = c.double()
    got = c64(x.double())
    assert (got - F.conv2d(x.double(), c64.weight, c64.bias, padding=1)).abs().max().item() <= 1e-12


def test_folded_upsample_conv_of_a_winograd_conv_stays_packed():
    up = NearestUpsampleConv(16)
    expected_module = copy.deepcopy(up)
    use_winograd(up, min_channels=16)
    pack_convolutions(up)
    x = torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(up(x), expected_module(x), rtol=1e-5, atol=1e-5)
    folded = up.folded_conv()
    assert isinstance(folded, PackedConv2d) and not folded.winograd and folded.packed is not None


def test_pipeline_default_is_on_for_bf16_off_for_fp32(monkeypatch):
    import batchsd.model.pipeline as pipeline_module

    # TINY's convolutions are narrower than MIN_CHANNELS: let every 3x3 conv count, to see the rule;
    # the CPU's kind as the rule sees it (devices.default_winograd: off with AMX), whatever this one is
    monkeypatch.setattr(pipeline_module, "use_winograd_in_model", lambda m: use_winograd_in_model(m, min_channels=1))
    plain, amx = CpuKind("AVX512", False), CpuKind("AVX512", True, avx512_bf16=True)
    for kind, dtype, option, expected in [(plain, "fp32", None, False), (plain, "bf16", None, True),
                                          (plain, "fp32", True, True), (plain, "bf16", False, False),
                                          (amx, "bf16", None, False), (amx, "bf16", True, True)]:
        monkeypatch.setattr(pipeline_module, "cpu_kind", lambda kind=kind: kind)
        pipe = Pipeline.load("tiny", device="cpu", dtype=dtype, winograd=option, fused_attention=False)
        assert pipe.winograd is expected, (kind, dtype, option)
        marked = [m for m in pipe.model.unet.modules() if isinstance(m, WinogradConv2d) and m.winograd]
        assert bool(marked) is expected
    assert not Pipeline.load("tiny", device="cpu", dtype="bf16", winograd=True, compile="default").winograd


def test_pipeline_builds_the_transformed_weights_at_load(monkeypatch):
    """packed_conv.pack_now builds each marked conv's U at load (start-up: the transforms' temporaries
    reuse one another's pages); the images equal those of building U at the first call."""
    import batchsd.model.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "use_winograd_in_model", lambda m: use_winograd_in_model(m, min_channels=1))
    rows = [GenerationRow("a cat", seed=1, steps=2, width=64, height=64, sampler="euler")]
    pipe = Pipeline.load("tiny", device="cpu", dtype="bf16", winograd=True)
    # not built: the VAE encoder's (image-to-image only) and each upsample's own conv (only folded)
    skipped = {id(m) for m in pipe.model.vae.encoder.modules()}
    skipped |= {id(m.conv) for m in pipe.model.modules() if isinstance(m, NearestUpsampleConv)}
    built = [m for m in marked(pipe.model) if id(m) not in skipped]
    assert len(built) > 10 and all(m._derived is not None for m in built)
    assert all(torch.equal(m.transformed_weight(), transform_weight(m.weight)) for m in built)
    monkeypatch.setattr(pipeline_module, "pack_now", lambda *modules: 0)
    lazy = Pipeline.load("tiny", device="cpu", dtype="bf16", winograd=True)
    assert all(m._derived is None for m in marked(lazy.model))
    assert torch.equal(lazy.generate(rows).latents, pipe.generate(rows).latents)


def marked(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, WinogradConv2d) and m.winograd]


def test_model_rule_leaves_the_unets_lowest_level_direct():
    from batchsd.model.checkpoint import build_on_meta
    from batchsd.model.config import SD15

    model = build_on_meta(SD15)
    eligible = {id(m) for m in model.unet.modules() if winograd_eligible(m)}
    assert len(eligible) == 39 and not [m for m in model.vae.modules() if winograd_eligible(m)]
    assert use_winograd_in_model(model) == 24
    for level, block in model.unet.blocks_by_level():
        wide = [m for m in block.modules() if id(m) in eligible]
        assert len(marked(block)) == (len(wide) if level < 3 else 0), level
    # the level bookkeeping: 12 input blocks, the middle, 12 output blocks; 1/8 of the side at level 3
    assert [lv for lv, _ in model.unet.blocks_by_level()] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3,
                                                              3, 3, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0]


def test_pipeline_with_winograd_matches_without():
    rows = [GenerationRow("a cat", seed=1, steps=3, width=64, height=64, sampler="euler")]
    ref = Pipeline(StableDiffusionModel.random(TINY, seed=0), torch.device("cpu"), torch.float32, name="t").generate(rows)
    model = StableDiffusionModel.random(TINY, seed=0)
    assert use_winograd(model.unet, min_channels=1) + use_winograd(model.vae, min_channels=1) > 10
    out = Pipeline(model, torch.device("cpu"), torch.float32, name="t").generate(rows)
    scale = ref.latents.abs().max().item()
    assert (out.latents - ref.latents).abs().max().item() <= 1e-5 * scale
    import numpy as np
    assert np.abs(np.asarray(out.images[0], np.int16) - np.asarray(ref.images[0], np.int16)).max() <= 1


def test_cpu_kind_names_the_processor(tmp_path):
    """The recorded kind says which processor made a run (same flags, other speeds: docs/performance.md)."""
    from batchsd.model.devices import CpuKind, cpu_model

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                    "model name\t: AMD EPYC\n\nprocessor\t: 1\nvendor_id\t: OtherVendor\n")
    assert cpu_model(str(info)) == "AuthenticAMD family 26 model 2 (AMD EPYC)"
    assert str(CpuKind("AVX512", False, cpu_model(str(info)))) == \
        "AVX512, AMX no, avx512-bf16 no, AuthenticAMD family 26 model 2 (AMD EPYC)"


def test_auto_winograd_is_keyed_on_the_cpu_kind(monkeypatch):
    """--winograd auto: on for 16-bit dtypes on CPUs without AMX, off with AMX and for fp32 (devices.py's
    table); the Pipeline asks the CPU, never a timing."""
    from batchsd.model import pipeline as pipeline_module
    from batchsd.model.devices import CpuKind, default_winograd

    cpu, amx, plain = torch.device("cpu"), CpuKind("AVX512", True), CpuKind("AVX512", False)
    assert default_winograd(cpu, torch.bfloat16, plain) and default_winograd(cpu, torch.float16, plain)
    assert not default_winograd(cpu, torch.bfloat16, amx) and not default_winograd(cpu, torch.float32, plain)
    assert not default_winograd(torch.device("cuda"), torch.float16, plain)
    assert str(amx) == "AVX512, AMX yes, avx512-bf16 no"
    monkeypatch.setattr(pipeline_module, "use_winograd_in_model", lambda model: 1)   # the tiny model has no wide convs
    for kind, expected in ((plain, True), (amx, False)):
        monkeypatch.setattr(pipeline_module, "cpu_kind", lambda kind=kind: kind)
        pipe = pipeline_module.Pipeline.load("tiny", device="cpu", dtype="bf16")
        assert pipe.cpu_kind == kind and pipe.winograd is expected
