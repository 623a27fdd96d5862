"""The UNet's GEGLU as oneDNN linears with gelu and the product fused (fast/fused_geglu.py): as
accurate as torch's ops against float64, the rule that picks it, and a pipeline that runs it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from batchsd import Pipeline
from batchsd.errors import InputError
from batchsd.model.devices import CpuKind, default_fused_geglu
from batchsd.model.fast import fused_geglu as geglu
from batchsd.model.unet import GEGLU
from batchsd.model.request import GenerationRow

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not geglu.available(), reason="this torch build has no oneDNN fused linear")]


@pytest.mark.parametrize("tokens,dim", [(300, 64), (2 * 256, 320)])
def test_fused_geglu_is_as_accurate_as_torchs_ops(tokens, dim):
    """bf16 inputs and weights; both paths against the same computation in float64."""
    gen = torch.Generator().manual_seed(tokens)
    module = GEGLU(dim, 4 * dim)
    with torch.no_grad():
        module.proj.weight.copy_(torch.randn(8 * dim, dim, generator=gen) / dim ** 0.5)
        module.proj.bias.copy_(torch.randn(8 * dim, generator=gen) * 0.1)
    module = module.to(torch.bfloat16)
    x = torch.randn(2, tokens // 2, dim, generator=gen).to(torch.bfloat16)
    value, gate = torch.nn.functional.linear(x.double(), module.proj.weight.double(), module.proj.bias.double()).chunk(2, -1)
    truth = torch.nn.functional.gelu(gate) * value
    with torch.inference_mode():
        plain = module(x)
        module.fused_epilogue = True
        fused = module(x)
    assert fused.shape == plain.shape == truth.shape and fused.dtype == torch.bfloat16
    err_plain = (plain.double() - truth).abs().mean().item()
    err_fused = (fused.double() - truth).abs().mean().item()
    assert not torch.equal(fused, plain)             # really the other path
    assert err_fused <= 1.05 * err_plain, (err_fused, err_plain)
    assert (fused.double() - truth).abs().max().item() <= 2 * (plain.double() - truth).abs().max().item()


def test_rule_is_bf16_on_cpus_with_amx():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    amx, plain = CpuKind("AVX512", True, avx512_bf16=True), CpuKind("AVX512", False, avx512_bf16=True)
    assert default_fused_geglu(cpu, torch.bfloat16, amx)
    assert not default_fused_geglu(cpu, torch.bfloat16, plain)
    assert not default_fused_geglu(cpu, torch.float32, amx)
    assert not default_fused_geglu(cuda, torch.bfloat16, amx)


def test_pipeline_runs_it_when_asked_and_records_it():
    row = GenerationRow(prompt="a red cube", seed=3, width=64, height=64, steps=2)
    images = {}
    for asked in (False, True):
        pipe = Pipeline.load("tiny", device="cpu", dtype="bf16", fused_geglu=asked)
        marked = [m.fused_epilogue for m in pipe.model.unet.modules() if isinstance(m, GEGLU)]
        assert marked and all(f is asked for f in marked) and pipe.fused_geglu is asked
        images[asked] = torch.from_numpy(np.asarray(pipe.generate([row]).images[0])).float()
    diff = (images[True] - images[False]).abs()
    assert diff.mean().item() < 2.0       # the same image up to bf16 rounding (8-bit levels)
    auto = Pipeline.load("tiny", device="cpu", dtype="bf16")
    assert auto.fused_geglu is default_fused_geglu(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(InputError, match="fused GEGLU"):
        Pipeline.load("tiny", device="cpu", dtype="bf16", fused_geglu=True, compile="default")
