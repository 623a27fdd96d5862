"""A1111 prompt syntax: emphasis weights, BREAK, and prompts longer than 75 tokens in chunks.

A row's `prompt_syntax` says how its prompt and negative prompt are read:

    plain   the text as is, cut at 77 tokens: what diffusers' pipelines do (the parity reference)
    a1111   AUTOMATIC1111's reading (its modules/prompt_parser.py and sd_hijack_clip.py, with its
            default settings), implemented here from their documented behaviour:
              (a)        a's weight x 1.1; ((a)) x 1.21; [a] / 1.1; (a:1.5) and (a: 1.5 ) x 1.5
                         (nests: multiplies)
              \\( \\) \\[ \\] \\\\   the literal characters
              BREAK      ends the current 75-token chunk
              an unbalanced ( or [ applies to the rest of the prompt, as in A1111
            The tokens are cut into chunks of 75 (each encoded as <start> 75 tokens <end>, 77 ids);
            a chunk that fills up moves the text after its last comma (when the comma is within
            the chunk's last 20 tokens: A1111's comma_padding_backtrack) into the next chunk. Each
            chunk's hidden states are multiplied by their tokens' weights and scaled back to the
            chunk's original mean (A1111's "Original" emphasis); the chunks are concatenated.
            Refused, with the row and column named: prompt editing `[from:to:when]` and alternation
            `[a|b]` (they change the conditioning during sampling; batchsd does not do that), and a
            weight that is not a number (`(a:1.2.3)`, on which A1111 itself fails).

Textual-inversion embeddings (model/embeddings.py) are named in a prompt by their file stem, under
either syntax: `embedding_pattern` is the matching rule (case-insensitive, no letter right before or
after the name, longest name first: A1111 matches the name's BPE ids, and CLIP's BPE splits words
from digits and punctuation, so "style2" and "(style:1.2)" name "style", "styles" does not). A name
becomes its n vectors' positions (`EmbeddingRef`); a chunk that cannot hold all n starts a new chunk,
as A1111 keeps an embedding in one chunk.

Pure functions over text and a fragment tokenizer; no torch. `chunk_prompt` is what the Pipeline
encodes (family.encode_chunks); `chunk_count` is what makes rows batchable (request.batch_key:
rows of one batch share their context length).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

PROMPT_SYNTAXES = ("plain", "a1111")
CHUNK_TOKENS = 75            # prompt tokens per chunk (77 ids with the start and end tokens)
COMMA_BACKTRACK = 20         # A1111's comma_padding_backtrack default
ROUND_MULTIPLIER = 1.1       # (a)
SQUARE_MULTIPLIER = 1 / 1.1  # [a]
BREAK_WEIGHT = -1.0          # marks a BREAK in parse_attention's output
COMMA_ID = 267               # ",</w>" in CLIP's vocabulary
BOS_ID, EOS_ID = 49406, 49407

# one match per token of the attention syntax: escapes, brackets, a ":weight)" closer (spaces around
# the number allowed, as A1111's current pattern does), plain text
_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
# inside one [...] group without nested brackets: prompt editing "[a:b:0.5]" / "[a:0.5]" / "[a::0.5]"
_EDITING = re.compile(r"\[[^\[\]]*:\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*\]")
_ALTERNATION = re.compile(r"\[[^\[\]]*\|[^\[\]]*\]")
_A1111_MARKS = re.compile(r"\([^()]*\)|\[[^\[\]]*\]|\bBREAK\b|\\[()\[\]]|<lora:", re.I)


def check_syntax(name: str) -> str:
    if name not in PROMPT_SYNTAXES:
        raise ValueError(f"prompt_syntax must be one of {', '.join(PROMPT_SYNTAXES)}, got {name!r}")
    return name


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def unsupported_a1111(text: str) -> str | None:
    """Why `text` cannot be read as A1111 syntax here (prompt editing or alternation), or None."""
    unescaped = re.sub(r"\\.", "", text)
    for m in _ATTENTION.finditer(unescaped):
        if m.group(1) is not None and not _is_number(m.group(1)):   # A1111 itself stops with a ValueError
            return (f"the emphasis weight {m.group(1)!r} is not a number: write (text:1.2), or put a "
                    "backslash before the bracket for a literal ':'")
    if m := _EDITING.search(unescaped):
        return (f"prompt editing {m.group(0)!r} (A1111's [from:to:when]) changes the prompt during sampling, "
                "which batchsd does not do: write one of its prompts, or put a backslash before each bracket")
    if m := _ALTERNATION.search(unescaped):
        return (f"alternation {m.group(0)!r} (A1111's [a|b]) changes the prompt at every step, which batchsd "
                "does not do: write one of its prompts, or put a backslash before each bracket")
    return None


def looks_like_a1111(text: str) -> bool:
    """Whether a prompt read as plain text probably means A1111 syntax (emphasis, BREAK, escapes, a
    <lora:...> tag, which plain text does not apply)."""
    return bool(_A1111_MARKS.search(text))


def parse_attention(text: str) -> list[tuple[str, float]]:
    """(text, weight) runs of a prompt under A1111's emphasis rules (the module docstring); a BREAK is
    the run ("BREAK", BREAK_WEIGHT). Adjacent runs of equal weight are merged; "" gives [("", 1.0)]."""
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(runs))
        elif token == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    runs.append(["BREAK", BREAK_WEIGHT])
                runs.append([part, 1.0])
    for start in round_open:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)
    if not runs:
        runs = [["", 1.0]]
    merged = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged]


class EmbeddingRef(NamedTuple):
    """A textual-inversion embedding named in a prompt: its name (the file stem) and vector count."""
    name: str
    vectors: int


PLACEHOLDER_ID = 0   # the id under each embedding vector (model/embeddings.py replaces its embedding)
Token = int | EmbeddingRef   # what a fragment tokenizer yields: a BPE id, or an embedding's n positions


@dataclass(frozen=True)
class PromptChunk:
    ids: tuple[int, ...]        # 77: <start>, 75 tokens (padded with <end>), <end>; PLACEHOLDER_ID under embeddings
    weights: tuple[float, ...]  # 77: each token's emphasis (1.0 for start, end and padding)
    embeddings: tuple[tuple[int, str], ...] = ()   # (position of its first vector in ids, embedding name)


def chunk_prompt(text: str, tokenize: Callable[[Sequence[str]], list[list[Token]]]) -> list[PromptChunk]:
    """A1111's tokenize_line: the prompt's runs (`parse_attention`) tokenized without start/end tokens
    by `tokenize` (texts -> Tokens each), cut into 75-token chunks (BREAK, the comma backtrack and
    embeddings kept whole as in the module docstring). At least one chunk."""
    runs = parse_attention(text)
    pieces = tokenize([t for t, _ in runs])
    chunks: list[PromptChunk] = []
    ids: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, str]] = []        # (position in ids, embedding name), as A1111's chunk.fixes
    last_comma = -1

    def close_chunk() -> None:
        nonlocal ids, weights, fixes, last_comma
        pad = CHUNK_TOKENS - len(ids)
        chunks.append(PromptChunk(tuple([BOS_ID, *ids, *[EOS_ID] * pad, EOS_ID]),
                                  tuple([1.0, *weights, *[1.0] * pad, 1.0]),
                                  tuple((position + 1, name) for position, name in fixes)))
        ids, weights, fixes, last_comma = [], [], [], -1

    for tokens, (run_text, weight) in zip(pieces, runs):
        if weight == BREAK_WEIGHT and run_text == "BREAK":
            close_chunk()
            continue
        for token in tokens:
            if token == COMMA_ID:
                last_comma = len(ids)
            elif len(ids) == CHUNK_TOKENS and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                # the text after the chunk's last comma moves to the next chunk (its embeddings with it)
                cut = last_comma + 1
                moved = ids[cut:], weights[cut:], [(p - cut, n) for p, n in fixes if p >= cut]
                ids, weights, fixes = ids[:cut], weights[:cut], [(p, n) for p, n in fixes if p < cut]
                close_chunk()
                ids, weights, fixes = moved
            if len(ids) == CHUNK_TOKENS:
                close_chunk()
            if isinstance(token, EmbeddingRef):
                if len(ids) + token.vectors > CHUNK_TOKENS:     # all its vectors in one chunk
                    close_chunk()
                fixes.append((len(ids), token.name))
                ids += [PLACEHOLDER_ID] * token.vectors
                weights += [weight] * token.vectors
                continue
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close_chunk()
    return chunks


def embedding_pattern(names: Iterable[str]) -> re.Pattern | None:
    """The regex that finds embedding names in a prompt (the module docstring's rule); None for no names."""
    names = sorted(set(names), key=len, reverse=True)     # longest first: "style-v2" before "style"
    if not names:
        return None
    alternatives = "|".join(re.escape(n) for n in names)
    return re.compile(rf"(?<![^\W\d_])(?:{alternatives})(?![^\W\d_])", re.IGNORECASE)   # no letter beside


def split_embedding_names(text: str, names: Iterable[str]) -> list[str | None]:
    """`text` as alternating text pieces and name matches: [text, name, text, name, ..., text], names
    as written in `names` (not as cased in the text)."""
    names = list(names)
    pattern = embedding_pattern(names)
    if pattern is None:
        return [text]
    by_lower = {n.lower(): n for n in names}
    parts = pattern.split(text)
    found = [by_lower[m.lower()] for m in pattern.findall(text)]
    out: list[str] = []
    for i, part in enumerate(parts):
        out.append(part)
        if i < len(found):
            out.append(found[i])
    return out


def fragment_tokenizer(embeddings: Mapping[str, int] | None = None, pad_token: str | None = None
                       ) -> Callable[[Sequence[str]], list[list[Token]]]:
    """CLIP's BPE over text fragments, without start/end tokens and without truncation (A1111's
    tokenize), each name of `embeddings` (name -> vector count) as an EmbeddingRef; the tokenizer is
    batchsd's packaged one (tokenizer.load_tokenizer, with `pad_token`: SD 2.x's splits "!" out)."""
    from batchsd.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(pad_token)
    embeddings = dict(embeddings or {})

    def bpe(texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return tokenizer(texts, truncation=False, add_special_tokens=False, verbose=False)["input_ids"]

    def tokenize(texts: Sequence[str]) -> list[list[Token]]:
        texts = list(texts)
        if not embeddings:
            return bpe(texts)
        out = []
        for text in texts:
            parts = split_embedding_names(text, embeddings)
            pieces = iter(bpe([p for p in parts[::2] if p.strip()]))
            tokens: list[Token] = []
            for i, part in enumerate(parts):
                if i % 2:
                    tokens.append(EmbeddingRef(part, embeddings[part]))
                elif part.strip():
                    tokens += next(pieces)
            out.append(tokens)
        return out

    return tokenize


def chunk_count(text: str, embeddings: Mapping[str, int] | None = None) -> int:
    """How many 77-id chunks `text` takes under A1111 syntax, with `embeddings` (name -> vector
    count) named in it (loads the tokenizer). Kept per (text, embeddings): the planner and the
    Pipeline ask for every row, and negative prompts repeat."""
    return _chunk_count(text, tuple(sorted((embeddings or {}).items())))


@functools.lru_cache(maxsize=1 << 16)
def _chunk_count(text: str, embeddings: tuple[tuple[str, int], ...]) -> int:
    return len(chunk_prompt(text, fragment_tokenizer(dict(embeddings))))


# A1111's extra-network tags: <lora:name>, <lora:name:multiplier> (read by the job: job/loras.py);
# under the a1111 syntax they are not text and are removed before encoding
LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^<>]*))?>", re.I)


def strip_lora_tags(text: str) -> str:
    """The prompt without its <lora:...> tags (what A1111 encodes)."""
    return LORA_TAG.sub("", text)
