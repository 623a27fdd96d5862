"""A row's LoRA set: the `loras` column (`name:0.8;other:0.5`) and, under the a1111 prompt syntax,
A1111's `<lora:name:0.8>` tags in the prompt, resolved to files in `--lora-dir` (default
weights/lora/) before any model loads.

A name is a file's stem: `<dir>/<name>.safetensors` (or .pt, .ckpt, .bin), found anywhere below the
folder (A1111 searches subfolders too); a name that two files share, or none, is a problem naming
the row, the column and the fix. The multiplier defaults to 1. The set, in the order written
(column first, then the prompt's tags), with each file's hash (A1111's LoRA hash: the sha256 of a
.safetensors file's tensor data, of the whole file otherwise), is part of the row's params_hash:
another multiplier or a changed file makes the row again. Rows batch with rows of the same set;
the Pipeline applies each set once per run of equal batches (model/lora.py, Pipeline._use_loras).
"""
from __future__ import annotations

import re
from pathlib import Path

from batchsd.model.prompt_syntax import LORA_TAG
from batchsd.model.request import MAX_LORA_MULTIPLIER

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
DEFAULT_LORA_DIR = Path("weights") / "lora"
_NAME = re.compile(r"^[^:;<>]+$")


class LoraProblem(ValueError):
    pass


def parse_lora_list(text: str) -> list[tuple]:
    """`name:0.8;other` -> [("name", 0.8), ("other", 1.0)]; an entry may end in the file's hash as
    results write it (`name:0.8:hash12`, so that an expanded manifest or a results table reads back):
    ("name", 0.8, "hash12"), checked against the file. LoraProblem for a malformed entry."""
    out = []
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        name, _, rest = entry.partition(":")
        weight, _, expected = rest.partition(":")
        item = (_name(name), _multiplier(weight, entry))
        if expected.strip():
            if not re.fullmatch(r"[0-9a-fA-F]{8,64}", expected.strip()):
                raise LoraProblem(f"{entry!r}: {expected.strip()!r} is not a file hash (name:multiplier:hash)")
            item += (expected.strip().lower(),)
        out.append(item)
    return out


def prompt_loras(prompt: str) -> list[tuple[str, float]]:
    """The <lora:name[:multiplier]> tags of an a1111-syntax prompt, in order."""
    return [(_name(m.group(1)), _multiplier(m.group(2) or "", m.group(0))) for m in LORA_TAG.finditer(prompt)]


def _name(name: str) -> str:
    name = name.strip()
    if not name or not _NAME.match(name):
        raise LoraProblem(f"{name!r} is not a LoRA name; write name:multiplier entries separated by ';' "
                          "(e.g. style:0.8;detail)")
    return name


def _multiplier(text: str, entry: str) -> float:
    text = text.strip()
    if not text:
        return 1.0
    try:
        value = float(text)
    except ValueError:
        two = ":" in text   # A1111's <lora:name:te:unet>, separate text-encoder and UNet multipliers
        raise LoraProblem(f"{entry!r}: " + (f"separate text-encoder and UNet multipliers ({text!r}) are not supported; "
                                            "give one (name:0.8)" if two else
                                            f"the multiplier {text!r} is not a number (e.g. name:0.8)")) from None
    if value != value or abs(value) > MAX_LORA_MULTIPLIER:
        raise LoraProblem(f"{entry!r}: the multiplier must be a finite number between -{MAX_LORA_MULTIPLIER:g} and "
                          f"{MAX_LORA_MULTIPLIER:g}")
    return value


