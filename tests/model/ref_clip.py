"""Reference CLIP text encoder for parity tests: transformers.CLIPTextModel with seeded random weights.

    from ref_clip import build_reference_clip, reference_clip_state_dict_original

`build_reference_clip(cfg, seed)` gives an eval-mode `transformers.CLIPTextModel` shaped by a batchsd
`CLIPTextConfig`, configured as SD 1.x's text encoder (quick_gelu, 77 positions, eos 49407), with
every parameter drawn from `torch.Generator().manual_seed(seed)` in sorted key order (independent
of transformers' own init and of its key naming): LayerNorm weight 1 + 0.1*randn and bias
0.1*randn; Linear weights randn / sqrt(fan_in), biases 0.1*randn; token embeddings randn, position
embeddings 0.5*randn. Every tensor matters and activations stay O(1).

`reference_clip_state_dict_original(model)` gives its weights under the original checkpoint's key
names below `cond_stage_model.transformer.text_model.` (transformers 5 drops the `text_model.`
level in `state_dict()`, transformers 4 keeps it: both are handled).
"""
from __future__ import annotations

import math

import torch
import transformers

from batchsd.model.config import CLIPTextConfig

TEXT_MODEL_PREFIX = "cond_stage_model.transformer.text_model."


def _strip_text_model(key: str) -> str:
    return key[len("text_model."):] if key.startswith("text_model.") else key


def reference_clip_config(cfg: CLIPTextConfig) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions,
        hidden_act="quick_gelu",
        layer_norm_eps=cfg.eps,
        projection_dim=768,
        # As openai/clip-vit-large-patch14. Only eos_token_id is read by the model, and only for
        # pooler_output (the eos position); last_hidden_state does not depend on any of them.
        pad_token_id=1,
        bos_token_id=49406,
        eos_token_id=49407,
    )


@torch.no_grad()
def randomize_clip_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter of a (transformers or batchsd) CLIP text model, deterministically."""
    gen = torch.Generator().manual_seed(seed)
    params = {_strip_text_model(k): p for k, p in model.named_parameters()}
    for key in sorted(params):
        p = params[key]
        if "layer_norm" in key:
            p.normal_(1.0 if key.endswith("weight") else 0.0, 0.1, generator=gen)
        elif key == "embeddings.token_embedding.weight":
            p.normal_(0.0, 1.0, generator=gen)
        elif key == "embeddings.position_embedding.weight":
            p.normal_(0.0, 0.5, generator=gen)
        elif key.endswith("weight"):  # Linear [out, in]
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=gen)
        else:  # Linear bias
            p.normal_(0.0, 0.1, generator=gen)


def build_reference_clip(cfg: CLIPTextConfig, seed: int,
                         attn_implementation: str = "eager") -> transformers.CLIPTextModel:
    """transformers.CLIPTextModel (fp32, eval) with seeded random weights; eager attention by default.

    """
    return random_text_model(transformers.CLIPTextModel, reference_clip_config(cfg), seed, attn_implementation)


def random_text_model(model_class, config: transformers.CLIPTextConfig, seed: int, attn_implementation: str = "eager"):
    """`model_class(config)` (a transformers CLIP text model, with or without projection; fp32, eval)
    built on the meta device and materialized uninitialized (transformers' own init of a full-size
    encoder costs seconds), its position ids filled in, every parameter drawn by `randomize_clip_`."""
    with torch.device("meta"):
        model = model_class(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, buf in model.named_buffers():
            assert name.endswith("embeddings.position_ids"), f"unexpected buffer {name}"
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    model.set_attn_implementation(attn_implementation)
    randomize_clip_(model, seed)
    return model.eval()


def reference_clip_state_dict_original(model: transformers.CLIPTextModel,
                                       include_position_ids: bool = False) -> dict[str, torch.Tensor]:
    """Weights keyed as the original checkpoint after `cond_stage_model.transformer.text_model.`.

    `include_position_ids=True` adds `embeddings.position_ids` (int64 [1, 77], 0..76), which released
    SD 1.x files carry and batchsd's CLIPTextModel does not have.
    """
    sd = {_strip_text_model(k): v for k, v in model.state_dict().items()}
    sd.pop("embeddings.position_ids", None)  # a non-persistent buffer in recent transformers
    if include_position_ids:
        n = model.config.max_position_embeddings
        sd["embeddings.position_ids"] = torch.arange(n, dtype=torch.int64)[None]
    return sd
