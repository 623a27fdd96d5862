"""Manifest: read a CSV or Parquet job list and validate every row before any model loads.

One row is one image. Columns (all but `prompt` optional; an empty cell means "use the default"):

    id               output file name stem; default: the 0-based row number, zero-padded to the
                     width of the row count (at least 5 digits: "00000", "00001", ...)
    prompt           required, not empty
    negative_prompt  default ""
    seed             0 <= seed < 2**63; default derived from the id (stable, see `seed_from_id`)
    steps            1..1000, default 25
    cfg_scale        finite, >= 0, default 7.5
    sampler          ddpm, ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras or an A1111 name
                     ("Euler a", "DPM++ 2M Karras", ...), default dpmpp_2m_karras
    width, height    multiples of 8 in 64..2048; default 512, or for img2img the init image's
                     size rounded down to a multiple of 8 (resolved later by the planner)
    init_image       path, relative to the manifest's folder or absolute; makes the row img2img
    strength         0 < strength <= 1, img2img only, default 0.75; int(steps*strength) >= 1

Any other column passes through to the results untouched (CSV cells as the text in the file).

Decisions about numbers:
- An empty cell is a default: "" or whitespace in a CSV, null in Parquet, and NaN in a Parquet
  float column (pandas writes missing numbers as NaN). The text "nan" in a CSV is not empty: it
  is an error, as are inf, -inf and booleans in any numeric column.
- Integers written as floats (25.0, "25.0", 1e3) are accepted when whole; 25.5 is an error. A seed
  written as a float above 2**53 is an error (its last digits may already be lost).
- Row numbers in problems are data rows counted from 1; the header line is not counted.

Scale: the file is read with pyarrow; each column becomes one Python list and is parsed in one
pass; rows with any problem are left out of `Manifest.rows` (the caller refuses to run while
`Manifest.problems` is non-empty).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable

import pyarrow as pa

COLUMNS = ("id", "prompt", "negative_prompt", "seed", "steps", "cfg_scale", "sampler",
           "width", "height", "init_image", "strength")
REQUIRED_COLUMNS = ("prompt",)

DEFAULT_STEPS = 25
DEFAULT_CFG_SCALE = 7.5
DEFAULT_SAMPLER = "dpmpp_2m_karras"
DEFAULT_SIZE = 512
DEFAULT_STRENGTH = 0.75
MIN_SIZE, MAX_SIZE = 64, 2048
MAX_STEPS = 1000
SEED_LIMIT = 2 ** 63               # seeds are 0 <= seed < SEED_LIMIT
MAX_ID_LENGTH = 200                # ids name files: stay well below the 255-byte name limit
MIN_ID_WIDTH = 5

CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")

_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
_ID_BAD_CHAR_RE = re.compile(r"[^A-Za-z0-9._-]")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                     *(f"LPT{i}" for i in range(1, 10))}
_EXACT_FLOAT_INT = 2 ** 53


# ----------------------------------------------------------------------------- rows and problems

@dataclass(frozen=True, slots=True)
class JobRow:
    index: int                 # 0-based position in the manifest
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

    @property
    def is_img2img(self) -> bool:
        return self.init_image is not None

    @property
    def denoise_steps(self) -> int | None:
        """Steps actually run for img2img (int(steps*strength)); None for txt2img."""
        return None if self.strength is None else int(self.steps * self.strength)

    def params_hash(self) -> str:
        """sha256 hex of everything in the row that affects the image; the resume key.

        Covers prompt, negative_prompt, seed, steps, cfg_scale, sampler, width, height, the init
        image's absolute path and strength. Not the id, not pass-through columns, not the model,
        not the init image's bytes. width/height are hashed as the row holds them: hash rows
        after `planner.resolve_image_sizes` so img2img rows carry their resolved size.
        """
        key = ["batchsd-params-v1", self.prompt, self.negative_prompt, self.seed, self.steps,
               float(self.cfg_scale), self.sampler, self.width, self.height, self.init_image,
               None if self.strength is None else float(self.strength)]
        return hashlib.sha256(json.dumps(key, ensure_ascii=False).encode()).hexdigest()

    def to_record(self) -> dict:
        """The manifest columns with defaults resolved (init_image as written), then the extras."""
        record = {"id": self.id, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
                  "seed": self.seed, "steps": self.steps, "cfg_scale": self.cfg_scale,
                  "sampler": self.sampler, "width": self.width, "height": self.height,
                  "init_image": self.init_image_given, "strength": self.strength}
        record.update(self.extra)
        return record


@dataclass(frozen=True)
class ManifestProblem:
    row: int | None            # 1-based data row (header not counted); None for file-level problems
    column: str | None
    message: str               # reason and fix

    def __str__(self) -> str:
        where = []
        if self.row is not None:
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

    @property
    def ok(self) -> bool:
        return not self.problems

    def format_problems(self, limit: int = 20) -> str:
        """A report for the terminal: the first `limit` problems, then how many more."""
        n = len(self.problems)
        lines = [f"{self.path}: {n} problem{'s' if n != 1 else ''} found before loading any model"
                 " (rows are data rows counted from 1; the header line is not counted):"]
        lines += [f"  {p}" for p in self.problems[:limit]]
        if n > limit:
            lines.append(f"  ... and {n - limit} more problem{'s' if n - limit != 1 else ''}")
        return "\n".join(lines)


def seed_from_id(row_id: str) -> int:
    """The default seed of a row: the first 8 bytes of sha256(id), big-endian, & (2**63 - 1)."""
    return int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:8], "big") & (SEED_LIMIT - 1)


def default_id(index: int, num_rows: int) -> str:
    """The id of a row without one: its 0-based row number, zero-padded."""
    return str(index).zfill(max(MIN_ID_WIDTH, len(str(num_rows))))


# ----------------------------------------------------------------------------- cell parsers
# Each parser takes one non-null Python value from the file and returns the parsed value, _EMPTY
# (use the default) or raises _Bad(reason and fix).

class _Bad(Exception):
    pass


_EMPTY = object()


def _number(v, fix: str):
    """int or float from an int, float or text cell; _EMPTY for blanks."""
    if isinstance(v, bool):
        raise _Bad(f"{v!r} is a boolean, not a number; {fix}")
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if v != v:
            return _EMPTY
        x = v
    elif isinstance(v, str):
        s = v.strip()
        if not s:
            return _EMPTY
        try:
            return int(s)
        except ValueError:
            pass
        try:
            d = Decimal(s)          # exact: "9007199254740993.0" stays that integer
        except InvalidOperation:
            raise _Bad(f"{v!r} is not a number; {fix}") from None
        if d.is_nan():
            raise _Bad(f"{v!r} is not a number (leave the cell empty for the default); {fix}")
        if d.is_finite() and d == d.to_integral_value() and d.adjusted() < 40:
            return int(d)
        x = float(d)
    else:
        raise _Bad(f"{v!r} ({type(v).__name__}) is not a number; {fix}")
    if not math.isfinite(x):
        raise _Bad(f"{v!r} is not finite; {fix}")
    return x


def _int_parser(lo: int, hi: int, fix: str) -> Callable:
    def parse(v):
        x = _number(v, fix)
        if x is _EMPTY or type(x) is int:
            pass
        elif x != int(x):
            raise _Bad(f"{v!r} is not a whole number; {fix}")
        elif _EXACT_FLOAT_INT < abs(x) and lo <= x <= hi:
            raise _Bad(f"{v!r} is written as a floating-point number above 2**53, so its last digits "
                       "may already be lost; write it as an integer (in pandas: an Int64 column)")
        else:
            x = int(x)
        if x is not _EMPTY and not lo <= x <= hi:
            raise _Bad(f"{v!r} is out of range; {fix}")
        return x
    return parse


def _float_parser(ok: Callable[[float], bool], fix: str) -> Callable:
    def parse(v):
        x = _number(v, fix)
        if x is _EMPTY:
            return x
        x = float(x)
        if not ok(x):
            raise _Bad(f"{v!r} is out of range; {fix}")
        return x
    return parse


def _size_parser(name: str) -> Callable:
    fix = f"use a multiple of 8 from {MIN_SIZE} to {MAX_SIZE}"
    parse_int = _int_parser(-2 ** 62, 2 ** 62, fix)

    def parse(v):
        x = parse_int(v)
        if x is _EMPTY:
            return x
        if not MIN_SIZE <= x <= MAX_SIZE:
            raise _Bad(f"{name} {x} is out of range; {fix} (e.g. {MIN_SIZE if x < MIN_SIZE else MAX_SIZE})")
        if x % 8:
            near = " or ".join(str(s) for s in (x - x % 8, x - x % 8 + 8) if MIN_SIZE <= s <= MAX_SIZE)
            raise _Bad(f"{name} {x} is not a multiple of 8; use {near}")
        return x
    return parse


def _text_parser(fix: str) -> Callable:
    def parse(v):
        if isinstance(v, str):
            return v
        raise _Bad(f"{v!r} ({type(v).__name__}) is not text; {fix}")
    return parse


def _parse_prompt(v):
    if not isinstance(v, str):
        raise _Bad(f"{v!r} ({type(v).__name__}) is not text; write the prompt as text")
    if not v.strip():
        raise _Bad("the prompt is empty; every row needs a prompt")
    return v


def _parse_id(v):
    if isinstance(v, bool):
        raise _Bad(f"{v!r} is a boolean; write the id as text")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return _EMPTY
        if not math.isfinite(v) or v != int(v):
            raise _Bad(f"{v!r} is not a usable id; write ids as text")
        return str(int(v))
    if not isinstance(v, str):
        raise _Bad(f"{v!r} ({type(v).__name__}) is not text; write the id as text")
    if not v.strip():
        return _EMPTY
    return v


def id_problem(row_id: str) -> str | None:
    """Why `row_id` cannot name output files (with the fix), or None when it is safe."""
    rule = "ids name the output files: use only letters, digits, '.', '_' and '-'"
    if len(row_id) > MAX_ID_LENGTH:
        return f"id is {len(row_id)} characters long; use at most {MAX_ID_LENGTH}"
    if not _ID_RE.fullmatch(row_id):
        bad = _ID_BAD_CHAR_RE.search(row_id).group()
        return f"id {row_id!r} contains {bad!r}; {rule}"
    if row_id in (".", ".."):
        return f"id {row_id!r} is not a file name; {rule}, not only dots"
    if row_id[0] in ".-":
        return f"id {row_id!r} starts with {row_id[0]!r} (a hidden file or a command-line option); start it with a letter or digit"
    if row_id.split(".")[0].upper() in _WINDOWS_RESERVED:
        return f"id {row_id!r} is a reserved device name on Windows; choose another id"
    return None


def _parse_sampler(resolve: Callable[[str], str]) -> Callable:
    cache: dict[str, str | Exception] = {}

    def parse(v):
        if not isinstance(v, str):
            raise _Bad(f"{v!r} ({type(v).__name__}) is not a sampler name; write it as text")
        if not v.strip():
            return _EMPTY
        hit = cache.get(v)
        if hit is None:
            try:
                hit = resolve(v)
            except ValueError as e:
                hit = e
            cache[v] = hit
        if isinstance(hit, Exception):
            raise _Bad(str(hit))
        return hit
    return parse


def _parse_column(values: list, parse: Callable, column: str, bad: dict[int, list]) -> list:
    """Parse one column's values; blanks and nulls become _EMPTY; problems go to bad[index]."""
    out = [_EMPTY] * len(values)
    for i, v in enumerate(values):
        if v is None:
            continue
        try:
            out[i] = parse(v)
        except _Bad as e:
            bad.setdefault(i, []).append(ManifestProblem(i + 1, column, str(e)))
    return out


