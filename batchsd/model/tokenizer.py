"""The CLIP ViT-L/14 tokenizer (openai/clip-vit-large-patch14), from files shipped in the package.

`batchsd/tokenizer_data/` holds `vocab.json` and `merges.txt`, built once from OpenAI's BPE merge
list by `python -m batchsd.tokenizer_build`; nothing is downloaded at run time. Prompts become
77 ids: `<|startoftext|>` (49406), the BPE tokens, `<|endoftext|>` (49407), padded with
`<|endoftext|>` as Stable Diffusion 1.x pipelines do. Longer prompts are cut to 77 ids (the last
one still `<|endoftext|>`), and `tokenize` says which prompts were cut.
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
EOS_ID = 49407   # <|endoftext|>, also the padding id


_tokenizer: CLIPTokenizer | None = None
_tokenizer_lock = threading.Lock()


def load_tokenizer() -> CLIPTokenizer:
    """The CLIP tokenizer, loaded once and shared: about 0.1 s, after importing transformers (about
    1.2 s, hence not at import time: see `preload_tokenizer`)."""
    global _tokenizer
    with _tokenizer_lock:
        if _tokenizer is None:
            from transformers import CLIPTokenizer

            # from_pretrained on the local folder reads vocab.json + merges.txt in transformers 4 and 5 alike
            tokenizer = CLIPTokenizer.from_pretrained(
                str(TOKENIZER_DATA),
                local_files_only=True,
                model_max_length=MAX_LENGTH,  # not stored in the two files; the default would be "unlimited"
            )
            assert tokenizer.bos_token_id == BOS_ID and tokenizer.pad_token_id == EOS_ID, "bad tokenizer_data"
            _tokenizer = tokenizer
        return _tokenizer


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


def tokenize(prompts: list[str]) -> tuple[torch.Tensor, list[bool]]:
    """Prompts -> (input_ids LongTensor[B, 77], truncated[B]: whether the prompt was cut to fit)."""
    tokenizer = load_tokenizer()
    prompts = list(prompts)
    if not prompts:
        return torch.empty((0, MAX_LENGTH), dtype=torch.long), []
    full_lengths = [len(ids) for ids in tokenizer(prompts, verbose=False).input_ids]  # incl. bos/eos
    input_ids = tokenizer(
        prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids  # [B, 77]
    return input_ids.long(), [n > MAX_LENGTH for n in full_lengths]