class LoraFolder:
    """The LoRA files below one folder, by stem, listed once; each file hashed once."""

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder is not None else DEFAULT_LORA_DIR
        self._by_name: dict[str, list[Path]] | None = None
        self._hashes: dict[Path, str] = {}
        self._families: dict[str, tuple[str | None, str | None]] = {}   # path -> (guessed family, why unusable)

    def _index(self) -> dict[str, list[Path]]:
        if self._by_name is None:
            self._by_name = {}
            if self.folder.is_dir():
                for path in sorted(self.folder.rglob("*")):
                    if path.suffix.lower() in LORA_SUFFIXES and path.is_file():
                        self._by_name.setdefault(path.stem.lower(), []).append(path.resolve())
        return self._by_name

    def resolve(self, name: str) -> Path:
        found = self._index().get(name.lower(), [])
        if not found:
            raise LoraProblem(f"no LoRA named {name!r} in {self.folder}/ (a {name}.safetensors file): put it there "
                              "or pass --lora-dir DIR")
        if len(found) > 1:
            raise LoraProblem(f"LoRA name {name!r} matches {len(found)} files in {self.folder}/ "
                              f"({', '.join(str(p) for p in found[:3])}): rename one")
        return found[0]

    def sha256(self, path: Path) -> str:
        """A1111's LoRA hash (model/lora_files.lora_hash: of a .safetensors file's tensor data)."""
        if path not in self._hashes:
            from batchsd.model.lora_files import lora_hash

            self._hashes[path] = lora_hash(path)
        return self._hashes[path]

    def family_problems(self, row_set, generation: str) -> list[str]:
        """Why each file of a resolved set cannot be used with a `generation` model ("SD 1.x", "SD 2.x",
        "SDXL"): it does not parse as a LoRA, or it was trained for another family (model/lora.guess_family,
        from its names and widths; the Pipeline checks every layer against the model again). Each file
        is read once."""
        from batchsd.model.lora import guess_family
        from batchsd.model.lora_files import LoraError, read_lora

        out = []
        for path, _, _ in row_set:
            if path not in self._families:
                try:
                    self._families[path] = (guess_family(read_lora(path)), None)
                except LoraError as e:
                    self._families[path] = (None, str(e))
            family, why = self._families[path]
            if why:
                out.append(f"{why}; use another LoRA file")
            elif family and generation not in family:
                out.append(f"LoRA {Path(path).stem!r} ({path}) is for {family}, and this row's model is {generation}: "
                           f"use a {generation} LoRA, or make the row with a {family} model (model column or --model)")
        return out

    def row_set(self, entries: list[tuple]) -> tuple[tuple[str, float, str], ...]:
        """[(name, multiplier[, expected hash prefix])] -> ((absolute path, multiplier, hash), ...);
        LoraProblem naming the name (missing, ambiguous, or a file whose hash is not the one given)."""
        out = []
        for name, multiplier, *expected in entries:
            path = self.resolve(name)
            digest = self.sha256(path)
            if expected and not digest.startswith(expected[0]):
                raise LoraProblem(f"LoRA {name!r}: {path} has hash {digest[:12]}, the manifest names {expected[0]}: "
                                  "the file changed since; drop the hash to use the file as it is now")
            out.append((str(path), multiplier, digest))
        return tuple(out)


def column_loras(row) -> tuple:
    """The part of a JobRow's LoRA set that its `loras` column gave: the set is the column's entries
    followed by the a1111 prompt's tags (conditioning_columns.resolve_loras)."""
    row_set = row.conditioning.get("loras") or ()
    tags = prompt_loras(row.prompt) if row.conditioning.get("prompt_syntax") == "a1111" else []
    return tuple(row_set[:len(row_set) - len(tags)])


def lora_record(row_set) -> str | None:
    """The results' `loras` value: `name:multiplier:hash12` entries joined by ';' (None: no LoRA)."""
    if not row_set:
        return None
    return ";".join(f"{Path(p).stem}:{m:g}:{h[:12]}" for p, m, h in row_set)


def a1111_lora_hashes(row_set) -> str | None:
    """A1111's `Lora hashes` infotext value: `name: hash12, other: hash12`."""
    if not row_set:
        return None
    return ", ".join(f"{Path(p).stem.replace(':', '').replace(',', '')}: {h[:12]}" for p, _, h in row_set)
