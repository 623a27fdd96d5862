"""Manifest columns that change how a row is conditioned, beyond its prompt and size:

    original_width, original_height   SDXL's size micro-conditioning (default: the row's own size)
    crop_top, crop_left               SDXL's crop micro-conditioning (default 0, 0)
    clip_skip                         A1111's clip skip, 1..12 (1 = the last layer; SD 1.x models)
    prompt_syntax                     "plain" | "a1111" (default: `--prompt-syntax`, itself "plain")
    loras                             the row's LoRA set, `name:0.8;other` (job/loras.py; with the a1111
                                      syntax, the prompt's <lora:name:0.8> tags are added to it)

Each parsed value lands in JobRow.conditioning only when it is given (and, for prompt_syntax, when
it is not "plain"), so rows without these columns keep their params_hash from before these columns
existed. Which families take them is the model's rule (request.check_row and the Pipeline refuse
size/crop conditioning for non-SDXL models and clip skip where the family reads a fixed layer):
those rows fail with the reason, the rest of the run goes on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from batchsd.job.loras import LoraFolder, LoraProblem, parse_lora_list, prompt_loras
from batchsd.model.prompt_syntax import LORA_TAG, PROMPT_SYNTAXES, looks_like_a1111, unsupported_a1111
from batchsd.model.request import MAX_CLIP_SKIP, MAX_CONDITIONING_SIZE, SIZE_CONDITIONING

CONDITIONING_COLUMNS = (*SIZE_CONDITIONING, "clip_skip", "prompt_syntax", "loras")


def parse_conditioning(column: Callable, int_parser: Callable, text_parser: Callable, bad_value: type,
                       default_syntax: str) -> list[dict]:
    """Per data row, {column: value} of the conditioning columns given (loras: the [(name, multiplier)]
    of the column; `resolve_loras` adds the prompt's tags and finds the files). `column(name, parse)`
    parses one manifest column (manifest.read_manifest's); the parsers are the manifest's."""
    values: dict[str, list] = {}
    for name in SIZE_CONDITIONING:
        low = 0 if name.startswith("crop") else 1
        values[name] = column(name, int_parser(low, MAX_CONDITIONING_SIZE,
                                               f"use a whole number of pixels from {low} to {MAX_CONDITIONING_SIZE} "
                                               "(SDXL's size/crop conditioning), or leave it empty"))
    values["clip_skip"] = column("clip_skip", int_parser(1, MAX_CLIP_SKIP, f"use a whole number from 1 to "
                                                         f"{MAX_CLIP_SKIP} (1 = the text encoder's last layer, 2 = "
                                                         "the penultimate), or leave it empty"))
    text = text_parser("write plain or a1111")

    def parse_syntax(v):
        v = text(v)
        if v is None or not v.strip():
            return None
        if v.strip().lower() not in PROMPT_SYNTAXES:
            raise bad_value(f"{v!r} is not a prompt syntax; write {' or '.join(PROMPT_SYNTAXES)} (or leave it empty "
                            f"for --prompt-syntax, {default_syntax})")
        return v.strip().lower()

    values["prompt_syntax"] = column("prompt_syntax", parse_syntax, default_syntax)
    lora_text = text_parser("write the LoRAs as text: name:0.8;other")

    def parse_loras(v):
        v = lora_text(v)
        try:
            return tuple(parse_lora_list(v)) or None
        except LoraProblem as e:
            raise bad_value(str(e)) from None

    values["loras"] = column("loras", parse_loras)
    rows = []
    for i in range(len(values["clip_skip"])):
        given = {name: values[name][i] for name in CONDITIONING_COLUMNS if values[name][i] is not None}
        if given.get("prompt_syntax") == "plain":
            del given["prompt_syntax"]
        rows.append(given)
    return rows


def resolve_loras(conditioning: list[dict], prompts: list, folder: Path | None,
                  generations: list | None = None) -> dict[int, list[tuple[str, str]]]:
    """Each row's LoRA set made whole, in place: the column's entries then (a1111 syntax) the prompt's
    <lora:...> tags, resolved to ((path, multiplier, hash), ...) in `folder` (job/loras.py). Returns
    {row index: [(column, message)]} for names that do not resolve, tags that do not parse, and, where
    `generations` gives the row's model's ("SD 1.x", "SD 2.x", "SDXL"; None: unknown), files that
    cannot be used or were trained for another family (LoraFolder.family_problems)."""
    found: dict[int, list[tuple[str, str]]] = {}
    library = LoraFolder(folder)
    generations = generations or [None] * len(conditioning)
    for i, (given, prompt, generation) in enumerate(zip(conditioning, prompts, generations)):
        entries = list(given.get("loras") or ())
        column = "loras"
        if given.get("prompt_syntax") == "a1111" and isinstance(prompt, str):
            try:
                tags = prompt_loras(prompt)
            except LoraProblem as e:
                found.setdefault(i, []).append(("prompt", str(e)))
                continue
            if tags and not entries:
                column = "prompt"
            entries += tags
        if not entries:
            given.pop("loras", None)
            continue
        try:
            given["loras"] = library.row_set(entries)
        except LoraProblem as e:
            found.setdefault(i, []).append((column, str(e)))
            continue
        if generation is not None:
            found_here = [(column, why) for why in library.family_problems(given["loras"], generation)]
            if found_here:
                found.setdefault(i, []).extend(found_here)
    return found


def generation_fields(conditioning: dict) -> dict:
    """A row's conditioning as GenerationRow keyword arguments (loras: (path, multiplier) pairs;
    embeddings: the files' paths, job/embeddings.py)."""
    fields = dict(conditioning)
    if "loras" in fields:
        fields["loras"] = tuple((path, multiplier) for path, multiplier, _ in fields["loras"])
    if "embeddings" in fields:
        fields["embeddings"] = tuple(path for path, _, _ in fields["embeddings"])
    return fields


def syntax_problems(conditioning: list[dict], prompts: list, negatives: list) -> dict[int, list[tuple[str, str]]]:
    """{row index: [(column, message)]} for A1111-syntax rows that use what batchsd refuses (prompt
    editing, alternation: prompt_syntax.unsupported_a1111)."""
    found: dict[int, list[tuple[str, str]]] = {}
    for i, (given, prompt, negative) in enumerate(zip(conditioning, prompts, negatives)):
        if given.get("prompt_syntax") != "a1111":
            continue
        for name, text in (("prompt", prompt), ("negative_prompt", negative)):
            if isinstance(text, str) and (why := unsupported_a1111(text)):
                found.setdefault(i, []).append((name, why))
    return found


def plain_syntax_warning(conditioning: list[dict], prompts: list, negatives: list) -> str | None:
    """A warning when rows read as plain text look written in A1111 syntax, or None."""
    rows = [i for i, (given, p, n) in enumerate(zip(conditioning, prompts, negatives))
            if given.get("prompt_syntax") is None and any(isinstance(t, str) and looks_like_a1111(t) for t in (p, n))]
    if not rows:
        return None
    first = rows[0]
    return (f"{len(rows)} row(s) have prompts written in A1111 syntax (e.g. data row {first + 1}: emphasis "
            f"brackets, BREAK, escapes or <lora:> tags) that are read as plain text: pass --prompt-syntax a1111 "
            f"(or a prompt_syntax column) to read them as A1111 does")


def negative_lora_tag_warning(conditioning: list[dict], negatives: list) -> str | None:
    """A warning when A1111-syntax negative prompts hold <lora:...> tags, or None: a row's LoRA set is
    applied to both passes of guidance and comes from prompt and the loras column only, so the tag is
    removed and not applied."""
    rows = [i for i, (given, n) in enumerate(zip(conditioning, negatives))
            if given.get("prompt_syntax") == "a1111" and isinstance(n, str) and LORA_TAG.search(n)]
    if not rows:
        return None
    return (f"{len(rows)} row(s) have a <lora:...> tag in negative_prompt (e.g. data row {rows[0] + 1}): LoRAs are "
            "read from prompt and the loras column only, so the tag is removed and not applied")
