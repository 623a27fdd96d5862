"""Build the CLIP tokenizer files shipped in batchsd/model/tokenizer_data/ (run once, by a developer).

The openai/clip-vit-large-patch14 tokenizer is fully determined by OpenAI's BPE merge list
(`bpe_simple_vocab_16e6.txt.gz`, shipped in the open_clip_torch and openai CLIP packages):

- merges: lines 2..48895 of the file (the first line is a header), 48894 merges
  (= 49408 vocabulary entries - 256 bytes - 256 bytes with `</w>` - 2 special tokens);
- vocab (ids 0..49407): the 256 byte-level characters in GPT-2 `bytes_to_unicode` order, the same
  256 with `</w>` appended, each merge joined (a+b), then `<|startoftext|>`, `<|endoftext|>`.

This is what OpenAI's `SimpleTokenizer` builds in memory. Written out as `vocab.json` (token -> id)
and `merges.txt` (`#version: 0.2` header line, which the `tokenizers` BPE reader skips, then one
"a b" merge a line), the two files `transformers.CLIPTokenizer` reads.

    python tests/tools/tokenizer_build.py --source <path/to/bpe_simple_vocab_16e6.txt.gz> \
        --out batchsd/model/tokenizer_data
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 256 - 256 - 2  # 48894
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
MERGES_HEADER = "#version: 0.2"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in code_points)))


def read_merges(source: Path) -> list[tuple[str, str]]:
    """The 48894 merges of the gzip'd OpenAI merge list (header line skipped)."""
    with gzip.open(source, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{source}: expected {NUM_MERGES} two-part merges after the header line")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += list(SPECIAL_TOKENS)
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab


def build(source: Path, out: Path) -> tuple[Path, Path]:
    """Write out/vocab.json and out/merges.txt from the OpenAI merge list; return their paths."""
    merges = read_merges(Path(source))
    vocab = build_vocab(merges)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    # ids in increasing order (dict insertion order), non-ASCII kept as UTF-8
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merges_path.write_text(
        "\n".join([MERGES_HEADER] + [f"{a} {b}" for a, b in merges]) + "\n", encoding="utf-8"
    )
    return vocab_path, merges_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, required=True, help="output folder (vocab.json, merges.txt)")
    args = parser.parse_args(argv)
    for path in build(args.source, args.out):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
