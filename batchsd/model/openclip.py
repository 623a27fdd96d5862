"""OpenCLIP text encoders: ViT-H/14, the text conditioning of Stable Diffusion 2.x, and SDXL's ViT-bigG/14.

The same computation as CLIP's text transformer (clip.py) in OpenCLIP's module layout: token +
learned position embeddings, pre-LayerNorm residual blocks with causal self-attention (one fused
q/k/v projection, `attn.in_proj_weight` [3D, D]) and a GELU MLP (`mlp.c_fc`, `mlp.c_proj`), then
`ln_final`. Stable Diffusion 2.x conditions on the PENULTIMATE block's output passed through
`ln_final` ([B, 77, 1024]): of ViT-H's 24 blocks only the first 23 are run. This module holds the
blocks it runs (`cfg.layers`); the unused last block of a released file is left in the file
(family.SD2 ignores its tensors), so diffusers' conversion (a 23-layer transformers
CLIPTextModel with hidden_act "gelu", last_hidden_state after final_layer_norm) computes the same.

SDXL's second encoder, OpenCLIP ViT-bigG/14 (width 1280, 32 blocks), is this module with a
`text_projection`: SDXL conditions on its penultimate block's raw output (no ln_final) and on the
pooled, projected end-token state (`forward_with_pooled`).

Attribute paths equal the original checkpoint keys below `cond_stage_model.model.`
(`token_embedding.weight`, `positional_embedding`, `transformer.resblocks.0.attn.in_proj_weight`,
..., `ln_final.bias`), so a released file loads by prefix split + strict key/shape check. There is
no pooling and no `text_projection` in SD 2.x's (it does not use them).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from batchsd.model.config import CLIPTextConfig


class MultiheadSelfAttention(nn.Module):
    """Causal multi-head self-attention with nn.MultiheadAttention's parameter names (fused in_proj)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        assert cfg.width % cfg.heads == 0, "width must be a multiple of heads"
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))  # [q; k; v] rows
        self.in_proj_bias = nn.Parameter(torch.empty(3 * cfg.width))
        self.out_proj = nn.Linear(cfg.width, cfg.width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)            # [B, T, 3D]
        # [B, T, 3D] -> 3 x [B, heads, T, head_dim]
        q, k, v = qkv.view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)          # scale 1/sqrt(head_dim)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        if cfg.act != "gelu":
            raise ValueError(f"an OpenCLIP text encoder uses GELU, not {cfg.act!r}")
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_width)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))   # exact (erf) GELU


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = MultiheadSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class OpenCLIPTextModel(nn.Module):
    """input_ids [B, T<=77] -> ln_final(output of the cfg.layers blocks) [B, T, width] (`forward`, SD 2.x),
    or (penultimate block's raw output [B, T, width], pooled projection [B, projection_dim])
    (`forward_with_pooled`, SDXL's ViT-bigG: cfg.projection_dim > 0)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_positions, cfg.width))
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.eps)
        if cfg.projection_dim:
            # applied as x @ text_projection (OpenCLIP's orientation: [width, projection_dim])
            self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim))
            nn.init.normal_(self.text_projection, std=cfg.width ** -0.5)

    def _embed(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """token_embeds [B, T, D]: used instead of token_embedding(input_ids) (embeddings.embed_tokens)."""
        seq_len = input_ids.shape[1]
        if seq_len > self.positional_embedding.shape[0]:
            raise ValueError(f"{seq_len} tokens > {self.positional_embedding.shape[0]} positions")
        tokens = self.token_embedding(input_ids) if token_embeds is None else token_embeds
        return tokens + self.positional_embedding[:seq_len]   # [B, T, D]

    def forward(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.ln_final(self.transformer(self._embed(input_ids, token_embeds)))

    def forward_with_pooled(self, input_ids: torch.Tensor,
                            token_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's use (sgm FrozenOpenCLIPEmbedder2, layer "penultimate", diffusers'
        CLIPTextModelWithProjection hidden_states[-2] and text_embeds): the input of the last block, and
        ln_final of the last block's output at each prompt's end token (the largest id, <|endoftext|>)
        times text_projection."""
        if not self.cfg.projection_dim:
            raise ValueError("this text encoder has no text_projection (cfg.projection_dim is 0)")
        x = self._embed(input_ids, token_embeds)
        blocks = self.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        penultimate = x                                                        # [B, T, D]
        last = self.ln_final(blocks[-1](x))                                    # [B, T, D]
        end = last[torch.arange(last.shape[0], device=last.device), input_ids.argmax(dim=-1)]   # [B, D]
        return penultimate, end @ self.text_projection                         # [B, T, D], [B, P]
