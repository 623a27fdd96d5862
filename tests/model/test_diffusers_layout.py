"""diffusers -> original key mapping: exact SD 1.5 key set/shapes, and a round trip through diffusers' own converter."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from batchsd.model.diffusers_layout import diffusers_to_original
from batchsd.model.stable_diffusion import ORIGINAL_PREFIX

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint  # noqa: E402

SD15_KEYS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "sd15_keys.json"

# Full SD 1.5 component configs (as in the runwayml/stable-diffusion-v1-5 folder).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_CLIP = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)


def sd15_reference_shapes() -> dict[str, tuple[int, ...]]:
    if not SD15_KEYS.exists():
        pytest.skip(f"{SD15_KEYS} not available")
    table = json.loads(SD15_KEYS.read_text())
    model_prefixes = tuple(ORIGINAL_PREFIX.values())
    return {k: tuple(v) for k, v in table.items() if k.startswith(model_prefixes) and not k.endswith("position_ids")}


def meta_state_dicts(unet_cfg: dict, vae_cfg: dict, clip_cfg: dict) -> dict[str, dict[str, torch.Tensor]]:
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**unet_cfg)
        vae = diffusers.AutoencoderKL(**vae_cfg)
        clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_cfg))
    return {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": clip.state_dict()}


def mapped_shapes(state_dicts: dict[str, dict[str, torch.Tensor]]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for component, sd in state_dicts.items():
        sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
        for key, tensor in diffusers_to_original(component, sd).items():
            shapes[ORIGINAL_PREFIX[component] + key] = tuple(tensor.shape)
    return shapes


def test_sd15_keys_and_shapes_match_reference_exactly():
    reference = sd15_reference_shapes()
    got = mapped_shapes(meta_state_dicts(SD15_UNET, SD15_VAE, SD15_CLIP))
    assert len(reference) == 686 + 248 + 196  # the 197 CLIP tensors include position_ids
    assert sorted(set(got) - set(reference)) == []
    assert sorted(set(reference) - set(got)) == []
    mis_shaped = {k: (got[k], reference[k]) for k in reference if got[k] != reference[k]}
    assert mis_shaped == {}


def test_text_encoder_with_and_without_text_model_level():
    sd = {"embeddings.token_embedding.weight": torch.zeros(3, 2), "final_layer_norm.bias": torch.ones(2)}
    flat = diffusers_to_original("text_encoder", sd)
    nested = diffusers_to_original("text_encoder", {"text_model." + k: v for k, v in sd.items()})
    assert set(flat) == set(nested) == set(sd)
    assert all(flat[k] is nested[k] is sd[k] for k in sd)


def test_vae_attention_pre_0_14_names():
    """Old diffusers VAE folders name the mid attention query/key/value/proj_attn: same original keys."""
    gen = torch.Generator().manual_seed(3)
    new = {f"decoder.mid_block.attentions.0.{n}.{p}": torch.randn((4, 4) if p == "weight" else (4,), generator=gen)
           for n in ("to_q", "to_k", "to_v", "to_out.0", "group_norm") for p in ("weight", "bias")}
    new["decoder.mid_block.attentions.0.group_norm.weight"] = torch.randn(4, generator=gen)
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn", "group_norm": "group_norm"}
    old = {}
    for k, v in new.items():
        module, param = k.removeprefix("decoder.mid_block.attentions.0.").rsplit(".", 1)
        old[f"decoder.mid_block.attentions.0.{names[module]}.{param}"] = v
    a, b = diffusers_to_original("vae", new), diffusers_to_original("vae", old)
    assert set(a) == set(b) == {f"decoder.mid.attn_1.{m}.{p}" for m in ("q", "k", "v", "proj_out", "norm")
                                for p in ("weight", "bias")}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["decoder.mid.attn_1.proj_out.weight"].shape == (4, 4, 1, 1)
    assert torch.equal(a["decoder.mid.attn_1.q.weight"][:, :, 0, 0], new["decoder.mid_block.attentions.0.to_q.weight"])


def test_unknown_component_rejected():
    with pytest.raises(ValueError, match="unknown component"):
        diffusers_to_original("controlnet", {})


def _random_like_shapes(shapes: dict[str, tuple[int, ...]], gen: torch.Generator, cap: int | None = None) -> dict:
    """Random tensors; with `cap`, every dimension is clamped to at most `cap` (keeps ndim and the 1s)."""
    out = {}
    for k, shape in shapes.items():
        shape = tuple(min(d, cap) for d in shape) if cap else shape
        out[k] = torch.randn(shape, generator=gen)
    return out


def _round_trip(original: dict[str, torch.Tensor], layers_per_block: int, levels: int) -> None:
    """original (prefixed) -> diffusers' converters -> diffusers_to_original -> must be the same tensors."""
    unet_cfg = {"layers_per_block": layers_per_block}
    vae_cfg = {"down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
    diff_unet = convert_ldm_unet_checkpoint(original, unet_cfg)
    diff_vae = convert_ldm_vae_checkpoint(original, vae_cfg)
    clip_prefix = ORIGINAL_PREFIX["text_encoder"]
    diff_clip = {"text_model." + k[len(clip_prefix):]: v for k, v in original.items() if k.startswith(clip_prefix)}
    back = {}
    for component, sd in (("unet", diff_unet), ("vae", diff_vae), ("text_encoder", diff_clip)):
        for key, tensor in diffusers_to_original(component, sd).items():
            back[ORIGINAL_PREFIX[component] + key] = tensor
    assert sorted(set(back) ^ set(original)) == []
    for k, v in original.items():
        assert back[k].shape == v.shape, k
        assert torch.equal(back[k], v), k


def test_round_trip_sd15_key_set_through_diffusers_converters():
    gen = torch.Generator().manual_seed(0)
    original = _random_like_shapes(sd15_reference_shapes(), gen, cap=3)
    _round_trip(original, layers_per_block=2, levels=4)


@pytest.mark.parametrize("layers_per_block,attention", [(1, (True, False, True)), (3, (False, True, True))])
def test_round_trip_other_topologies(layers_per_block, attention):
    """3 levels, other res-block counts and attention patterns: the mapping is not tied to SD 1.5's table.

    The original keys are produced by our mapping from a diffusers model's keys; diffusers' converter
    must then send them back to exactly that model's keys and our mapping back to the same tensors.
    """
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    unet_cfg = dict(block_out_channels=(32, 64, 64), layers_per_block=layers_per_block, down_block_types=down,
                    up_block_types=up, cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8,
                    mid_block_type="UNetMidBlock2DCrossAttn")
    vae_cfg = dict(block_out_channels=(16, 32, 32), layers_per_block=layers_per_block, norm_num_groups=8,
                   down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    clip_cfg = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=77)
    meta = meta_state_dicts(unet_cfg, vae_cfg, clip_cfg)
    shapes = mapped_shapes(meta)
    gen = torch.Generator().manual_seed(1)
    original = _random_like_shapes(shapes, gen)

    diff_unet = convert_ldm_unet_checkpoint(original, {"layers_per_block": layers_per_block})
    assert set(diff_unet) == set(meta["unet"])
    assert all(diff_unet[k].shape == meta["unet"][k].shape for k in diff_unet)
    vae_levels = {"down_block_types": [0] * 3, "up_block_types": [0] * 3}
    diff_vae = convert_ldm_vae_checkpoint(original, vae_levels)
    assert set(diff_vae) == set(meta["vae"])
    assert all(diff_vae[k].shape == meta["vae"][k].shape for k in diff_vae)
    _round_trip(original, layers_per_block=layers_per_block, levels=3)
