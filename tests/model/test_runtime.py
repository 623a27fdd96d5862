"""The speed paths of batchsd/model/fast, exercised on the CPU: the torch.compile'd UNet, the allocator
setting and the chunked decode with host copies give the same images as the plain eager path."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from batchsd import GenerationRow, Pipeline
from batchsd.model.config import TINY
from batchsd.model.stable_diffusion import StableDiffusionModel
from batchsd.model.pipeline import arrays_to_images, pixels_to_uint8
from batchsd.model.fast.allocator import tune_cpu_allocator
from batchsd.model.fast.compiled_unet import CompiledUNet
from batchsd.model.fast.host_copy import host_array, to_host
from batchsd.model.fast.packed_conv import onednn_available, pack_convolutions, PackedConv2d

ROWS = [GenerationRow("a red cube", seed=3, steps=2, sampler="euler", width=64, height=64),
        GenerationRow("a blue sphere", negative_prompt="blurry", seed=4, steps=2, sampler="euler",
                      width=64, height=64, cfg_scale=1.0)]


needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN convolution ops")


def tiny(**options) -> Pipeline:
    return Pipeline(StableDiffusionModel.random(TINY, seed=0), torch.device("cpu"), torch.float32,
                    name="tiny-random", **options)


@pytest.fixture(scope="module")
def eager_output():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny().generate(ROWS)
    torch.set_num_threads(threads)


def test_compiled_unet_matches_eager(eager_output):
    pytest.importorskip("torch._inductor")
    pipe = tiny(compile="default")
    assert isinstance(pipe.unet, CompiledUNet)
    out = pipe.generate(ROWS)
    # inductor fuses and reorders the pointwise ops: rounding-level differences only, measured at
    # 2-6e-6 of the latents' scale (|latents| up to ~47): an element-wise 1e-4 is not that level
    scale = eager_output.latents.abs().max().item()
    assert (out.latents - eager_output.latents).abs().max().item() <= 2e-5 * scale
    for a, b in zip(out.images, eager_output.images):
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
    # one shape (1 unconditional + 2 rows = batch 3 of 4x8x8 latents), compiled once, its time recorded
    assert len(pipe.unet.compile_seconds) == 1
    assert next(iter(pipe.unet.compile_seconds.values())) > 0


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="unknown compile mode 'fastest'"):
        tiny(compile="fastest")


def test_tuned_allocator_changes_no_result(eager_output):
    assert tune_cpu_allocator() in (True, False)
    assert tune_cpu_allocator() == tune_cpu_allocator()   # idempotent
    out = tiny().generate(ROWS)
    assert torch.equal(out.latents, eager_output.latents)


def test_decode_in_chunks_equals_one_chunk(eager_output):
    # on the CPU the default is one image per VAE call: eager_output decoded its 2 rows in two chunks
    # (the second decodes while the first is converted); here both go in one call
    assert tiny().vae_chunk == 1
    pipe = tiny(vae_chunk=4)
    images = pipe._decode(eager_output.latents)
    assert [np.asarray(i).tolist() for i in images] == [np.asarray(i).tolist() for i in eager_output.images]


def test_pixels_to_uint8_rounds_like_diffusers():
    pixels = torch.tensor([-1.5, -1.0, -0.5, 0.0, 1 / 255, 0.5, 1.0, 2.0]).view(1, 1, 1, 8).expand(1, 3, 1, 8)
    ref = ((pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")  # numpy_to_pil
    ours = host_array(to_host(pixels_to_uint8(pixels)))
    assert ours.dtype == np.uint8 and ours.shape == (1, 1, 8, 3)
    assert (ours == ref).all()
    assert arrays_to_images(ours)[0].size == (8, 1)


def packed_copy(conv: torch.nn.Conv2d) -> torch.nn.Conv2d:
    packed = torch.nn.Sequential(copy.deepcopy(conv))
    assert pack_convolutions(packed) == 1
    return packed[0]


@needs_onednn
@pytest.mark.parametrize("cin,cout,k,stride,padding", [(8, 16, 3, 1, 1), (16, 16, 3, 2, 0), (16, 8, 1, 1, 0),
                                                       (4, 32, 3, 2, 1)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted view"])
def test_packed_conv_equals_conv2d(cin, cout, k, stride, padding, layout):
    # Eager nn.Conv2d takes oneDNN too, the claim checked here, except for a 1x1 stride-1 conv on a
    # batch under 16 with one intra-op thread (PyTorch's ConvParams::use_mkldnn): then its own kernel,
    # other rounding. This module's eager_output fixture leaves one thread set, so pin two here.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        _check_packed_conv(cin, cout, k, stride, padding, layout)
    finally:
        torch.set_num_threads(threads)


def _check_packed_conv(cin, cout, k, stride, padding, layout):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=padding).eval()
    packed = packed_copy(conv)
    x = torch.randn(3, cin, 9, 11)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted view":   # neither NCHW nor NHWC strides
        x = torch.randn(3, 9, cin, 11).permute(0, 2, 1, 3)
    with torch.inference_mode():
        ref = conv(x)
        for _ in range(2):            # the first call packs, the second uses the packed weight
            out = packed(x)
            if layout == "channels_last":
                assert torch.equal(out, ref)   # the same oneDNN kernel: bit-identical
            else:
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert packed.weight is None and packed.packed is not None
        # another input shape with the weight packed for the first one
        x2 = torch.randn(1, cin, 16, 7).contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(packed(x2), conv(x2), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_packed_conv_unpacks_for_state_dict_and_casts():
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).eval()
    packed = packed_copy(conv)
    x = torch.randn(2, 8, 6, 6)
    with torch.inference_mode():
        packed(x)
        assert packed.weight is None
        assert torch.equal(packed.state_dict()["weight"], conv.weight)   # rebuilt exactly
        packed(x)
        packed.to(torch.bfloat16)                                        # cast: unpacked, cast, packed again
        out = packed(x.bfloat16())
        ref = conv.to(torch.bfloat16)(x.bfloat16())
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    assert packed.packed.dtype == torch.bfloat16


@needs_onednn
def test_pipeline_packs_cpu_convolutions_with_the_same_images(eager_output):
    plain = tiny(pack_weights=False)
    packed = tiny()
    assert not any(isinstance(m, PackedConv2d) for m in plain.model.modules())
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in packed.model.unet.modules())
    assert n_conv > 0 and all(isinstance(m, PackedConv2d) for m in packed.model.unet.modules()
                              if isinstance(m, torch.nn.Conv2d))
    a, b = plain.generate(ROWS), packed.generate(ROWS)
    # rounding-level differences at most (PyTorch may take other kernels than oneDNN's for the tiny
    # widths): measured 0 to 1.5e-4 on latents of magnitude ~47 (3e-6 relative)
    rel = ((b.latents - a.latents).abs().max() / a.latents.abs().max()).item()
    assert rel < 1e-4, rel
    for x, y in zip(a.images, b.images):
        assert np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max() <= 1


@needs_onednn
def test_pipeline_packs_its_called_convolutions_at_load(eager_output, monkeypatch):
    """packed_conv.pack_now, run by Pipeline on the UNet and the VAE decoder: their 3x3 convs and each
    upsample's folded 2x2 conv are packed before any call; the upsamples' own 3x3 convs (folded, never
    called), the 1x1 ones (some read as matrices) and the VAE encoder's (image-to-image only) keep
    their plain weights; latents and images equal those of packing at the first call."""
    from batchsd.model.fast.upsample import NearestUpsampleConv
    import batchsd.model.pipeline as pipeline_module

    pipe = tiny()
    upsamples = [m for m in pipe.model.modules() if isinstance(m, NearestUpsampleConv)]
    inner = {id(m.conv) for m in upsamples}
    assert upsamples and all(m.folded_conv().packed is not None for m in upsamples)
    assert all(m.conv.weight is not None and m.conv.packed is None for m in upsamples)
    encoder = {id(m) for m in pipe.model.vae.encoder.modules()}
    convs = [m for m in pipe.model.modules() if isinstance(m, PackedConv2d) and id(m) not in inner]
    three = [m for m in convs if m.kernel_size == (3, 3) and id(m) not in encoder]
    one = [m for m in convs if m.kernel_size == (1, 1)]
    unused = [m for m in convs if id(m) in encoder]
    assert three and one and unused
    assert all(m.packed is not None and m.weight is None for m in three)
    assert all(m.packed is None and m.weight is not None for m in one + unused)

    monkeypatch.setattr(pipeline_module, "pack_now", lambda *modules: 0)     # packed at the first call
    at_first_call = tiny()
    assert all(m.packed is None for m in at_first_call.model.modules() if isinstance(m, PackedConv2d))
    a, b = at_first_call.generate(ROWS), pipe.generate(ROWS)
    # the same kernels on the same bits: packed for a nominal shape or the call's, the output is equal
    assert torch.equal(a.latents, b.latents)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))
    # a state dict still reads the exact checkpoint tensors
    ref = StableDiffusionModel.random(TINY, seed=0).state_dict()
    assert all(torch.equal(v, ref[k].to(v.dtype)) for k, v in pipe.model.state_dict().items())
