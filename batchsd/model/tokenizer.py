"""The CLIP ViT-L/14 tokenizer (openai/clip-vit-large-patch14), from files shipped in the package.

`batchsd/model/tokenizer_data/` holds `vocab.json` and `merges.txt`, built once from OpenAI's BPE
merge list by `python tests/tools/tokenizer_build.py`; nothing is downloaded at run time. Prompts become
77 ids: `<|startoftext|>` (49406), the BPE tokens, `<|endoftext|>` (49407), padded with
`<|endoftext|>` as Stable Diffusion 1.x pipelines do. Longer prompts are cut to 77 ids (the last
one still `<|endoftext|>`), and `tokenize` says which prompts were cut.

SD 2.x uses the same BPE and ids but pads with "!" (id 0): its diffusers tokenizer is this
CLIPTokenizer with pad_token "!" (stabilityai/stable-diffusion-2-1 tokenizer_config.json),
`tokenize(prompts, pad_token=SD2_PAD_TOKEN)`. As a special token, "!" is then also split out of
the prompt text itself ("wow!!" is "wow", "!", "!" = ids 2781, 0, 0, not "wow", "!!</w>"), exactly
as diffusers tokenizes SD 2.x prompts.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

TOKENIZER_DATA = Path(__file__).resolve().parent / "tokenizer_data"
MAX_LENGTH = 77  # CLIP text context length (CLIPTextConfig.max_positions of SD 1.x)
BOS_ID = 49406   # <|startoftext|>
EOS_ID = 49407   # <|endoftext|>, also the padding id of SD 1.x
SD2_PAD_TOKEN = "!"  # the padding token of SD 2.x (OpenCLIP) ...
SD2_PAD_ID = 0       # ... and its id


_tokenizer: CLIPTokenizer | None = None
_padded_tokenizers: dict[str, CLIPTokenizer] = {}   # pad token -> tokenizer (SD 2.x: "!")
_tokenizer_lock = threading.Lock()


def load_tokenizer(pad_token: str | None = None) -> CLIPTokenizer:
    """The CLIP tokenizer, loaded once and shared. Importing transformers is most of its cost, hence
    not at import time (see `preload_tokenizer`). `pad_token`: another padding token (SD 2.x: "!")."""
    global _tokenizer
    with _tokenizer_lock:
        if pad_token is not None:
            if pad_token not in _padded_tokenizers:
                tokenizer = _from_files(pad_token=pad_token)
                assert tokenizer.pad_token == pad_token, "bad tokenizer_data"
                _padded_tokenizers[pad_token] = tokenizer
            return _padded_tokenizers[pad_token]
        if _tokenizer is None:
            tokenizer = _from_files()
            assert tokenizer.pad_token_id == EOS_ID, "bad tokenizer_data"
            _tokenizer = tokenizer
        return _tokenizer


def _from_files(**kwargs) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    # from_pretrained on the local folder reads vocab.json + merges.txt in transformers 4 and 5 alike
    tokenizer = CLIPTokenizer.from_pretrained(
        str(TOKENIZER_DATA),
        local_files_only=True,
        model_max_length=MAX_LENGTH,  # not stored in the two files; the default would be "unlimited"
        **kwargs,
    )
    assert tokenizer.bos_token_id == BOS_ID, "bad tokenizer_data"
    return tokenizer


def preload_tokenizer() -> threading.Thread:
    """Start `load_tokenizer` on a daemon thread, so that the transformers import overlaps with
    loading the weights (Pipeline.load). A failure there is not lost: the tokenizer is then still
    unloaded, and the next `load_tokenizer` call tries again on the caller's thread and raises."""
    def run() -> None:
        try:
            load_tokenizer()
        except Exception:  # noqa: BLE001 - raised again by the caller's own load_tokenizer()
            pass

    thread = threading.Thread(target=run, name="batchsd-tokenizer", daemon=True)
    thread.start()
    return thread


def tokenize(prompts: list[str], pad_token: str | None = None) -> tuple[torch.Tensor, list[bool]]:
    """Prompts -> (input_ids LongTensor[B, 77], truncated[B]: whether the prompt was cut to fit).
    `pad_token`: None (`<|endoftext|>`, SD 1.x) or SD2_PAD_TOKEN (SD 2.x; see the module docstring)."""
    tokenizer = load_tokenizer(pad_token)
    prompts = list(prompts)
    if not prompts:
        return torch.empty((0, MAX_LENGTH), dtype=torch.long), []
    full_lengths = [len(ids) for ids in tokenizer(prompts, verbose=False).input_ids]  # incl. bos/eos
    input_ids = tokenizer(
        prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids  # [B, 77]
    return input_ids.long(), [n > MAX_LENGTH for n in full_lengths]
