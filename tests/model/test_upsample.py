"""The folded upsample (batchsd/model/fast/upsample.py) against what it replaces: nearest 2x upsample + 3x3 conv."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from batchsd.model.fast.packed_conv import onednn_available, pack_convolutions, PackedConv2d
from batchsd.model.fast.upsample import NearestUpsampleConv, fold_weight


def reference(x: torch.Tensor, module: NearestUpsampleConv, size=None) -> torch.Tensor:
    up = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
    return F.conv2d(up, module.conv.weight, module.conv.bias, padding=1)


def module(channels: int, seed: int = 0, dtype=torch.float32) -> NearestUpsampleConv:
    torch.manual_seed(seed)
    m = NearestUpsampleConv(channels).to(dtype).eval().requires_grad_(False)
    torch.nn.init.normal_(m.conv.bias)          # nn.Conv2d's default bias is small: make it count
    return m


@pytest.mark.parametrize("b,c,h,w", [(1, 8, 4, 4), (2, 16, 3, 5), (3, 4, 1, 1), (1, 32, 7, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fold_is_the_same_function_in_float64(b, c, h, w, channels_last):
    m = module(c, dtype=torch.float64)
    x = torch.randn(b, c, h, w, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got = m(x)
    expected = reference(x, m)
    assert got.shape == (b, c, 2 * h, 2 * w)
    assert (got - expected).abs().max().item() <= 1e-12 * expected.abs().max().item()
    fmt = torch.channels_last if channels_last and h * w > 1 else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt)


def test_fold_weight_sums_the_taps_of_each_phase():
    w = torch.arange(9.0).reshape(1, 1, 3, 3)      # rows [0 1 2], [3 4 5], [6 7 8]
    w4, b4 = fold_weight(w, torch.tensor([0.5]))
    assert b4.tolist() == [0.5] * 4
    # phase (0,0): rows (w0, w1+w2) x cols (w0, w1+w2); phase (1,1): rows (w0+w1, w2) x cols (w0+w1, w2)
    assert w4[0, 0].tolist() == [[0.0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    assert w4[3, 0].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]
    assert w4[1, 0].tolist() == [[0 + 1, 2], [3 + 4 + 6 + 7, 5 + 8]]   # phase (0,1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_fold_rounding_is_that_of_the_dtype(dtype, tol):
    m64 = module(64, dtype=torch.float64)
    m = copy.deepcopy(m64).to(dtype)
    x64 = torch.randn(2, 64, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x = x64.to(dtype)
    exact = reference(x64, m64)
    scale = exact.abs().max().item()
    err_folded = (m(x).double() - exact).abs().max().item() / scale
    err_plain = (reference(x, m).double() - exact).abs().max().item() / scale
    assert err_folded <= tol
    assert err_folded <= 3 * err_plain + 1e-7   # the summed taps cost no more than the dtype's own rounding


def test_other_sizes_interpolate_then_convolve():
    m = module(8)
    x = torch.randn(1, 8, 3, 4)
    for size in [(5, 7), (6, 7), (3, 4)]:
        torch.testing.assert_close(m(x, size), reference(x, m, size), rtol=0, atol=0)
    torch.testing.assert_close(m(x, (6, 8)), reference(x, m), rtol=1e-5, atol=1e-5)


def test_fold_off_is_the_plain_path(monkeypatch):
    m = module(8)
    x = torch.randn(2, 8, 4, 4)
    monkeypatch.setattr(NearestUpsampleConv, "fold", False)
    torch.testing.assert_close(m(x), reference(x, m), rtol=0, atol=0)


def test_state_dict_has_only_the_checkpoint_keys():
    m = module(8)
    m(torch.randn(1, 8, 2, 2))
    assert sorted(m.state_dict()) == ["conv.bias", "conv.weight"]
    assert [name for name, _ in m.named_modules()] == ["", "conv"]


def test_folded_weight_follows_load_and_cast():
    m = module(8, seed=0)
    x = torch.randn(1, 8, 4, 4)
    m(x)                                           # folds the seed-0 weights
    other = module(8, seed=1)
    m.load_state_dict(other.state_dict())          # written in place: same tensors, new values
    torch.testing.assert_close(m(x), reference(x, other), rtol=1e-5, atol=1e-5)
    m64 = m.double()
    got = m64(x.double())
    assert got.dtype == torch.float64
    assert (got - reference(x.double(), m64)).abs().max().item() <= 1e-12


@pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN convolution ops")
def test_packed_on_the_cpu():
    m = module(16)
    plain = module(16)
    x = torch.randn(2, 16, 5, 6).contiguous(memory_format=torch.channels_last)
    expected = plain(x)
    assert pack_convolutions(m) == 1
    assert isinstance(m.folded_conv(), PackedConv2d)          # the folded conv takes the 3x3 conv's class
    torch.testing.assert_close(m(x), expected, rtol=0, atol=0)
    # the other path packs the 3x3 conv itself (its plain weight goes); the folded path still works
    torch.testing.assert_close(m(x, (9, 11)), reference(x, plain, (9, 11)), rtol=0, atol=0)
    assert m.conv.weight is None
    torch.testing.assert_close(m(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(m.state_dict()["conv.weight"], plain.conv.weight, rtol=0, atol=0)