# ----------------------------------------------------------------------------- reading files

def _read_table(path: Path) -> pa.Table:
    """The file as an Arrow table; CSV cells all as text (empty cells as ""). Raises _Bad."""
    suffix = path.suffix.lower()
    if suffix not in CSV_SUFFIXES + PARQUET_SUFFIXES:
        raise _Bad(f"unsupported file type {path.suffix or '(no extension)'!r}; "
                   "write the manifest as .csv or .parquet")
    if not path.exists():
        raise _Bad("file not found; check the path")
    if not path.is_file():
        raise _Bad("not a file; give the path of a .csv or .parquet manifest")
    try:
        if suffix in CSV_SUFFIXES:
            import pyarrow.csv as pacsv
            parse_options = pacsv.ParseOptions(newlines_in_values=True)
            names = pacsv.open_csv(path, parse_options=parse_options).schema.names
            convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                           strings_can_be_null=False, quoted_strings_can_be_null=False)
            return pacsv.read_csv(path, parse_options=parse_options, convert_options=convert)
        import pyarrow.parquet as pq
        return pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        kind = "CSV (UTF-8, comma-separated, one header line)" if suffix in CSV_SUFFIXES else "Parquet"
        raise _Bad(f"cannot read the file as {kind}: {e}") from None


def _normalized(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).lower()


