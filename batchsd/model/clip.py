"""CLIP ViT-L/14 text encoder, the text conditioning of Stable Diffusion 1.x.

A GPT-style stack: token + learned position embeddings, `layers` pre-LayerNorm transformer
blocks with causal self-attention and a QuickGELU MLP, a final LayerNorm. Stable Diffusion 1.x
conditions on the last hidden state ([B, 77, 768]), SDXL on the penultimate block's raw output;
there is no pooling or projection here.

Attribute paths equal the original checkpoint keys below `cond_stage_model.transformer.text_model.`
(`embeddings.token_embedding.weight`, `encoder.layers.0.self_attn.q_proj.weight`, ...,
`final_layer_norm.bias`), so a released file loads by prefix strip + strict `load_state_dict`.
The checkpoints' `embeddings.position_ids` (just 0..76) is not stored: positions are the first T
rows of the position table.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from batchsd.model.config import CLIPTextConfig


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)        # [V, D]
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)  # [77, D]

    def forward(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids: [B, T] -> [B, T, D]; token_embeds [B, T, D]: used instead of token_embedding(input_ids)
        # (textual inversion vectors in place: batchsd/model/embeddings.py)
        seq_len = input_ids.shape[1]
        if seq_len > self.position_embedding.num_embeddings:
            raise ValueError(f"{seq_len} tokens > {self.position_embedding.num_embeddings} positions")
        tokens = self.token_embedding(input_ids) if token_embeds is None else token_embeds
        return tokens + self.position_embedding.weight[:seq_len]


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v projections (as in the checkpoint)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        assert cfg.width % cfg.heads == 0, "width must be a multiple of heads"
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        # [B, T, D] -> [B, heads, T, head_dim]
        q, k, v = (proj(x).view(B, T, self.heads, D // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(head_dim)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.out_proj(y)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)                    # [B, T, mlp_width]
        h = h * torch.sigmoid(1.702 * h)   # QuickGELU
        return self.fc2(h)                 # [B, T, D]


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return x


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextModel(nn.Module):
    """input_ids [B, T<=77] -> hidden state after the cfg.layers blocks [B, T, width], through
    final_layer_norm when cfg.final_norm (SD 1.x: all 12 blocks, normed; SDXL: the first 11 blocks'
    raw output, transformers' hidden_states[-2])."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        if cfg.final_norm:
            self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, input_ids: torch.Tensor, skip: int = 0, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """`skip`: leave out the last `skip` blocks (A1111's clip skip minus 1; diffusers' clip_skip);
        the final norm, if any, is applied to the last block run. `token_embeds` [B, T, D]: the token
        embeddings to use instead of looking input_ids up (embeddings.embed_tokens)."""
        if not 0 <= skip < len(self.encoder.layers):
            raise ValueError(f"cannot skip {skip} of {len(self.encoder.layers)} text encoder layers")
        x = self.embeddings(input_ids, token_embeds)   # [B, T, D]
        for layer in self.encoder.layers[:len(self.encoder.layers) - skip]:
            x = layer(x)                    # [B, T, D]
        return self.final_layer_norm(x) if self.cfg.final_norm else x
