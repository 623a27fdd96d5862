"""The transformers' GEGLU and residual adds in oneDNN linears' epilogues (fast/fused_epilogues.py): as
accurate as torch's ops against float64, LoRA side paths still run, exact mode's batch invariance
holds, the rule that picks them, and a pipeline that runs and records them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from batchsd import Pipeline
from batchsd.errors import InputError
from batchsd.model.config import TINY
from batchsd.model.devices import CpuKind, default_fused_epilogues
from batchsd.model.fast import fused_epilogues as epilogues
from batchsd.model.request import GenerationRow
from batchsd.model.unet import GEGLU, BasicTransformerBlock

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not epilogues.available(), reason="this torch build has no oneDNN fused linear")]


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """`module` with random weights of unit-scale outputs, in bf16."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p.shape[1] if p.dim() == 2 else 1
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5 if p.dim() == 2 else
                    1 + 0.1 * torch.randn(p.shape, generator=gen) if "norm" in name and name.endswith("weight") else
                    0.1 * torch.randn(p.shape, generator=gen))
    return module.to(torch.bfloat16)


def errors(ours: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    d = (ours.double() - truth).abs()
    return d.mean().item(), d.max().item()


@pytest.mark.parametrize("tokens,dim", [(300, 64), (2 * 256, 320)])
def test_fused_geglu_is_as_accurate_as_torchs_ops(tokens, dim):
    """bf16 inputs and weights; both paths against the same computation in float64."""
    module = randomized(GEGLU(dim, 4 * dim), tokens)
    x = torch.randn(2, tokens // 2, dim, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    value, gate = torch.nn.functional.linear(x.double(), module.proj.weight.double(),
                                             module.proj.bias.double()).chunk(2, -1)
    truth = torch.nn.functional.gelu(gate) * value
    with torch.inference_mode():
        plain = module(x)
        module.fused_epilogue = True
        fused = module(x)
    assert fused.shape == plain.shape == truth.shape and fused.dtype == torch.bfloat16
    assert not torch.equal(fused, plain)             # really the other path
    (mean_f, max_f), (mean_p, max_p) = errors(fused, truth), errors(plain, truth)
    assert mean_f <= 1.05 * mean_p and max_f <= 2 * max_p, (mean_f, mean_p, max_f, max_p)


def test_linear_add_is_as_accurate_as_torchs_ops():
    gen = torch.Generator().manual_seed(2)
    x, residual = torch.randn(2, 200, 320, generator=gen).bfloat16(), torch.randn(2, 200, 96, generator=gen).bfloat16()
    weight, bias = (torch.randn(96, 320, generator=gen) / 320 ** 0.5).bfloat16(), torch.randn(96, generator=gen).bfloat16()
    truth = torch.nn.functional.linear(x.double(), weight.double(), bias.double()) + residual.double()
    fused = epilogues.linear_add(x, weight, bias, residual)
    plain = torch.nn.functional.linear(x, weight, bias).add_(residual)
    assert fused.shape == truth.shape and fused.dtype == torch.bfloat16 and not torch.equal(fused, plain)
    (mean_f, max_f), (mean_p, max_p) = errors(fused, truth), errors(plain, truth)
    assert mean_f <= 1.05 * mean_p and max_f <= 1.05 * max_p, (mean_f, mean_p, max_f, max_p)


def test_transformer_block_is_as_accurate_and_hooked_linears_are_called():
    """A whole block (attention, cross-attention, GEGLU feed-forward, residuals): fused no less accurate
    against its float64 copy; with a forward hook on each of the linears the epilogues replace (a LoRA
    side path's way in, lora.py), every hook runs and the block computes exactly torch's ops."""
    block = randomized(BasicTransformerBlock(TINY.unet, 64), 5)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 256, 64, generator=gen).bfloat16()
    context = torch.randn(2, 77, TINY.unet.context_dim, generator=gen).bfloat16()
    with torch.inference_mode():
        truth = copy_to_double(block)(x.double(), context.double())
        plain = block(x, context)
        epilogues.use_fused_epilogues(block)
        fused = block(x, context)
        (mean_f, _), (mean_p, _) = errors(fused, truth), errors(plain, truth)
        assert not torch.equal(fused, plain) and mean_f <= 1.05 * mean_p, (mean_f, mean_p)
        calls = []
        linears = [block.attn1.to_out[0], block.attn2.to_out[0], block.ff.net[0].proj, block.ff.net[2]]
        for linear in linears:
            linear.register_forward_hook(lambda m, args, out: calls.append(m))
        assert torch.equal(block(x, context), plain)
        assert len(calls) == len(linears) and {id(m) for m in calls} == {id(m) for m in linears}


def copy_to_double(block: BasicTransformerBlock) -> BasicTransformerBlock:
    twin = BasicTransformerBlock(TINY.unet, 64)
    twin.load_state_dict({k: v.double() for k, v in block.state_dict().items()})
    return twin.double()


def test_rule_is_bf16_on_cpus_with_amx():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    amx, plain = CpuKind("AVX512", True, avx512_bf16=True), CpuKind("AVX512", False, avx512_bf16=True)
    assert default_fused_epilogues(cpu, torch.bfloat16, amx)
    assert not default_fused_epilogues(cpu, torch.bfloat16, plain)
    assert not default_fused_epilogues(cpu, torch.float32, amx)
    assert not default_fused_epilogues(cuda, torch.bfloat16, amx)


def test_pipeline_runs_them_when_asked_and_exact_rows_stay_batch_invariant():
    rows = [GenerationRow(prompt=p, seed=s, width=64, height=64, steps=2)
            for p, s in (("a red cube", 3), ("a blue sphere", 4), ("a green cone", 5))]
    images = {}
    for asked in (False, True):
        pipe = Pipeline.load("tiny", device="cpu", dtype="bf16", fused_epilogues=asked, exact=True)
        marked = [m.fused_epilogue for m in pipe.model.unet.modules() if hasattr(m, "fused_epilogue")]
        assert marked and all(f is asked for f in marked) and pipe.fused_epilogues is asked
        together = pipe.generate(rows)
        one_by_one = [pipe.generate([row]) for row in rows]
        assert all(torch.equal(together.latents[i], one.latents[0]) for i, one in enumerate(one_by_one))
        images[asked] = torch.from_numpy(np.array(together.images[0])).float()
    assert (images[True] - images[False]).abs().mean().item() < 2.0   # the same image up to bf16 rounding
    auto = Pipeline.load("tiny", device="cpu", dtype="bf16")
    assert auto.fused_epilogues is default_fused_epilogues(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(InputError, match="fused linear epilogues"):
        Pipeline.load("tiny", device="cpu", dtype="bf16", fused_epilogues=True, compile="default")
