"""Exact mode (batchsd/model/fast/exact.py) at the Pipeline level: a row's latents and image bytes do
not depend on its batch (size, position, neighbours) nor on the intra-op thread count, on the tiny
model and on a random full-width SD 1.5 checkpoint; with exact mode off they do (so the comparison
can fail); the default and the flags' rules."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from batchsd import GenerationRow, Pipeline
from batchsd.errors import InputError
from batchsd.model.config import TINY
from batchsd.model.family import SD1
from batchsd.model.fast.exact import ExactNumerics, default_exact, mkl_strict, resolve_exact
from ref_checkpoint import random_sd15_checkpoint


def init_image(size: int, seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def mixed_rows(size: int, steps: int) -> list[list[GenerationRow]]:
    """Rows in groups of one batch key: guided and cfg 1 rows, shared and distinct prompts, empty and
    given negative prompts, two samplers, and image-to-image."""
    t2i = [GenerationRow(f"prompt {i % 3}", negative_prompt=["", "blurry"][i % 2], seed=10 + i, steps=steps,
                         cfg_scale=1.0 if i == 2 else 5.0 + i, sampler="euler_a", width=size, height=size)
           for i in range(5)]
    dpm = [GenerationRow(f"a picture {i}", seed=30 + i, steps=steps, cfg_scale=7.5, sampler="dpmpp_2m_karras",
                         width=size, height=size) for i in range(3)]
    i2i = [GenerationRow(f"a photo {i}", negative_prompt="low quality", seed=50 + i, steps=steps + 1, cfg_scale=7.5,
                         sampler="euler_a", init_image=init_image(size, i), strength=0.6, width=size, height=size)
           for i in range(2)]
    return [t2i, dpm, i2i]


def run_rows(pipe: Pipeline, groups: list[list[GenerationRow]], batch: int, threads: int):
    """Every row's (latents, sha256 of its RGB bytes), generating each group in chunks of `batch` at
    `threads` intra-op threads, from an empty text cache (as a fresh process or a resume starts)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    pipe._text_cache.clear()
    out = []
    try:
        for rows in groups:
            for start in range(0, len(rows), batch):
                result = pipe.generate(rows[start:start + batch])
                out += [(lat.clone(), hashlib.sha256(im.tobytes()).hexdigest())
                        for lat, im in zip(result.latents, result.images)]
    finally:
        torch.set_num_threads(before)
    return out


def count_equal(a, b) -> tuple[int, int]:
    return sum(torch.equal(x[0], y[0]) for x, y in zip(a, b)), sum(x[1] == y[1] for x, y in zip(a, b))


@pytest.fixture(scope="module")
def tiny_exact():
    return Pipeline.load("tiny", device="cpu", dtype="fp32", exact=True)


def test_tiny_rows_equal_across_batch_sizes_and_threads(tiny_exact):
    groups = mixed_rows(64, 3)
    n = sum(map(len, groups))
    ref = run_rows(tiny_exact, groups, batch=1, threads=1)
    assert all(torch.isfinite(lat).all() for lat, _ in ref)
    for batch, threads in [(3, 1), (4, 2), (8, 1), (8, 3)]:
        assert count_equal(run_rows(tiny_exact, groups, batch, threads), ref) == (n, n), (batch, threads)


def test_tiny_non_square_rows_equal_across_threads(tiny_exact):
    """Sizes whose deep levels hold 2, 3 or 6 tokens (SDPA with 2-3 queries, fp32 linears with 5-7 or
    9-11 rows are thread-dependent)."""
    groups = [[GenerationRow(f"a bee {i}", seed=9 + i, steps=2, sampler="ddim", width=w, height=h) for i in range(2)]
              for w, h in ((128, 64), (64, 128), (136, 64))]
    groups.append([GenerationRow("a cfg 1 row", seed=3, steps=2, cfg_scale=1.0, width=192, height=128)])  # 6 tokens
    ref = run_rows(tiny_exact, groups, batch=1, threads=1)
    for threads in (2, 3):
        assert count_equal(run_rows(tiny_exact, groups, 2, threads), ref) == (7, 7), threads


def test_tiny_rows_differ_across_batch_sizes_without_exact_mode():
    """The same comparison with exact mode off finds differences: the test above can fail."""
    pipe = Pipeline.load("tiny", device="cpu", dtype="fp32", exact=False)
    groups = mixed_rows(64, 3)
    n = sum(map(len, groups))
    latents_equal, _ = count_equal(run_rows(pipe, groups, 4, 1), run_rows(pipe, groups, 1, 1))
    assert latents_equal < n


def test_exact_rows_equal_the_batch_1_rows_of_the_batched_path():
    """At batch 1 and one thread, exact mode computes what the batched path computes: it changes
    which shapes run, not the arithmetic of a row (so its images are the library's images)."""
    rows = [mixed_rows(64, 2)[0][:2], mixed_rows(64, 2)[2][:1]]
    exact = run_rows(Pipeline.load("tiny", device="cpu", dtype="fp32", exact=True), rows, 1, 1)
    plain = run_rows(Pipeline.load("tiny", device="cpu", dtype="fp32", exact=False), rows, 1, 1)
    assert count_equal(exact, plain) == (3, 3)


