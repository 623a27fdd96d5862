"""A1111-style PNG metadata: the `parameters` text chunk A1111 and its readers parse, and the full
row as JSON in a `batchsd` chunk.

A setting's value that holds ',' ':' '"' or a line break is written as a JSON string, as A1111 writes
it (modules/infotext_utils.quote: json.dumps, ensure_ascii=False), so that A1111's parser
(`re_param` with `unquote`) reads it back whole: `Model: "anime, v2: final"`.
"""
from __future__ import annotations

import io
import json

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from batchsd.model.sampler_names import a1111_name

_NEEDS_QUOTES = (",", ":", '"', "\n")


def quote(value) -> str:
    """A setting's value as A1111 writes it: as is, or a JSON string when it holds , : " or a line break."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in _NEEDS_QUOTES) else text


def _num(x: float) -> str:
    """Numbers as A1111 infotexts usually read: 7, 7.5, 0.75."""
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def a1111_parameters(record: dict) -> str:
    """The A1111 `parameters` text: prompt, optional `Negative prompt:` line, then the settings line.
    `Model` and `Model hash` (A1111's short hash: the sha256's first 10 hex digits) are the record's
    own: each row names the model that made it."""
    lines = [record.get("prompt") or ""]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    sampler = record.get("sampler") or ""
    settings = [
        f"Steps: {record['steps']}",
        f"Sampler: {quote(a1111_name(sampler))}",
        f"CFG scale: {_num(float(record['cfg_scale']))}",
        f"Seed: {record['seed']}",
        f"Size: {record['width']}x{record['height']}",
    ]
    if record.get("model_sha256"):
        settings.append(f"Model hash: {quote(record['model_sha256'][:10])}")
    settings.append(f"Model: {quote(record.get('model') or '')}")
    if record.get("init_image") is not None and record.get("strength") is not None:
        settings.append(f"Denoising strength: {_num(float(record['strength']))}")
    if record.get("clip_skip") is not None:
        settings.append(f"Clip skip: {record['clip_skip']}")
    if record.get("loras"):   # job/loras.lora_record: name:multiplier:hash12;...
        hashes = ", ".join(f"{e.split(':')[0]}: {e.rsplit(':', 1)[-1]}" for e in record["loras"].split(";"))
        settings.append(f"Lora hashes: {quote(hashes)}")
    if record.get("embeddings"):   # job/embeddings.embedding_record: name:hash12;...
        hashes = ", ".join(f"{e.rsplit(':', 1)[0]}: {e.rsplit(':', 1)[-1]}" for e in record["embeddings"].split(";"))
        settings.append(f"TI hashes: {quote(hashes)}")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def encode_png(image: Image.Image, parameters: str, record_json: str) -> bytes:
    info = PngInfo()
    info.add_text("parameters", parameters)   # tEXt, or iTXt when the text is not latin-1
    info.add_text("batchsd", record_json)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=4)
    return buf.getvalue()
