"""Textual inversion: embedding files, and prompts whose embedding names become the embeddings' vectors.

Files (the token in a prompt is the file's stem, as A1111 names them):

    A1111 .pt            {"string_to_param": {"*": [n, D]}, "string_to_token": ..., "name": ..., ...}
    A1111 .safetensors   {"emb_params": [n, D]}
    diffusers            learned_embeds.safetensors / .bin: {"<token>": [D] or [n, D]} (one tensor)
    SDXL                 {"clip_l": [n, 768], "clip_g": [n, 1280]}: one table per text encoder

How the text encoders take them (no vocabulary change): an embedding's name in a prompt becomes n
placeholder positions (`PLACEHOLDER_ID`), and the token-embedding output at those positions is replaced
by the n vectors before the position embeddings are added (the encoders' `token_embeds` argument:
clip.CLIPTextModel.forward, openclip.OpenCLIPTextModel.forward / forward_with_pooled). This is what A1111
does (its "fixes") and what diffusers' load_textual_inversion computes with added tokens.

The API, for the prompt encoders (GenerationRow.embeddings gives a row's files; job/embeddings.py
finds which files of a folder a row's prompts name):

    embedding = load_embedding(path)                   # read once per file version, cached
    check_fits(embedding, model)                       # one table per text encoder, of its width
    embeddings = {embedding.name: embedding, ...}
    pieces = tokenize_text(text, embeddings, pad_token)   # BPE ids without BOS/EOS + the vector slots
    ids, slots, truncated = tokenize_prompts(prompts, embeddings, pad_token)   # [B, 77], as tokenize()
    x = embed_tokens(encoder, ids, slots, "clip_l")    # [B, 77, D] for encoder(ids, token_embeds=x)

`tokenize_text` and `tokenize_prompts` are the plain syntax's reading (one 77-token window, cut);
the a1111 syntax chunks with prompt_syntax.chunk_prompt, which keeps each embedding's n positions in one
chunk, and `slots_at` turns a chunk's embedding positions into slots. Which names match where is
prompt_syntax.embedding_pattern's rule; diffusers' load_textual_inversion replaces substrings instead,
so there "styles" is "style" + "s".
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple

import torch
from torch import nn

from batchsd.errors import InputError
from batchsd.model.hash_cache import stamp
from batchsd.model.safe_pickle import PickleRefused, PickleUnreadable, load_pickle
from batchsd.model.prompt_syntax import CHUNK_TOKENS, PLACEHOLDER_ID, EmbeddingRef, fragment_tokenizer
from batchsd.model.tokenizer import BOS_ID, EOS_ID, MAX_LENGTH, SD2_PAD_ID, SD2_PAD_TOKEN

# PLACEHOLDER_ID (prompt_syntax): any id below <|endoftext|> will do (OpenCLIP pools at the largest id,
# which must stay the end token); its own embedding is always replaced. "!" (id 0), as A1111's.
SINGLE = "single"              # the key of a one-encoder (SD 1.x / 2.x) file's table
SDXL_KEYS = ("clip_l", "clip_g")   # SDXL's tables: text_encoder (CLIP ViT-L), text_encoder_2 (OpenCLIP ViT-bigG)


class EmbeddingError(InputError):
    """An embedding file that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class Embedding:
    name: str                            # the prompt token: the file's stem
    path: Path
    tables: Mapping[str, torch.Tensor]   # SINGLE -> [n, D], or "clip_l"/"clip_g" -> [n, 768]/[n, 1280]

    @property
    def vectors(self) -> int:
        return next(iter(self.tables.values())).shape[0]


