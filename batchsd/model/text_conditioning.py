"""Prompts -> the UNet's text conditioning, under a row's prompt syntax and clip skip.

    plain   family.encode_text: one 77-token window, cut (diffusers' reading)
    a1111   prompt_syntax.chunk_prompt's 77-id chunks through family.encode_chunks, each text
            encoder's hidden states multiplied by the tokens' emphasis and scaled back to the
            chunk's mean (A1111's "Original" emphasis, per encoder and per chunk, in float32), the
            chunks concatenated: [77 * chunks, D]; SDXL's pooled embedding is the first chunk's;
            <lora:...> tags are removed first (they name the row's LoRAs, as in A1111)

Under both, textual-inversion embeddings named in a prompt put their vectors in place of token
embeddings (model/embeddings.py).

A row's conditional and unconditional contexts are padded to the same number of chunks with the
empty prompt's encoding (A1111's pad_cond_uncond), or with zeros when the unconditional side is zero
conditioning (family.zero_empty_negative); request.batch_key puts rows of one chunk count together.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from batchsd.model.embeddings import Embedding, slots_at
from batchsd.model.family import ModelFamily
from batchsd.model.prompt_syntax import chunk_prompt, fragment_tokenizer, strip_lora_tags


@dataclass(frozen=True)
class EncodedPrompt:
    context: torch.Tensor               # [77 * chunks, D]
    truncated: bool                     # cut at 77 tokens (plain syntax only)
    pooled: torch.Tensor | None = None  # [P] (SDXL)


def clip_skip_layers(family: ModelFamily, clip_skip: int | None) -> int:
    """Text encoder layers a row's clip_skip leaves out (A1111: 1 = the last layer, 2 = the
    penultimate, ...); ValueError for a family that reads a fixed layer."""
    if clip_skip is None or clip_skip == 1:
        return 0
    if not family.clip_skip:
        raise ValueError(f"clip_skip {clip_skip}: {family.label} models read a fixed text encoder layer "
                         f"(A1111 ignores clip skip for them too); leave clip_skip empty or 1")
    return clip_skip - 1


def encode_prompts(family: ModelFamily, model: nn.Module, prompts: list[str], device: torch.device,
                   syntax: str = "plain", skip: int = 0, embeddings: Mapping[str, Embedding] | None = None
                   ) -> list[EncodedPrompt]:
    """Each prompt's conditioning under `syntax` ("plain" | "a1111") with `skip` layers left out;
    `embeddings` (name -> Embedding, checked against the model: embeddings.check_fits) are the textual
    inversions the prompts may name."""
    embeddings = dict(embeddings or {})
    if syntax == "plain":
        encoded = family.encode_text(model, prompts, device, skip, embeddings)
        pooled = encoded.pooled if encoded.pooled is not None else [None] * len(prompts)
        return [EncodedPrompt(c, cut, p) for c, cut, p in zip(encoded.context, encoded.truncated, pooled)]
    if syntax != "a1111":
        raise ValueError(f"unknown prompt syntax {syntax!r}")
    tokenize = fragment_tokenizer({name: e.vectors for name, e in embeddings.items()})
    out = []
    for prompt in prompts:
        chunks = chunk_prompt(strip_lora_tags(prompt), tokenize)   # the tags name the row's LoRAs (job/loras.py)
        ids = torch.tensor([c.ids for c in chunks], dtype=torch.long)                      # [k, 77]
        weights = torch.tensor([c.weights for c in chunks], dtype=torch.float32, device=device)  # [k, 77]
        slots = [slots_at(c.embeddings, embeddings) for c in chunks]
        states, pooled = family.encode_chunks(model, ids, device, skip, slots)             # [k, 77, D_i] each
        context = torch.cat([emphasize(z, weights) for z in states], dim=-1)               # [k, 77, D]
        out.append(EncodedPrompt(context.reshape(-1, context.shape[-1]), False,
                                 None if pooled is None else pooled[0]))
    return out


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Hidden states [k, 77, D] times their tokens' weights [k, 77], each chunk scaled back to its
    mean, in float32 (A1111's float32 multipliers promote its states), returned in z's dtype. A chunk
    whose weights are all 1 is returned as is (the same bits as without emphasis); one whose weighted
    mean is exactly 0 is not rescaled (A1111 would divide by 0)."""
    z32 = z.float()
    original = z32.mean(dim=(1, 2), keepdim=True)
    weighted = z32 * weights[:, :, None]
    new = weighted.mean(dim=(1, 2), keepdim=True)
    scaled = weighted * torch.where(new == 0, torch.ones_like(new), original / new)
    plain = (weights == 1).all(dim=1)[:, None, None]
    return torch.where(plain, z32, scaled).to(z.dtype)


def pad_to_chunks(context: torch.Tensor, chunks: int, filler: torch.Tensor) -> torch.Tensor:
    """[77 * k, D] -> [77 * chunks, D], appending `filler` [77, D] (chunks >= k)."""
    missing = chunks - context.shape[0] // filler.shape[0]
    return context if missing <= 0 else torch.cat([context, *[filler] * missing])
