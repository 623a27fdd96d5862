"""The speed paths of runtime.py, exercised on the CPU: the torch.compile'd UNet, the allocator
setting and the chunked decode with host copies give the same images as the plain eager path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from batchsd import GenerationRow, Pipeline
from batchsd.config import TINY
from batchsd.model import StableDiffusionModel
from batchsd.pipeline import arrays_to_images, pixels_to_uint8
from batchsd.runtime import CompiledUNet, host_array, to_host, tune_cpu_allocator

ROWS = [GenerationRow("a red cube", seed=3, steps=2, sampler="euler", width=64, height=64),
        GenerationRow("a blue sphere", negative_prompt="blurry", seed=4, steps=2, sampler="euler",
                      width=64, height=64, cfg_scale=1.0)]


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
    # inductor fuses and reorders the pointwise ops: rounding-level differences only
    torch.testing.assert_close(out.latents, eager_output.latents, rtol=1e-4, atol=1e-4)
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
    pipe = tiny(vae_chunk=1)   # two chunks: the second decodes while the first is converted
    images = pipe._decode(eager_output.latents)
    assert [np.asarray(i).tolist() for i in images] == [np.asarray(i).tolist() for i in eager_output.images]


def test_pixels_to_uint8_rounds_like_diffusers():
    pixels = torch.tensor([-1.5, -1.0, -0.5, 0.0, 1 / 255, 0.5, 1.0, 2.0]).view(1, 1, 1, 8).expand(1, 3, 1, 8)
    ref = ((pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")  # numpy_to_pil
    ours = host_array(to_host(pixels_to_uint8(pixels)))
    assert ours.dtype == np.uint8 and ours.shape == (1, 1, 8, 3)
    assert (ours == ref).all()
    assert arrays_to_images(ours)[0].size == (8, 1)
