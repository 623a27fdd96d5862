"""The CUDA paths, where CUDA is present (skipped elsewhere; tests/bench/device_gpu.sh runs them on
the device tool's GPU machine): the pipeline on CUDA against the same weights on the CPU, in fp32
and fp16; low-memory mode; the CUDA-graph compile mode; the free-memory batch size; `batchsd run`
on CUDA. The CPU halves of these paths (chunked decode, host copies, compile) are in test_runtime.py.

Tolerances: fp32 on CUDA convolves in TF32 by default (cuDNN), so its latents are held to 1e-2 of
their scale and its pixels to 4/255, not to the CPU's 1e-3 and 1/255; fp16 to 5e-2 and 99% of
pixels within 8/255 (10-bit mantissas through a 2-step tiny model).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from batchsd import GenerationRow, Pipeline
from batchsd.model.config import TINY
from batchsd.model.stable_diffusion import StableDiffusionModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ROWS = [GenerationRow("a red cube", seed=3, steps=2, sampler="euler", width=64, height=64),
        GenerationRow("a blue sphere", negative_prompt="blurry", seed=4, steps=2, sampler="euler",
                      width=64, height=64),
        GenerationRow("a green cone", seed=5, steps=2, sampler="euler", width=64, height=64, cfg_scale=1.0)]


def tiny(device: str, dtype: torch.dtype, **options) -> Pipeline:
    return Pipeline(StableDiffusionModel.random(TINY, seed=0), torch.device(device), dtype, name="tiny-random",
                    **options)


def pixel_diffs(a, b) -> np.ndarray:
    return np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))


@pytest.fixture(scope="module")
def cpu_output():
    return tiny("cpu", torch.float32).generate(ROWS)


@pytest.mark.parametrize("dtype,latent_tol,pixel_tol,pixel_share",
                         [(torch.float32, 1e-2, 4, 1.0), (torch.float16, 5e-2, 8, 0.99)])
def test_cuda_pipeline_matches_cpu(cpu_output, dtype, latent_tol, pixel_tol, pixel_share):
    pipe = tiny("cuda", dtype)
    assert pipe.vae_chunk == 4 and pipe.unet is pipe.model.unet
    out = pipe.generate(ROWS)
    assert out.latents.device.type == "cpu" and out.latents.dtype == torch.float32
    rel = ((out.latents - cpu_output.latents).abs().max() / cpu_output.latents.abs().max()).item()
    assert rel <= latent_tol, f"latents differ by {rel:.2e} of their scale"
    for a, b in zip(out.images, cpu_output.images):
        d = pixel_diffs(a, b)
        assert (d <= pixel_tol).mean() >= pixel_share, f"max {d.max()}/255, mean {d.mean():.3f}"


def test_cuda_decode_with_host_copies_equals_one_chunk():
    """4 images per VAE call, each chunk copied to pinned host memory while the next decodes."""
    pipe = tiny("cuda", torch.float16)
    latents = torch.randn(6, TINY.vae.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    chunked = pipe._decode(latents)
    pipe.vae_chunk = 6
    whole = pipe._decode(latents)
    assert len(chunked) == 6
    for a, b in zip(chunked, whole):
        assert pixel_diffs(a, b).max() <= 1


def test_cuda_low_memory_gives_the_same_images():
    out = tiny("cuda", torch.float16).generate(ROWS)
    pipe = tiny("cuda", torch.float16, low_memory=True)
    assert next(pipe.model.unet.parameters()).device.type == "cpu"   # parts go to the GPU only while used
    low = pipe.generate(ROWS)
    assert next(pipe.model.unet.parameters()).device.type == "cpu"
    for a, b in zip(low.images, out.images):
        assert pixel_diffs(a, b).max() <= 1


def test_cuda_graphs_compile_matches_eager():
    pytest.importorskip("torch._inductor")
    eager = tiny("cuda", torch.float16).generate(ROWS)
    pipe = tiny("cuda", torch.float16, compile="reduce-overhead")
    assert pipe.unet.cudagraphs
    out = pipe.generate(ROWS)
    again = pipe.generate(ROWS)     # replays the graph: the outputs were cloned out, not overwritten
    for a, b, c in zip(out.images, eager.images, again.images):
        assert pixel_diffs(a, b).max() <= 8
        assert pixel_diffs(a, c).max() == 0
    assert len(pipe.unet.compile_seconds) == 1


def test_cuda_batch_size_from_free_memory():
    from batchsd.job.worker import MAX_AUTO_BATCH, default_batch_size

    pipe = tiny("cuda", torch.float16)
    small, large = default_batch_size(pipe, 512, 512), default_batch_size(pipe, 1024, 1024)
    assert 1 <= large <= small <= MAX_AUTO_BATCH


def test_batchsd_run_on_cuda(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from rich.console import Console

    from batchsd.job.options import RunOptions

    from batchsd.job.run import run

    manifest = tmp_path / "jobs.parquet"
    pq.write_table(pa.Table.from_pylist([dict(id=f"r{i}", prompt=f"row {i}", seed=i, steps=2, width=64, height=64)
                                         for i in range(5)]), manifest)
    summary = run(RunOptions(manifest=manifest, model="tiny", out_dir=tmp_path / "out", device="cuda"),
                  Console(file=open(tmp_path / "log.txt", "w")), rich_bar=False)
    assert (summary.ok, summary.failed, summary.exit_code) == (5, 0, 0)
    results = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert [r["status"] for r in results] == ["ok"] * 5
    assert all((tmp_path / "out" / r["image_path"]).is_file() for r in results)