def test_pins_keep_thread_dependent_ops_equal_across_thread_counts():
    """Under ExactNumerics the pinned ops give the bits of one thread at any thread count."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 40, 40, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    ops = {
        "group_norm": lambda: F.group_norm(x, 32, w, b, 1e-5),
        "silu": lambda: F.silu(x),
        "gelu": lambda: F.gelu(x),
        "sigmoid": lambda: torch.sigmoid(x * 1.702),
    }
    for queries in (1, 2, 3):
        q, kv = torch.randn(2, 8, queries, 40, generator=g), torch.randn(2, 8, 77, 40, generator=g)
        ops[f"sdpa, {queries} queries"] = lambda q=q, kv=kv: F.scaled_dot_product_attention(q, kv, kv)
    for rows in (5, 6, 7, 9, 10, 11):
        a, weight = torch.randn(rows, 320, generator=g), torch.randn(320, 320, generator=g)
        ops[f"linear, {rows} rows"] = lambda a=a, weight=weight: F.linear(a, weight)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = {k: f() for k, f in ops.items()}
        for threads in (2, 3, 5):
            torch.set_num_threads(threads)
            with ExactNumerics():
                for k, f in ops.items():
                    assert torch.equal(f(), ref[k]), (k, threads)
                assert torch.get_num_threads() == threads    # restored after each pinned call
    finally:
        torch.set_num_threads(before)


def test_mkl_strict_mode_keeps_fp32_linears_of_few_rows_equal_across_thread_counts():
    """batchsd's import sets MKL's strict mode (fast/exact.py): the deep levels' linears (tens to
    hundreds of rows, K up to 5120), which MKL otherwise splits over K by thread on some CPUs, give
    the bits of one thread at any thread count, with no pin."""
    if mkl_strict() is None:
        pytest.skip("torch has no MKL here")
    assert mkl_strict()
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 1280, 1280), (128, 1280, 320), (256, 2560, 640), (512, 5120, 1280), (384, 3072, 768)]
    ops = {(m, k, n): (torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5)
           for m, k, n in shapes}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = {s: F.linear(*ab) for s, ab in ops.items()}
        for threads in (2, 3, 4):
            torch.set_num_threads(threads)
            for s, ab in ops.items():
                assert torch.equal(F.linear(*ab), ref[s]), (s, threads)
    finally:
        torch.set_num_threads(before)


def test_exact_mode_says_when_mkl_is_not_strict():
    """A user's own MKL_CBWR is kept, and an exact Pipeline warns that fp32 rows may then follow the
    thread count (and records it); without it, the mode is strict."""
    if mkl_strict() is None:
        pytest.skip("torch has no MKL here")
    code = ("import logging, batchsd; from batchsd import Pipeline; logging.basicConfig(); "
            "p = Pipeline.load('tiny', device='cpu', dtype='fp32'); print('strict', p.mkl_strict)")
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "MKL_CBWR": "AUTO"})
    assert plain.returncode == 0, plain.stderr
    assert "strict False" in plain.stdout and "MKL_CBWR=AUTO" in plain.stderr and "thread count" in plain.stderr
    default = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "strict True" in default.stdout and "MKL" not in default.stderr, default.stderr


def test_default_and_flags():
    assert default_exact("cpu") and not default_exact("cuda") and not default_exact("cpu", compile="default")
    assert resolve_exact(None, "cpu") and not resolve_exact(False, "cpu") and resolve_exact(True, "cuda")
    with pytest.raises(InputError, match="--compile"):
        resolve_exact(True, "cpu", compile="default")
    pipe = Pipeline.load("tiny", device="cpu", dtype="fp32")
    assert pipe.exact and pipe.vae_chunk == 1
    assert not Pipeline.load("tiny", device="cpu", dtype="fp32", exact=False).exact
    # exact mode decodes one image per VAE call: another chunk turns the default off, and is refused with exact
    tiny = SD1.model_class.random(TINY, seed=0)
    assert not Pipeline(tiny, torch.device("cpu"), torch.float32, name="t", vae_chunk=4).exact
    with pytest.raises(InputError, match="vae_chunk"):
        Pipeline(tiny, torch.device("cpu"), torch.float32, name="t", vae_chunk=4, exact=True)


# ----------------------------------------------------------------------------- full width

@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    return random_sd15_checkpoint(tmp_path_factory.mktemp("sd15") / "sd15.safetensors", torch.float16)


def test_full_width_sd15_rows_equal_across_batch_sizes_and_threads(sd15_file):
    """256x256 (the size where channels_last GroupNorm splits by thread in the UNet's first level and
    every VAE decoder level), fp32, 2 steps: a guided row, a cfg 1 row, an image-to-image row."""
    pipe = Pipeline.load(sd15_file, device="cpu", dtype="fp32", exact=True)
    groups = [[GenerationRow("a cat", negative_prompt="blurry", seed=1, steps=2, cfg_scale=7.5, width=256, height=256,
                             sampler="euler_a"),
               GenerationRow("a dog", seed=2, steps=2, cfg_scale=1.0, width=256, height=256, sampler="euler_a")],
              [GenerationRow("a hill", seed=3, steps=3, cfg_scale=6.0, width=256, height=256, sampler="euler_a",
                             init_image=init_image(256, 0), strength=0.6)]]
    ref = run_rows(pipe, groups, batch=1, threads=2)
    assert all(torch.isfinite(lat).all() for lat, _ in ref)
    for batch, threads in [(2, 1), (2, 3)]:
        assert count_equal(run_rows(pipe, groups, batch, threads), ref) == (3, 3), (batch, threads)
