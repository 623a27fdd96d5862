"""batchsd.model.clip.CLIPTextModel against transformers.CLIPTextModel (the reference), same weights.

Measured here (fp32, CPU): TINY max |diff| about 1e-6, full SD 1.5 width about 3e-6 against
eager attention; transformers' own eager-vs-sdpa gap (the noise floor) is of the same order.
The 1e-4 tolerance sits well above that and far below what a real bug produces on these O(1)
activations (exact GELU in place of QuickGELU: 3e-2 on TINY, checked below).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from batchsd.model.clip import CLIPTextModel
from batchsd.model.config import SD15, TINY
from batchsd.model.tokenizer import tokenize
try:  # tests/ as a package (tests/__init__.py) or as a plain folder on sys.path
    from .ref_clip import (TEXT_MODEL_PREFIX, build_reference_clip, randomize_clip_, reference_clip_config,
                           reference_clip_state_dict_original)
except ImportError:
    from ref_clip import (TEXT_MODEL_PREFIX, build_reference_clip, randomize_clip_, reference_clip_config,
                          reference_clip_state_dict_original)

SD15_KEYS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "sd15_keys.json"
TOLERANCE = 1e-4

PROMPTS = [
    "a photo of a cat",
    "",
    "an astronaut riding a horse on mars, highly detailed, 8k, trending on artstation",
    "portrait of a woman (smiling:1.2), [oil painting], by greg rutkowski, " * 8,  # truncated
]


def ours_from_reference(reference, cfg) -> CLIPTextModel:
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    model.load_state_dict(reference_clip_state_dict_original(reference), strict=True, assign=True)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_pair():
    reference = build_reference_clip(TINY.clip, seed=1234)
    return reference, ours_from_reference(reference, TINY.clip)


@torch.no_grad()
def test_tiny_parity(tiny_pair):
    reference, ours = tiny_pair
    ids, truncated = tokenize(PROMPTS)
    assert truncated == [False, False, False, True]
    expected = reference(ids).last_hidden_state
    got = ours(ids)
    assert got.shape == (len(PROMPTS), 77, TINY.clip.width) and got.dtype == torch.float32
    diff = (got - expected).abs().max().item()
    print(f"TINY CLIP max abs diff vs transformers (eager): {diff:.2e}")
    assert diff <= TOLERANCE
    assert expected.std() > 0.5  # activations O(1): the tolerance is meaningful

    # shorter-than-77 inputs go through the same code
    short = ids[:, :20]
    assert (ours(short) - reference(short).last_hidden_state).abs().max().item() <= TOLERANCE


@torch.no_grad()
def test_tiny_noise_floor_and_tolerance_is_discriminating(tiny_pair):
    reference, ours = tiny_pair
    ids, _ = tokenize(PROMPTS)
    expected = reference(ids).last_hidden_state
    sdpa = build_reference_clip(TINY.clip, seed=1234, attn_implementation="sdpa")
    floor = (sdpa(ids).last_hidden_state - expected).abs().max().item()
    print(f"noise floor (transformers eager vs sdpa): {floor:.2e}")
    assert floor <= TOLERANCE / 10

    # a real bug moves outputs far beyond the tolerance: exact GELU in place of QuickGELU
    gelu = build_reference_clip(TINY.clip, seed=1234)
    mlps = [m for m in gelu.modules() if hasattr(m, "activation_fn")]
    assert len(mlps) == TINY.clip.layers
    for mlp in mlps:
        mlp.activation_fn = torch.nn.GELU()
    assert (gelu(ids).last_hidden_state - expected).abs().max().item() > 100 * TOLERANCE

    # another seed -> different weights -> different outputs (the seed is used)
    other = build_reference_clip(TINY.clip, seed=1235)
    assert (other(ids).last_hidden_state - expected).abs().max().item() > 0.1


@torch.no_grad()
def test_causal():
    torch.manual_seed(0)
    model = CLIPTextModel(TINY.clip).eval()
    randomize_clip_(model, seed=7)
    ids, _ = tokenize(["a photo of a cat"])
    changed = ids.clone()
    changed[0, 10] = 2368  # a padding position becomes "cat"
    a, b = model(ids), model(changed)
    assert torch.equal(a[0, :10], b[0, :10])  # earlier positions do not see later tokens
    assert (a[0, 10:] - b[0, 10:]).abs().max() > 1e-2


@torch.no_grad()
def test_bf16_close_to_fp32(tiny_pair):
    _, ours = tiny_pair
    ids, _ = tokenize(PROMPTS)
    fp32 = ours(ids)
    bf16 = CLIPTextModel(TINY.clip).eval()
    bf16.load_state_dict(ours.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    got = bf16(ids)
    assert got.dtype == torch.bfloat16
    rel = ((got.float() - fp32).norm() / fp32.norm()).item()
    assert rel < 3e-2, rel


@torch.no_grad()
def test_sd15_full_width_parity():
    reference = build_reference_clip(SD15.clip, seed=99)
    ours = ours_from_reference(reference, SD15.clip)
    ids, _ = tokenize(PROMPTS[:2])
    expected = reference(ids).last_hidden_state
    got = ours(ids)
    assert got.shape == (2, 77, 768)
    diff = (got - expected).abs().max().item()
    print(f"SD15 CLIP max abs diff vs transformers (eager): {diff:.2e}")
    assert diff <= TOLERANCE
    assert expected.std() > 0.5


def test_state_dict_matches_sd15_checkpoint_keys():
    keys = json.loads(SD15_KEYS.read_text())
    expected = {k[len(TEXT_MODEL_PREFIX):]: tuple(shape) for k, shape in keys.items()
                if k.startswith(TEXT_MODEL_PREFIX)}
    assert expected.pop("embeddings.position_ids") == (1, 77)
    assert len(expected) == 196

    with torch.device("meta"):
        ours = CLIPTextModel(SD15.clip)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected

    import transformers
    with torch.device("meta"):
        reference = transformers.CLIPTextModel(reference_clip_config(SD15.clip))
    ref_keys = {k: tuple(v.shape) for k, v in reference_clip_state_dict_original(reference).items()}
    assert ref_keys == expected
    with_ids = reference_clip_state_dict_original(reference, include_position_ids=True)
    assert with_ids["embeddings.position_ids"].tolist() == [list(range(77))]