_NORMALIZED_COLUMNS = {_normalized(c): c for c in COLUMNS}


def _column_problems(names: list[str]) -> list[ManifestProblem]:
    problems = []
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name == "":
            problems.append(ManifestProblem(None, None, f"column {i + 1} has no name; name it or remove it "
                                            "(pandas writes its index this way: use to_csv(index=False))"))
        elif name in seen:
            problems.append(ManifestProblem(None, name, "appears twice in the header; keep one"))
        elif name not in COLUMNS and _normalized(name) in _NORMALIZED_COLUMNS:
            known = _NORMALIZED_COLUMNS[_normalized(name)]
            problems.append(ManifestProblem(None, name, f"looks like {known!r} but would be passed through "
                                            f"unused (names are exact and lower-case); rename it to {known!r}"))
        seen.add(name)
    if "prompt" not in seen:
        problems.append(ManifestProblem(None, "prompt", "the required column 'prompt' is missing; "
                                        f"add it (found columns: {', '.join(map(repr, names)) or 'none'})"))
    return problems


# ----------------------------------------------------------------------------- read_manifest

def read_manifest(path) -> Manifest:
    """Read and validate a manifest. Never raises for bad content: problems are returned."""
    from batchsd.samplers import resolve_sampler  # here, not at the top: it imports torch

    path = Path(path)
    try:
        table = _read_table(path)
    except _Bad as e:
        return Manifest(path, [], [ManifestProblem(None, None, str(e))], [], [])
    names = list(table.column_names)
    extra_columns = [n for n in names if n not in COLUMNS]
    problems = _column_problems(names)
    n = table.num_rows
    if n == 0:
        problems.append(ManifestProblem(None, None, "the manifest has no rows; add one row per image"))
    if problems:
        return Manifest(path, [], problems, names, extra_columns, n)

    def values(name):
        return table.column(name).to_pylist() if name in names else None

    bad: dict[int, list[ManifestProblem]] = {}
    parsers = {
        "id": _parse_id,
        "prompt": _parse_prompt,
        "negative_prompt": _text_parser("write the negative prompt as text"),
        "seed": _int_parser(0, SEED_LIMIT - 1, "use an integer from 0 to 2**63-1 "
                            "(or leave it empty for a seed derived from the id)"),
        "steps": _int_parser(1, MAX_STEPS, f"use a whole number from 1 to {MAX_STEPS} (e.g. {DEFAULT_STEPS})"),
        "cfg_scale": _float_parser(lambda x: x >= 0, f"use a finite number >= 0 (e.g. {DEFAULT_CFG_SCALE})"),
        "sampler": _parse_sampler(resolve_sampler),
        "width": _size_parser("width"),
        "height": _size_parser("height"),
        "init_image": _text_parser("write the init image's path as text"),
        "strength": _float_parser(lambda x: 0 < x <= 1, "use a number with 0 < strength <= 1 (e.g. 0.75)"),
    }
    empty = [_EMPTY] * n
    parsed = {}
    for name, parse in parsers.items():
        col = values(name)
        parsed[name] = empty if col is None else _parse_column(col, parse, name, bad)
    del col

    base = os.path.abspath(path.parent)
    extras = [(name, table.column(name).to_pylist()) for name in extra_columns]
    seen_ids: dict[str, tuple[int, str]] = {}     # lower-cased id -> (1-based row, id) of first use
    rows: list[JobRow] = []
    ids, prompts, negatives, seeds = parsed["id"], parsed["prompt"], parsed["negative_prompt"], parsed["seed"]
    steps_col, cfgs, samplers = parsed["steps"], parsed["cfg_scale"], parsed["sampler"]
    widths, heights, inits, strengths = parsed["width"], parsed["height"], parsed["init_image"], parsed["strength"]
    id_width = len(default_id(0, n))
    for i in range(n):
        row_problems = bad.get(i)
        # id: default, safety, uniqueness (case-insensitive filesystems)
        row_id = ids[i]
        if row_id is _EMPTY:
            row_id = str(i).zfill(id_width)
        elif row_problems is None or all(p.column != "id" for p in row_problems):
            reason = id_problem(row_id)
            if reason is not None:
                row_problems = bad.setdefault(i, [])
                row_problems.append(ManifestProblem(i + 1, "id", reason))
                row_id = None
        else:
            row_id = None
        if row_id is not None:
            first = seen_ids.setdefault(row_id.lower(), (i + 1, row_id))
            if first[0] != i + 1:
                row_problems = bad.setdefault(i, [])
                how = "the same id" if first[1] == row_id else f"{first[1]!r}, which differs only by case"
                if ids[first[0] - 1] is _EMPTY:
                    how += ", given by default to a row without an id"
                this = f"id {row_id!r}" if ids[i] is not _EMPTY else f"this row has no id; its default id {row_id!r}"
                row_problems.append(ManifestProblem(
                    i + 1, "id", f"{this} is already used by data row {first[0]} ({how}); ids must be unique, "
                    "ignoring case, because they name the output files: change one of them"))
        # prompt is required in every row
        if prompts[i] is _EMPTY and not any(p.column == "prompt" for p in row_problems or ()):
            row_problems = bad.setdefault(i, [])
            row_problems.append(ManifestProblem(i + 1, "prompt", "the prompt is empty; every row needs a prompt"))
        # img2img
        init = inits[i]
        strength = strengths[i]
        if init is _EMPTY or (isinstance(init, str) and not init.strip()):
            init = None
            if strength is not _EMPTY:
                row_problems = bad.setdefault(i, [])
                row_problems.append(ManifestProblem(
                    i + 1, "strength", "strength is set but init_image is empty; strength only applies "
                    "to img2img: give an init_image or leave strength empty"))
            strength = None
        else:
            if strength is _EMPTY:
                strength = DEFAULT_STRENGTH
            steps = DEFAULT_STEPS if steps_col[i] is _EMPTY else steps_col[i]
            steps_ok = not any(p.column == "steps" for p in row_problems or ())
            if isinstance(strength, float) and steps_ok and int(steps * strength) < 1:
                row_problems = bad.setdefault(i, [])
                row_problems.append(ManifestProblem(i + 1, "strength", _no_denoise_steps_message(steps, strength)))
        if row_problems:
            continue
        seed = seeds[i]
        width, height = widths[i], heights[i]
        default_size = None if init is not None else DEFAULT_SIZE
        rows.append(JobRow(
            index=i, id=row_id, prompt=prompts[i],
            negative_prompt="" if negatives[i] is _EMPTY else negatives[i],
            seed=seed_from_id(row_id) if seed is _EMPTY else seed,
            steps=DEFAULT_STEPS if steps_col[i] is _EMPTY else steps_col[i],
            cfg_scale=DEFAULT_CFG_SCALE if cfgs[i] is _EMPTY else cfgs[i],
            sampler=DEFAULT_SAMPLER if samplers[i] is _EMPTY else samplers[i],
            width=default_size if width is _EMPTY else width,
            height=default_size if height is _EMPTY else height,
            init_image=None if init is None else os.path.abspath(os.path.join(base, os.path.expanduser(init))),
            strength=strength,
            extra={name: col[i] for name, col in extras},
            init_image_given=init,
        ))
    order = {c: k for k, c in enumerate(COLUMNS)}
    for i in sorted(bad):
        problems.extend(sorted(bad[i], key=lambda p: order[p.column]))
    return Manifest(path, rows, problems, names, extra_columns, n)


def _no_denoise_steps_message(steps: int, strength: float) -> str:
    min_steps = math.ceil(1 / strength)
    while int(min_steps * strength) < 1:
        min_steps += 1
    return (f"steps={steps} with strength={strength:g} runs int({steps}*{strength:g}) = 0 denoising steps; "
            f"raise strength to at least {1 / steps:.4g} or steps to at least {min_steps}")