def _read_tensors(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        return load_pickle(path)
    except PickleRefused as e:
        raise EmbeddingError(f"embedding {path} is refused: its pickle needs more than tensors (it references "
                             f"{e.global_name}); batchsd never runs code from a file: use a .safetensors "
                             "version") from None
    except PickleUnreadable as e:
        raise EmbeddingError(f"embedding {path} cannot be read ({e.what})") from None
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file, named
        raise EmbeddingError(f"embedding {path} cannot be read ({type(e).__name__}: {e})") from e


def read_embedding(path: str | Path) -> Embedding:
    """Read an embedding file of any layout in the module docstring (EmbeddingError otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"embedding file {path} does not exist")
    data = _read_tensors(path)
    if not isinstance(data, dict):
        raise EmbeddingError(f"embedding {path} is not a dict of tensors")
    if "string_to_param" in data:                                  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"embedding {path}: string_to_param holds {len(params)} entries, not one")
        tables = {SINGLE: next(iter(params.values()))}
    elif "emb_params" in data:                                     # A1111 .safetensors
        tables = {SINGLE: data["emb_params"]}
    elif set(SDXL_KEYS) <= set(data):                              # SDXL
        tables = {k: data[k] for k in SDXL_KEYS}
    elif len(data) == 1:                                           # diffusers: {token: vectors}
        tables = {SINGLE: next(iter(data.values()))}
    else:
        raise EmbeddingError(f"embedding {path}: unknown layout (keys {sorted(data)[:5]}): expected "
                             f"string_to_param, emb_params, clip_l + clip_g, or one token's vectors")
    out = {}
    for key, table in tables.items():
        if not isinstance(table, torch.Tensor) or table.ndim not in (1, 2) or not table.is_floating_point():
            raise EmbeddingError(f"embedding {path}: {key} is not a float [n, D] tensor")
        out[key] = table.detach().float().reshape(-1, table.shape[-1]).contiguous()
    if len({t.shape[0] for t in out.values()}) != 1:
        raise EmbeddingError(f"embedding {path}: its tables have different vector counts "
                             f"{[tuple(t.shape) for t in out.values()]}")
    vectors = next(iter(out.values())).shape[0]
    if not 1 <= vectors <= CHUNK_TOKENS:
        raise EmbeddingError(f"embedding {path} has {vectors} vectors: a prompt chunk holds 1..{CHUNK_TOKENS}")
    return Embedding(path.stem, path, out)


_read_cache: dict[tuple[str, int, int], Embedding] = {}
_read_lock = threading.Lock()


def load_embedding(path: str | Path) -> Embedding:
    """`read_embedding`, kept per file version (hash_cache.stamp): a run reads each file once, and a
    file replaced in place is read again."""
    path = Path(path)
    try:
        key = stamp([path])   # path, size, times and inode: a file saved over the old one is a new key
    except OSError:
        raise EmbeddingError(f"embedding file {path} does not exist") from None
    with _read_lock:
        if key not in _read_cache:
            _read_cache[key] = read_embedding(path)
        return _read_cache[key]


def embedding_vectors(paths: Iterable[str | Path]) -> dict[str, int]:
    """Each embedding file's name (stem) -> its vector count (what A1111 chunking needs to know)."""
    return {Path(p).stem: load_embedding(p).vectors for p in paths}


def encoder_tables(model: nn.Module) -> dict[str, int]:
    """The model's text encoders as table key -> width: SDXL "clip_l"/"clip_g", else SINGLE."""
    if hasattr(model, "text_encoder_2"):
        return {"clip_l": model.text_encoder.cfg.width, "clip_g": model.text_encoder_2.cfg.width}
    return {SINGLE: model.text_encoder.cfg.width}


def check_fits(embedding: Embedding, model: nn.Module, label: str = "the model") -> None:
    """EmbeddingError unless the embedding has one table per text encoder of `model`, each of its width."""
    want = encoder_tables(model)
    have = {k: t.shape[1] for k, t in embedding.tables.items()}
    if set(have) != set(want):
        kind = "SD 1.x/2.x (one table)" if SINGLE in want else "SDXL (clip_l + clip_g)"
        got = "SDXL (clip_l + clip_g)" if SINGLE not in have else f"SD 1.x/2.x (one {have[SINGLE]}-wide table)"
        raise EmbeddingError(f"embedding {embedding.name} ({embedding.path}) is for {got}; {label} needs {kind}: "
                             f"use one made for this model, or move it out of the embeddings folder")
    bad = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
    if bad:
        detail = ", ".join(f"{k}: {h}-wide vectors, the encoder is {w}-wide" for k, (h, w) in bad.items())
        raise EmbeddingError(f"embedding {embedding.name} ({embedding.path}) does not fit {label} ({detail}): "
                             f"it was trained for another model family: use one made for this model, or move it "
                             f"out of the embeddings folder")


# ----------------------------------------------------------------------------- prompts -> ids and slots

class Slot(NamedTuple):
    """One embedding vector's place: position in the id sequence, the embedding, which of its vectors."""
    position: int
    embedding: Embedding
    index: int


@dataclass(frozen=True)
class TextTokens:
    """One text's BPE ids without BOS/EOS, PLACEHOLDER_ID where a vector goes, and those vectors' slots."""
    ids: list[int]
    slots: list[Slot]


def slots_at(fixes: Iterable[tuple[int, str]], embeddings: Mapping[str, Embedding]) -> list[Slot]:
    """(position of an embedding's first vector, its name) pairs -> the Slot of each of its vectors."""
    return [Slot(position + k, embeddings[name], k) for position, name in fixes
            for k in range(embeddings[name].vectors)]


def tokenize_text(text: str, embeddings: Mapping[str, Embedding], pad_token: str | None = None) -> TextTokens:
    """`text` -> TextTokens: the text between embedding names tokenized as `tokenizer.tokenize` does (with
    the same pad token: SD 2.x splits "!" out), each name as its embedding's n placeholder positions."""
    tokenize = fragment_tokenizer({name: e.vectors for name, e in embeddings.items()}, pad_token)
    ids: list[int] = []
    fixes: list[tuple[int, str]] = []
    for token in tokenize([text])[0]:
        if isinstance(token, EmbeddingRef):
            fixes.append((len(ids), token.name))
            ids += [PLACEHOLDER_ID] * token.vectors
        else:
            ids.append(token)
    return TextTokens(ids, slots_at(fixes, embeddings))


def tokenize_prompts(prompts: list[str], embeddings: Mapping[str, Embedding], pad_token: str | None = None
                     ) -> tuple[torch.Tensor, list[list[Slot]], list[bool]]:
    """`tokenizer.tokenize` with embeddings: (ids [B, 77], each row's slots at their positions in it,
    truncated). Cut as tokenize cuts: the first 75 positions, then <|endoftext|>, then padding; slots cut
    off are dropped."""
    pad_id = SD2_PAD_ID if pad_token == SD2_PAD_TOKEN else EOS_ID
    if pad_token not in (None, SD2_PAD_TOKEN):
        raise ValueError(f"pad_token {pad_token!r}: None or {SD2_PAD_TOKEN!r}")
    rows, all_slots, truncated = [], [], []
    room = MAX_LENGTH - 2
    for prompt in prompts:
        tokens = tokenize_text(prompt, embeddings, pad_token)
        kept = tokens.ids[:room]
        rows.append([BOS_ID, *kept, EOS_ID] + [pad_id] * (room - len(kept)))
        all_slots.append([Slot(s.position + 1, s.embedding, s.index) for s in tokens.slots if s.position < room])
        truncated.append(len(tokens.ids) > room)
    ids = torch.tensor(rows, dtype=torch.long) if rows else torch.empty((0, MAX_LENGTH), dtype=torch.long)
    return ids, all_slots, truncated


def token_embedding_of(encoder: nn.Module) -> nn.Embedding:
    """The token-embedding table of a CLIPTextModel or an OpenCLIPTextModel."""
    return encoder.embeddings.token_embedding if hasattr(encoder, "embeddings") else encoder.token_embedding


def embed_tokens(encoder: nn.Module, ids: torch.Tensor, slots: list[list[Slot]], table: str = SINGLE) -> torch.Tensor:
    """The encoder's token embeddings of `ids` [B, T] with each row's slots replaced by the embeddings'
    vectors from `table` (SINGLE, or SDXL's "clip_l" / "clip_g" for text_encoder / text_encoder_2):
    [B, T, D], to pass as `token_embeds`."""
    x = token_embedding_of(encoder)(ids)
    for row, row_slots in enumerate(slots):
        for slot in row_slots:
            x[row, slot.position] = slot.embedding.tables[table][slot.index].to(x.device, x.dtype)
    return x
