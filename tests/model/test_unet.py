"""batchsd.model.unet.UNetModel against diffusers' UNet2DConditionModel (the reference), plus the details
that are easy to get wrong: the [cos, sin] time embedding, GroupNorm eps 1e-5 in res blocks and the
output head vs 1e-6 in front of the transformers, LayerNorm eps 1e-5, upsampling to the skip's size
(odd latents), and the SD 1.5 key set."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch

import batchsd.model.unet as unet_module
from batchsd.model.config import SD15, TINY, UNetConfig
from batchsd.model.unet import UNetModel, timestep_embedding

try:  # tests/ as a package (tests/__init__.py) or as a plain folder on sys.path
    from .ref_unet import build_reference_unet, unet_state_dict_original
except ImportError:
    from ref_unet import build_reference_unet, unet_state_dict_original

# fp32 parity tolerance. Measured on TINY: ours vs diffusers ~3e-6 at 8x8/12x8/5x7/8x12, the same
# as the benign change channels_last in diffusers itself (~3e-6); a sin-first time embedding gives
# ~0.3. Degenerate latents (2x2, 3x3: GroupNorm groups of 2 values at 1x1) amplify fp32 rounding to
# ~1e-4 in either implementation, so those are checked in float64 instead.
TOL = 1e-4
TOL_F64 = 1e-10
KEYS_JSON = Path(__file__).resolve().parents[3] / "shared" / "reference" / "sd15_keys.json"
PREFIX = "model.diffusion_model."
TIMESTEPS = [957.3, 1.5, 400.25]  # one per row, fractional


def ours_from(ref, cfg: UNetConfig, assign: bool = False) -> UNetModel:
    if assign:
        with torch.device("meta"):
            model = UNetModel(cfg)
    else:
        model = UNetModel(cfg)
    model.load_state_dict(unet_state_dict_original(ref), strict=True, assign=assign)
    return model.eval()


def inputs(cfg: UNetConfig, h: int, w: int, batch: int = 3, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g, dtype=dtype)
    context = torch.randn(batch, 77, cfg.context_dim, generator=g, dtype=dtype)
    t = torch.tensor((TIMESTEPS * batch)[:batch])
    return x, t, context


@pytest.fixture(scope="module")
def tiny_pair():
    cfg = TINY.unet
    ref = build_reference_unet(cfg, seed=0)
    return cfg, ref, ours_from(ref, cfg)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------
# key set

def test_sd15_key_set_and_shapes():
    expected = {k[len(PREFIX):]: tuple(v) for k, v in json.loads(KEYS_JSON.read_text()).items()
                if k.startswith(PREFIX)}
    with torch.device("meta"):
        model = UNetModel(SD15.unet)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(expected) == 686
    assert set(ours) == set(expected), (sorted(set(ours) - set(expected)), sorted(set(expected) - set(ours)))
    assert {k for k in ours if ours[k] != expected[k]} == set()
    assert sum(p.numel() for p in model.parameters()) == sum(
        torch.Size(s).numel() for s in expected.values())


def test_tiny_reference_maps_onto_every_key(tiny_pair):
    cfg, ref, ours = tiny_pair
    mapped = unet_state_dict_original(ref)
    assert set(mapped) == set(ours.state_dict())
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in mapped.items())


# ---------------------------------------------------------------------------------------------
# whole-model parity

@pytest.mark.parametrize("h, w", [(8, 8), (12, 8), (5, 7), (8, 12)])
def test_tiny_parity_fp32(tiny_pair, h, w):
    cfg, ref, ours = tiny_pair
    x, t, context = inputs(cfg, h, w)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
    assert got.shape == (3, cfg.out_channels, h, w)
    assert expected.abs().max() > 0.5  # outputs are O(1): the tolerance is meaningful
    assert max_abs(got, expected) <= TOL


@pytest.mark.parametrize("h, w", [(1, 1), (2, 2), (3, 3), (5, 7), (7, 3)])
def test_tiny_parity_float64_odd_and_degenerate_sizes(tiny_pair, h, w):
    # float64 removes rounding amplification, so the two must agree to ~1e-14 (exact math),
    # including latents that pass through 1x1 levels and non-integer halvings
    cfg, ref, ours = tiny_pair
    ref64, ours64 = copy.deepcopy(ref).double(), copy.deepcopy(ours).double()
    x, t, context = inputs(cfg, h, w, batch=2, dtype=torch.float64)
    with torch.no_grad():
        expected = ref64(x, t, encoder_hidden_states=context).sample
        got = ours64(x, t, context)
    assert got.shape == (2, cfg.out_channels, h, w)
    assert max_abs(got, expected) <= TOL_F64


def test_rows_are_independent_and_scalar_timestep_broadcasts(tiny_pair):
    cfg, _, ours = tiny_pair
    x, t, context = inputs(cfg, 5, 7)
    with torch.no_grad():
        batched = ours(x, t, context)
        row1 = ours(x[1:2], t[1:2], context[1:2])
        same_t = ours(x, torch.tensor(t[1].item()), context)
    assert max_abs(batched[1:2], row1) <= 1e-5
    assert max_abs(same_t[1], batched[1]) <= 1e-5
    assert max_abs(same_t[0], batched[0]) > 1e-2  # the timestep matters


def test_channels_last_input_matches(tiny_pair):
    cfg, _, ours = tiny_pair
    x, t, context = inputs(cfg, 12, 8)
    with torch.no_grad():
        plain = ours(x, t, context)
        cl_model = copy.deepcopy(ours).to(memory_format=torch.channels_last)
        cl = cl_model(x.to(memory_format=torch.channels_last), t, context)
    assert max_abs(plain, cl) <= TOL


# ---------------------------------------------------------------------------------------------
# time embedding

def test_timestep_embedding_is_cos_sin_like_diffusers(tiny_pair):
    cfg, ref, _ = tiny_pair
    t = torch.tensor([0.0, 1.5, 957.3, 999.0])
    ours = timestep_embedding(t, cfg.model_channels)
    expected = ref.time_proj(t)  # diffusers Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)
    assert ours.dtype == torch.float32 and ours.shape == (4, cfg.model_channels)
    assert max_abs(ours, expected) <= 1e-6
    half = cfg.model_channels // 2
    assert torch.equal(ours[0, :half], torch.ones(half))  # t=0: cos part first
    assert torch.equal(ours[0, half:], torch.zeros(half))


def test_sin_first_time_embedding_would_fail_parity(tiny_pair, monkeypatch):
    cfg, ref, ours = tiny_pair
    x, t, context = inputs(cfg, 8, 8)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample
    correct = timestep_embedding
    half = cfg.model_channels // 2
    monkeypatch.setattr(unet_module, "timestep_embedding", lambda ts, dim: correct(ts, dim).roll(half, -1))
    with torch.no_grad():
        wrong = ours(x, t, context)
    assert max_abs(wrong, expected) > 100 * TOL


# ---------------------------------------------------------------------------------------------
# norm eps, block by block: small inputs make the group variance comparable to eps

@pytest.fixture(scope="module")
def eps_pair(tiny_pair):
    """A copy of the reference whose first res block of level 1, first transformer and output head
    see small-variance inputs at every norm (input convs / projections scaled by 1e-3)."""
    cfg, ref, _ = tiny_pair
    ref = copy.deepcopy(ref)
    with torch.no_grad():
        res = ref.down_blocks[1].resnets[0]
        for p in (*res.conv1.parameters(), *res.time_emb_proj.parameters()):
            p.mul_(1e-3)
        attn = ref.down_blocks[0].attentions[0]
        block = attn.transformer_blocks[0]
        for p in (*attn.proj_in.parameters(), *block.attn1.to_out.parameters(), *block.attn2.to_out.parameters()):
            p.mul_(1e-3)
    return cfg, ref, ours_from(ref, cfg)


def small(*shape, seed=3):
    return 1e-3 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_resblock_groupnorm_eps(eps_pair):
    cfg, ref, ours = eps_pair
    res, block = ref.down_blocks[1].resnets[0], ours.input_blocks[4][0]
    assert block.skip_connection.weight.shape[:2] == (64, 32)  # the channel-changing block
    x = small(2, 32, 6, 5)
    emb = torch.randn(2, cfg.time_embed_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = res(x, emb)
        assert max_abs(block(x, emb), expected) <= TOL
        for norm in (block.in_layers[0], block.out_layers[0]):
            assert norm.eps == cfg.eps
            norm.eps = 1e-6
            assert max_abs(block(x, emb), expected) > 1e-2, "a 1e-6 eps must break parity"
            norm.eps = cfg.eps


def test_transformer_groupnorm_and_layernorm_eps(eps_pair):
    cfg, ref, ours = eps_pair
    attn, block = ref.down_blocks[0].attentions[0], ours.input_blocks[1][1]
    x = small(2, 32, 6, 5)
    context = torch.randn(2, 77, cfg.context_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = attn(x, encoder_hidden_states=context).sample
        assert max_abs(block(x, context), expected) <= TOL
        tb = block.transformer_blocks[0]
        for norm, wrong in ((block.norm, 1e-5), (tb.norm1, 1e-6), (tb.norm2, 1e-6), (tb.norm3, 1e-6)):
            right = norm.eps
            norm.eps = wrong
            assert max_abs(block(x, context), expected) > 1e-2, f"eps {wrong} must break parity"
            norm.eps = right
    assert block.norm.eps == 1e-6 and tb.norm1.eps == cfg.transformer_eps == 1e-5


def test_output_head_groupnorm_eps(eps_pair):
    cfg, ref, ours = eps_pair
    x = small(2, cfg.model_channels, 6, 5)
    with torch.no_grad():
        expected = ref.conv_out(ref.conv_act(ref.conv_norm_out(x)))
        assert max_abs(ours.out(x), expected) <= TOL
        ours.out[0].eps = 1e-6
        assert max_abs(ours.out(x), expected) > 1e-2
        ours.out[0].eps = cfg.eps


# ---------------------------------------------------------------------------------------------
# full width

def test_sd15_full_width_parity_8x8():
    start = time.perf_counter()
    cfg = SD15.unet
    ref = build_reference_unet(cfg, seed=0)
    ours = ours_from(ref, cfg, assign=True)  # shares the reference's tensors: no second copy
    x, t, context = inputs(cfg, 8, 8, batch=2)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
    diff = max_abs(got, expected)
    print(f"SD15 8x8 max abs {diff:.2e} (max |eps| {expected.abs().max():.2f}), "
          f"{time.perf_counter() - start:.1f} s")
    assert expected.abs().max() > 0.5
    assert diff <= TOL


# ---------------------------------------------------------------------------------------------
# the cross-attentions' K/V projections kept across steps (fast/context_projections.py)

def test_context_projections_kept_give_the_same_bits_and_are_computed_once(tiny_pair, monkeypatch):
    from batchsd.model.fast.context_projections import reuse_context_projections

    cfg, _, ours = tiny_pair
    x, t, context = inputs(cfg, 16, 16, batch=2)
    other = context.clone()                                 # equal values, another tensor: computed again
    calls = []
    keys_values = unet_module.CrossAttention._keys_values
    monkeypatch.setattr(unet_module.CrossAttention, "_keys_values",
                        lambda self, c: calls.append(c is context) or keys_values(self, c))
    cross = sum(1 for m in ours.modules() if isinstance(m, unet_module.CrossAttention)) // 2   # attn2 of each block
    with torch.no_grad():
        plain = [ours(x + i, t, context) for i in range(3)]
        assert calls.count(True) == 3 * cross               # every step projects the context again
        calls.clear()
        with reuse_context_projections(ours) as kept_by:
            assert kept_by == 2 * cross
            reused = [ours(x + i, t, context) for i in range(3)]
            assert calls.count(True) == cross               # once per cross-attention, at the first step
            ours(x, t, other)
            assert calls.count(False) == 4 * cross + cross  # self-attention at each of 4 calls; `other` once
        assert all(m.context_cache is None for m in ours.modules() if isinstance(m, unet_module.CrossAttention))
    assert all(torch.equal(a, b) for a, b in zip(plain, reused))
