"""A manifest's rows and problems: JobRow (one validated row, its params_hash and record),
ManifestProblem, Manifest (what manifest.read_manifest returns), ManifestOptions (how to read it:
column renames, the wildcards folder), and the rules a row's id and default seed follow
(`id_problem`, `default_id`, `seed_from_id`; manifest.py describes them).
The limits and defaults of a row's parameters live in batchsd/model/request.py.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from typing import TYPE_CHECKING

from batchsd.model.request import SEED_LIMIT, img2img_steps

if TYPE_CHECKING:
    import pyarrow as pa

MAX_ID_LENGTH = 200                # ids name files: stay well below the 255-byte name limit
MIN_ID_WIDTH = 5

# letters, digits, . _ -; not starting with . or -; not a Windows device name (CON, NUL.txt, ...)
SAFE_ID_RE = re.compile(r"(?!(?i:con|prn|aux|nul|com[1-9]|lpt[1-9])(?:\.|$))[A-Za-z0-9_][A-Za-z0-9._-]{0,%d}"
                        % (MAX_ID_LENGTH - 1))
_ID_BAD_CHAR_RE = re.compile(r"[^A-Za-z0-9._-]")


def _portable(conditioning: dict[str, Any]) -> dict[str, Any]:
    """The conditioning with its files named by content: a LoRA as (multiplier, its A1111 hash, the
    sha256 of its safetensors header, where a PEFT file's alpha is), an embedding as (name, sha256),
    the name being what a prompt calls it (loras.row_set, embeddings.py)."""
    out = dict(conditioning)
    if out.get("loras"):
        from batchsd.model.lora_files import lora_header_sha256

        out["loras"] = [[multiplier, digest, lora_header_sha256(path)] for path, multiplier, digest in out["loras"]]
    if "embeddings" in out:
        out["embeddings"] = [[Path(path).stem, digest] for path, _, digest in out["embeddings"]]
    return out


@dataclass(frozen=True, slots=True)
class JobRow:
    index: int                 # 0-based position in the job's rows (after expansion; expand.py)
    id: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    cfg_scale: float
    sampler: str               # canonical name
    width: int | None          # None only for img2img rows without an explicit size (planner resolves)
    height: int | None
    init_image: str | None     # absolute path
    strength: float | None     # None for txt2img rows
    extra: dict[str, object]   # pass-through columns, original names and values
    init_image_given: str | None = None  # init_image as written in the manifest
    init_image_sha256: str | None = None  # the init image file's content hash (init_images.resolve_image_sizes)
    source_row: int | None = None  # 0-based data row of the file this row was expanded from; None: `index`
    # conditioning_columns.CONDITIONING_COLUMNS given for this row (SDXL size/crop, clip_skip,
    # prompt_syntax when not plain); empty for most rows
    conditioning: dict[str, Any] = field(default_factory=dict)
    # the checkpoint of the row's `model` cell (model_choice.resolve_row_models: an absolute path or
    # "tiny"); None: the run's model (--model). Not in params_hash: resume compares models apart
    model: str | None = None

    @property
    def data_row(self) -> int:
        """The 1-based data row of the manifest file this row comes from (what problems name)."""
        return (self.index if self.source_row is None else self.source_row) + 1

    @property
    def is_img2img(self) -> bool:
        return self.init_image is not None

    @property
    def denoise_steps(self) -> int | None:
        """Steps actually run for img2img (request.img2img_steps); None for txt2img."""
        return None if self.strength is None else img2img_steps(self.steps, self.strength)

    def params_hash(self) -> str:
        """sha256 hex of everything in the row that affects the image; the resume key.

        Covers prompt, negative_prompt, seed, steps, cfg_scale, sampler, width, height, strength,
        the conditioning columns, and the files a row reads by their content only (the init image's
        `init_image_sha256`: an image replaced in place is made again; each LoRA's and embedding's
        hash), never by where they are: the key, which the results and the image metadata carry,
        is the same in any folder the job is regenerated in. Not the id, not pass-through columns,
        not the model. Text-to-image keys without files are unchanged since v1, so their outputs
        are never remade by an upgrade. width/height and the image hash are hashed as the row holds
        them: hash rows after `init_images.resolve_image_sizes`, which fills both in.
        """
        key = ["batchsd-params-v1", self.prompt, self.negative_prompt, self.seed, self.steps,
               float(self.cfg_scale), self.sampler, self.width, self.height,
               None if self.init_image is None else "init image",
               None if self.strength is None else float(self.strength)]
        if self.init_image is not None:   # an image that cannot be read has no content hash: its path as written
            key.append(self.init_image_sha256 or ["unreadable", self.init_image_given])
        if self.conditioning:   # only when given: rows without them keep their v1 keys
            key.append(sorted(_portable(self.conditioning).items()))
        return hashlib.sha256(json.dumps(key, ensure_ascii=False).encode()).hexdigest()

    def to_record(self) -> dict:
        """The manifest columns with defaults resolved (init_image as written), then the extras."""
        record = {"id": self.id, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
                  "seed": self.seed, "steps": self.steps, "cfg_scale": self.cfg_scale,
                  "sampler": self.sampler, "width": self.width, "height": self.height,
                  "init_image": self.init_image_given, "strength": self.strength}
        for name in ("original_width", "original_height", "crop_top", "crop_left", "clip_skip"):
            record[name] = self.conditioning.get(name)
        record["prompt_syntax"] = self.conditioning.get("prompt_syntax", "plain")
        from batchsd.job.loras import lora_record

        record["loras"] = lora_record(self.conditioning.get("loras"))
        record.update(self.extra)
        return record


@dataclass(frozen=True)
class ManifestProblem:
    row: int | None            # 1-based data row (header not counted); None for file-level problems
    column: str | None
    message: str               # reason and fix
    line: int | None = None    # the row's line in a .txt/.jsonl file (blank lines are not rows)

    def __str__(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"line {self.line}" + (f" (data row {self.row})" if self.row not in (None, self.line) else ""))
        elif self.row is not None:
            where.append(f"data row {self.row}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


@dataclass
class Manifest:
    path: Path
    rows: list[JobRow]                 # the valid rows, in file order
    problems: list[ManifestProblem]    # file-level problems first, then by row
    columns: list[str]                 # original column order
    extra_columns: list[str]           # pass-through columns, in file order
    num_rows: int = 0                  # data rows in the file, valid or not
    # pass-through column -> its Arrow type: a Parquet column's own type, string for CSV
    extra_types: dict[str, pa.DataType] = field(default_factory=dict)
    # the pass-through values of every data row (valid or not), as read: one column per extra
    # column, num_rows long; `extras` takes the valid rows' from it. When the file's rows were
    # expanded (expand.py) it holds one row per job row instead (and `prompt_template`)
    extra_values: pa.Table | None = field(default=None, repr=False)
    # columns that look like parameters but are passed through unused (column_map.lookalike_warnings)
    warnings: list[ManifestProblem] = field(default_factory=list)
    _extras: pa.Table | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def extras(self) -> pa.Table:
        """`id` and the pass-through columns (their own types) of every valid row, in file order:
        the values the results table shows (journal.Journal overlays them at compaction, so a
        changed pass-through column shows without remaking its rows). Built once, on first use."""
        if self._extras is None:
            import pyarrow as pa

            ids = pa.array([r.id for r in self.rows], pa.string())
            if self.extra_values is None:             # a Manifest made by hand: from the rows
                from batchsd.job.schema import extra_types_for, records_to_table, results_schema

                types = self.extra_types or extra_types_for([r.extra for r in self.rows], self.extra_columns)
                values = records_to_table([r.extra for r in self.rows], results_schema(types))
                values = values.select([c for c in self.extra_columns if c in values.column_names])
            elif len(self.rows) == self.extra_values.num_rows:
                values = self.extra_values
            else:
                values = self.extra_values.take(pa.array([r.index for r in self.rows], pa.int64()))
            self._extras = pa.Table.from_arrays([ids, *values.columns], names=["id", *values.column_names])
        return self._extras

    def format_problems(self, limit: int = 20) -> str:
        """A report for the terminal: the first `limit` problems, then how many more."""
        n = len(self.problems)
        how = (" (lines are the file's lines; data rows are its non-blank lines, counted from 1):"
               if any(p.line is not None for p in self.problems) else
               " (rows are data rows counted from 1; the header line is not counted):")
        lines = [f"{self.path}: {n} problem{'s' if n != 1 else ''} found before loading any model{how}"]
        lines += [f"  {p}" for p in self.problems[:limit]]
        if n > limit:
            lines.append(f"  ... and {n - limit} more problem{'s' if n - limit != 1 else ''}")
        return "\n".join(lines)


@dataclass(frozen=True)
class ManifestOptions:
    """How to read a manifest besides its path: `--map` column renames (source -> target, applied
    before anything else) and the `--wildcards` folder (prompt_template.py). Recorded in run.json
    so that `batchsd status` reads the job the same way."""
    column_map: tuple[tuple[str, str], ...] = ()
    wildcards: Path | None = None
    prompt_syntax: str = "plain"     # rows without a prompt_syntax cell (--prompt-syntax)
    lora_dir: Path | None = None     # where LoRA names are looked up (--lora-dir; None: loras.DEFAULT_LORA_DIR)
    # where embedding names are looked up (--embeddings-dir; None: embeddings.DEFAULT_EMBEDDINGS_DIR)
    embeddings_dir: Path | None = None
    default_size: int | None = None  # unsized text-to-image rows (the model family's; None: request.DEFAULT_SIZE)
    # the run model's generation ("SD 1.x", "SD 2.x", "SDXL"; None: unknown): its rows' LoRAs are checked against it
    model_generation: str | None = None
    # where `model` cells that are names are looked up (None: ./weights, model_choice.WEIGHTS_DIR)
    weights_dir: Path | None = None
    # --prediction-type: how rows' models are read, which sets the default size of an SD 2.x file's rows
    prediction_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"column_map": [list(pair) for pair in self.column_map],
                "wildcards": None if self.wildcards is None else str(Path(self.wildcards).resolve()),
                "prompt_syntax": self.prompt_syntax, "default_size": self.default_size,
                "model_generation": self.model_generation,
                "lora_dir": None if self.lora_dir is None else str(Path(self.lora_dir).resolve()),
                "embeddings_dir": None if self.embeddings_dir is None else str(Path(self.embeddings_dir).resolve()),
                "weights_dir": None if self.weights_dir is None else str(Path(self.weights_dir).resolve()),
                "prediction_type": self.prediction_type}

    @classmethod
    def from_json(cls, data: Any) -> ManifestOptions:
        """From `to_json`'s dict; a missing or malformed value reads as no options."""
        if not isinstance(data, dict):
            return cls()
        pairs = data.get("column_map") or []
        column_map = tuple((str(p[0]), str(p[1])) for p in pairs if isinstance(p, list) and len(p) == 2)
        wildcards = data.get("wildcards")
        syntax = data.get("prompt_syntax")
        size = data.get("default_size")
        lora_dir = data.get("lora_dir")
        embeddings_dir = data.get("embeddings_dir")
        weights_dir = data.get("weights_dir")
        prediction_type = data.get("prediction_type")
        generation = data.get("model_generation")
        return cls(column_map, Path(wildcards) if isinstance(wildcards, str) and wildcards else None,
                   prompt_syntax=syntax if syntax in ("plain", "a1111") else "plain",
                   default_size=size if isinstance(size, int) and not isinstance(size, bool) else None,
                   lora_dir=Path(lora_dir) if isinstance(lora_dir, str) and lora_dir else None,
                   embeddings_dir=Path(embeddings_dir) if isinstance(embeddings_dir, str) and embeddings_dir else None,
                   weights_dir=Path(weights_dir) if isinstance(weights_dir, str) and weights_dir else None,
                   prediction_type=prediction_type if prediction_type in ("epsilon", "v_prediction") else None,
                   model_generation=generation if isinstance(generation, str) else None)


def seed_from_id(row_id: str) -> int:
    """The default seed of a row: the first 8 bytes of sha256(id), big-endian, & (2**63 - 1)."""
    return int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:8], "big") & (SEED_LIMIT - 1)


def default_id(index: int, num_rows: int) -> str:
    """The id of a row without one: its 0-based row number, zero-padded."""
    return str(index).zfill(max(MIN_ID_WIDTH, len(str(num_rows))))


def id_problem(row_id: str) -> str | None:
    """Why `row_id` cannot name output files (with the fix), or None when it is safe."""
    if SAFE_ID_RE.fullmatch(row_id):
        return None
    rule = "ids name the output files: use only letters, digits, '.', '_' and '-'"
    if len(row_id) > MAX_ID_LENGTH:
        return f"id is {len(row_id)} characters long; use at most {MAX_ID_LENGTH}"
    bad = _ID_BAD_CHAR_RE.search(row_id)
    if bad:
        return f"id {row_id!r} contains {bad.group()!r}; {rule}"
    if row_id in (".", ".."):
        return f"id {row_id!r} is not a file name; {rule}, not only dots"
    if row_id[0] in ".-":
        return (f"id {row_id!r} starts with {row_id[0]!r} (a hidden file or a command-line option); "
                "start it with a letter, digit or '_'")
    return f"id {row_id!r} is a reserved device name on Windows; choose another id"
