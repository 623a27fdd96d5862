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

The API, for the prompt encoders:

    library = EmbeddingLibrary(folder)                 # name -> file, read on first use, cached
    names = library.names_in(prompt)                   # which embeddings a prompt names (no tensors read)
    embeddings = library.for_model(names, model)       # read and checked against the model's encoders
    pieces = tokenize_text(text, embeddings, pad_token)   # BPE ids without BOS/EOS + the vector slots
    ids, slots, truncated = tokenize_prompts(prompts, embeddings, pad_token)   # [B, 77], as tokenize()
    x = embed_tokens(encoder, ids, slots, "clip_l")    # [B, 77, D] for encoder(ids, token_embeds=x)

`tokenize_text` is the piece for A1111-style chunking: ids and slots of one text fragment, which a
chunker lays out in 75-token chunks (keeping each embedding's n positions in one chunk, as A1111 does),
then hands `embed_tokens` the slots at their final positions. Matching: a name matches case-insensitively
where no letter is right before or after it, longest name first. That is A1111's rule (it looks for the
name's BPE ids in the prompt's, and CLIP's BPE splits words from digits and punctuation, so "style2" and
"(style:1.2)" name "style", "styles" does not); diffusers' load_textual_inversion replaces substrings,
so there "styles" is "style" + "s".
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple

import torch
from torch import nn

from batchsd.errors import InputError
from batchsd.model.tokenizer import BOS_ID, EOS_ID, MAX_LENGTH, SD2_PAD_ID, SD2_PAD_TOKEN, load_tokenizer

EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")
# The id under each embedding vector. Any id below <|endoftext|> will do (OpenCLIP pools at the largest
# id, which must stay the end token); its own embedding is always replaced. "!" (id 0).
PLACEHOLDER_ID = 0
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
        return torch.load(path, map_location="cpu", weights_only=True)
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
    return Embedding(path.stem, path, out)


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
        raise EmbeddingError(f"embedding {embedding.name} ({embedding.path}) is for {got}; {label} needs {kind}")
    bad = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
    if bad:
        detail = ", ".join(f"{k}: {h}-wide vectors, the encoder is {w}-wide" for k, (h, w) in bad.items())
        raise EmbeddingError(f"embedding {embedding.name} ({embedding.path}) does not fit {label} ({detail}): "
                             f"it was trained for another model family")


# ----------------------------------------------------------------------------- prompts -> ids and slots

def _name_pattern(names: Iterable[str]) -> re.Pattern | None:
    names = sorted(set(names), key=len, reverse=True)     # longest first: "style-v2" before "style"
    if not names:
        return None
    alternatives = "|".join(re.escape(n) for n in names)
    return re.compile(rf"(?<![^\W\d_])(?:{alternatives})(?![^\W\d_])", re.IGNORECASE)   # no letter beside


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


def tokenize_text(text: str, embeddings: Mapping[str, Embedding], pad_token: str | None = None) -> TextTokens:
    """`text` -> TextTokens: the text between embedding names tokenized as `tokenizer.tokenize` does (with
    the same pad token: SD 2.x splits "!" out), each name as its embedding's n placeholder positions."""
    tokenizer = load_tokenizer(pad_token)
    by_lower = {name.lower(): e for name, e in embeddings.items()}
    pattern = _name_pattern(embeddings)
    pieces = pattern.split(text) if pattern else [text]
    found = pattern.findall(text) if pattern else []
    ids: list[int] = []
    slots: list[Slot] = []
    for i, piece in enumerate(pieces):
        if piece.strip():
            ids += tokenizer(piece, add_special_tokens=False, verbose=False).input_ids
        if i < len(found):
            embedding = by_lower[found[i].lower()]
            slots += [Slot(len(ids) + k, embedding, k) for k in range(embedding.vectors)]
            ids += [PLACEHOLDER_ID] * embedding.vectors
    return TextTokens(ids, slots)


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


# ----------------------------------------------------------------------------- a folder of embeddings

class EmbeddingLibrary:
    """The embedding files in a folder (not recursive), by stem; each read on first use and kept."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.files: dict[str, Path] = {}
        if self.folder.is_dir():
            for path in sorted(self.folder.iterdir()):
                if path.suffix in EMBEDDING_SUFFIXES and path.is_file():
                    if path.stem in self.files:
                        raise EmbeddingError(f"two embedding files are named {path.stem!r} in {self.folder} "
                                             f"({self.files[path.stem].name}, {path.name}): rename one")
                    self.files[path.stem] = path
        self._loaded: dict[str, Embedding] = {}
        self._lock = threading.Lock()
        self._pattern = _name_pattern(self.files)
        self._by_lower = {name.lower(): name for name in self.files}

    def names_in(self, text: str) -> list[str]:
        """The embeddings `text` names, in order of first use (no file is read)."""
        if self._pattern is None:
            return []
        return list(dict.fromkeys(self._by_lower[m.lower()] for m in self._pattern.findall(text)))

    def get(self, name: str) -> Embedding:
        with self._lock:
            if name not in self._loaded:
                if name not in self.files:
                    raise EmbeddingError(f"no embedding {name!r} in {self.folder}")
                self._loaded[name] = read_embedding(self.files[name])
            return self._loaded[name]

    def for_model(self, names: Iterable[str], model: nn.Module, label: str = "the model") -> dict[str, Embedding]:
        """The named embeddings, read and checked against `model`'s text encoders (check_fits)."""
        out = {}
        for name in names:
            embedding = self.get(name)
            check_fits(embedding, model, label)
            out[name] = embedding
        return out
