"""The shipped CLIP tokenizer: known ids, padding/truncation, agreement with OpenAI's BPE algorithm,
and the files rebuilt from the open_clip merge list byte for byte."""
from __future__ import annotations

import gzip
import html
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

import pytest
import regex
import torch

from batchsd.model.tokenizer import EOS_ID, BOS_ID, MAX_LENGTH, TOKENIZER_DATA, load_tokenizer, tokenize
from tokenizer_build import NUM_MERGES, VOCAB_SIZE, build, bytes_to_unicode


def _open_clip_bpe_gz() -> Path | None:
    spec = importlib.util.find_spec("open_clip")  # locate only: importing open_clip needs torchvision
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.is_file() else None


BPE_GZ = _open_clip_bpe_gz()
needs_gz = pytest.mark.skipif(BPE_GZ is None, reason="open_clip_torch (bpe_simple_vocab_16e6.txt.gz) not installed")

PROMPTS = [
    "a photo of a cat",
    "A Photo   of\ta  CAT!!",
    "an astronaut riding a horse on mars, highly detailed, 8k, trending on artstation",
    "portrait of a woman (smiling:1.2), [oil painting], by greg rutkowski and alphonse mucha",
    "it's the dog's toy; they'll've 3.14159 apples @ $5/each #1 ~tilde~ 'quoted'",
    "café crème brûlée, naïve façade, Zürich",
    "東京の夜景, 日本語のテキスト",
    "emoji 🐱🚀 and ümläuts and ß",
    "",
    "   ",
    "<|startoftext|> literal special tokens <|endoftext|>",
]


def test_known_ids_and_padding():
    ids, truncated = tokenize(["a photo of a cat"])
    assert ids.dtype == torch.long and ids.shape == (1, MAX_LENGTH)
    expected = [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[0, :7].tolist() == expected
    assert (ids[0, 7:] == 49407).all()  # padded with <|endoftext|>
    assert truncated == [False]


def test_empty_prompt_and_empty_batch():
    ids, truncated = tokenize([""])
    assert ids[0].tolist() == [BOS_ID] + [EOS_ID] * (MAX_LENGTH - 1) and truncated == [False]
    ids, truncated = tokenize([])
    assert ids.shape == (0, MAX_LENGTH) and truncated == []


def test_truncation_boundary_and_report():
    # "cat" is one token: 75 of them + bos + eos = exactly 77 (fits); 76 do not.
    fits, cut, long, short = "cat " * 75, "cat " * 76, "a painting of a cat, " * 40, "a dog"
    ids, truncated = tokenize([fits, cut, long, short])
    assert ids.shape == (4, MAX_LENGTH)
    assert truncated == [False, True, True, False]
    assert (ids[:, 0] == BOS_ID).all() and (ids[:, -1] == EOS_ID).all()
    assert (ids[0, 1:76] == 2368).all() and ids[1].tolist() == ids[0].tolist()  # cut after 75 tokens
    # the truncated prompt keeps its first 75 tokens in order
    assert ids[2, 1:6].tolist() == [320, 3086, 539, 320, 2368]  # "a painting of a cat"


def test_batch_equals_single():
    batch, _ = tokenize(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        single, _ = tokenize([prompt])
        assert torch.equal(batch[i], single[0]), prompt


def test_loaded_once():
    assert load_tokenizer() is load_tokenizer()
    assert load_tokenizer().model_max_length == MAX_LENGTH


def test_shipped_files_structure():
    vocab = json.loads((TOKENIZER_DATA / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == VOCAB_SIZE and sorted(vocab.values()) == list(range(VOCAB_SIZE))
    assert vocab["<|startoftext|>"] == BOS_ID and vocab["<|endoftext|>"] == EOS_ID
    byte_chars = list(bytes_to_unicode().values())
    assert [vocab[c] for c in byte_chars] == list(range(256))
    assert [vocab[c + "</w>"] for c in byte_chars] == list(range(256, 512))
    lines = (TOKENIZER_DATA / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + NUM_MERGES
    assert vocab["".join(lines[1].split())] == 512 and vocab["".join(lines[-1].split())] == 49405
    assert load_tokenizer().backend_tokenizer.get_vocab_size() == VOCAB_SIZE


@needs_gz
def test_build_reproduces_shipped_files(tmp_path):
    build(BPE_GZ, tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (TOKENIZER_DATA / name).read_bytes(), name


# --- OpenAI's SimpleTokenizer algorithm (CLIP repo), built straight from the gzip'd merge list. ---
# ftfy.fix_text is left out (not installed, and a no-op on these prompts).

@lru_cache(maxsize=1)
def _openai_tables():
    merges = gzip.open(BPE_GZ).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [v + "</w>" for v in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    encoder = {v: i for i, v in enumerate(vocab)}
    ranks = {m: i for i, m in enumerate(merges)}
    pattern = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    return encoder, ranks, pattern


def _openai_bpe(token: str, ranks) -> list[str]:
    word = list(token[:-1]) + [token[-1] + "</w>"]
    while len(word) > 1:
        pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def _openai_encode(text: str) -> list[int]:
    encoder, ranks, pattern = _openai_tables()
    byte_encoder = bytes_to_unicode()
    text = " ".join(html.unescape(html.unescape(text)).strip().split()).lower()
    ids = []
    for token in regex.findall(pattern, text):
        token = "".join(byte_encoder[b] for b in token.encode("utf-8"))
        ids += [encoder[t] for t in _openai_bpe(token, ranks)]
    return ids


@needs_gz
@pytest.mark.parametrize("prompt", [p for p in PROMPTS if "<|" not in p])
def test_matches_openai_bpe(prompt):
    ids, _ = tokenize([prompt])
    expected = ([BOS_ID] + _openai_encode(prompt) + [EOS_ID])[:MAX_LENGTH]
    expected[-1] = EOS_ID
    expected += [EOS_ID] * (MAX_LENGTH - len(expected))
    assert ids[0].tolist() == expected


def test_preloaded_on_a_thread_is_the_one_loaded(monkeypatch):
    import batchsd.model.tokenizer as tok

    monkeypatch.setattr(tok, "_tokenizer", None)
    tok.preload_tokenizer().join(timeout=60)
    assert tok._tokenizer is not None and load_tokenizer() is tok._tokenizer


def test_a_failed_preload_is_raised_on_the_callers_thread(monkeypatch, tmp_path):
    import batchsd.model.tokenizer as tok

    monkeypatch.setattr(tok, "_tokenizer", None)
    monkeypatch.setattr(tok, "TOKENIZER_DATA", tmp_path)        # no vocab.json / merges.txt there
    tok.preload_tokenizer().join(timeout=60)
    assert tok._tokenizer is None
    with pytest.raises(Exception):
        load_tokenizer()
