"""Manifest: read a job list (CSV, Parquet, or .txt/.jsonl: manifest_formats.py) and validate every
row before any model loads.
What it returns (Manifest, JobRow, ManifestProblem) and the id and default-seed rules are in
rows.py; the limits and defaults of every parameter are in batchsd/model/request.py and the
sampler names in batchsd/model/sampler_names.py (one home for each rule: the Pipeline checks the
same ones); this module holds the column spec, the parsers and `read_manifest`.

A row asks for one image, or several (`n_images`, a seed range, prompt templates: expand.py makes
the job's rows from the file's rows). `--map` renames columns first (column_map.py). Columns (all but
`prompt` optional; an empty cell means "use the default"):

    id               output file name stem; default: the 0-based row number, zero-padded to the
                     width of the row count (at least 5 digits: "00000", "00001", ...)
    prompt           required, not empty
    negative_prompt  default ""
    seed             0 <= seed < 2**63; default derived from the id (stable, see `rows.seed_from_id`)
    steps            1..1000, default 25
    cfg_scale        finite, 0..100 (request.MAX_CFG_SCALE), default 7.5
    sampler          ddpm, ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras or an A1111 name
                     ("Euler a", "DPM++ 2M Karras", ...), default dpmpp_2m_karras
    width, height    multiples of 8 in 64..2048; default the row's model's size (ManifestOptions.
                     default_size, or the `model` cell's: 512 SD 1.x, 1024 SDXL, ...), or for img2img
                     the init image's size rounded down to a multiple of 8 (resolved later by the planner)
    init_image       path, relative to the manifest's folder or absolute; makes the row img2img
    strength         0 < strength <= 1, img2img only, default 0.75; int(steps*strength) >= 1
    n_images         1..expand.MAX_N_IMAGES images from the row, default 1 (seed may also be a range
                     `100-199`; the prompt may be a template `{a|b}` / `__name__`: expand.py)
    model            the checkpoint that makes the row (model_choice.find_row_model: a path, relative
                     to the manifest's folder or the working folder, or a name in weights/, or "tiny");
                     default: the run's model (--model). Its header is read here: a model that does
                     not load as given is the row's problem. Unsized rows take its default size.

Any other column passes through to the results untouched: a Parquet column with its Arrow type
(Manifest.extra_types; timestamps, decimals, binary, lists, structs, uint64, int8 ... as they are),
a CSV cell as the text in the file (an empty cell as null). A pass-through column may not take the
name of a column the run adds (schema.RESULT_NAMES: status, error, model, ...): that is a problem
(rename it, e.g. `src_status`), as it would be replaced by the run's value.

Decisions about numbers:
- An empty cell is a default: "" or whitespace in a CSV, null in Parquet, and NaN in a Parquet
  float column (pandas writes missing numbers as NaN). The text "nan" in a CSV is not empty: it
  is an error, as are inf, -inf and booleans in any numeric column.
- Integers written as floats (25.0, "25.0", 1e3) are accepted when whole; 25.5 is an error. A seed
  written as a float above 2**53 is an error (its last digits may already be lost).
- Row numbers in problems are data rows counted from 1; the header line is not counted.

Ids name output files: letters, digits, '.', '_', '-'; at most 200 characters; not starting with
'.' or '-'; not a Windows device name (CON, NUL.txt, ...); unique ignoring case (case-insensitive
filesystems), default ids included (rows.id_problem).

Every problem is collected (file-level ones first, then by data row and column order); a data row
with any problem gives no rows to `Manifest.rows`, and the caller refuses to run while
`Manifest.problems` is non-empty. Scale: the file is read with pyarrow and parsed column by column; columns whose values
repeat are parsed once per distinct value, integer seeds and plain prompts are checked by Arrow
(tests/bench/bench_manifest.py measures a 1,000,000-row manifest; figures: docs/performance.md).

A CSV row longer than pyarrow's read block (1 MiB by default: a 50 MB prompt) is read by retrying
with a larger block, up to the file's size; a malformed CSV row is reported with its row number.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchsd.job.column_map import apply_column_map, lookalike_warnings, normalized
from batchsd.job.conditioning_columns import (CONDITIONING_COLUMNS, negative_lora_tag_warning, parse_conditioning,
                                              plain_syntax_warning, resolve_loras, syntax_problems)
from batchsd.job.embeddings import resolve_embeddings
from batchsd.job.expand import (MAX_N_IMAGES, N_IMAGES, TEMPLATE_COLUMN, SeedRange, compile_templates, expand_rows,
                                expanded_extras, image_counts, may_hold_templates, needs_expansion,
                                parse_seed_range)
from batchsd.job.model_choice import resolve_row_models
from batchsd.job.manifest_formats import (JSONL_SUFFIXES, PARQUET_SUFFIXES, TXT_SUFFIXES, FormatProblems, read_jsonl,
                                          read_parquet, read_txt)
from batchsd.job.prompt_template import PromptTemplates, has_syntax
from batchsd.job.rows import (SAFE_ID_RE, JobRow, Manifest, ManifestOptions, ManifestProblem, default_id, id_problem,
                              seed_from_id)
from batchsd.job.schema import RESULT_NAMES
from batchsd.model.request import (DEFAULT_CFG_SCALE, DEFAULT_SAMPLER, DEFAULT_SIZE, DEFAULT_STEPS, DEFAULT_STRENGTH,
                                   MAX_CFG_SCALE, MAX_SIZE, MAX_STEPS, MIN_SIZE, SEED_LIMIT, SIZE_MULTIPLE,
                                   img2img_steps)
from batchsd.model.sampler_names import resolve_sampler

COLUMNS = ("id", "prompt", "negative_prompt", "seed", "steps", "cfg_scale", "sampler",
           "width", "height", "init_image", "strength", N_IMAGES, *CONDITIONING_COLUMNS, "model")

CSV_SUFFIXES = (".csv",)

CSV_BLOCK_SIZE = 1 << 20            # pyarrow's default read block; a row must fit in one block
CSV_MAX_BLOCK_SIZE = 2 ** 31 - 1    # the largest block pyarrow takes (an int32)
_CSV_BLOCK_GROWTH = 8

_EXACT_FLOAT_INT = 2 ** 53


# ----------------------------------------------------------------------------- cell parsers
# A parser takes one non-null Python value from the file and returns the parsed value, None for a
# blank cell (use the default), or raises _Bad(reason and fix).

class _Bad(Exception):
    pass


_INTEGER_RE = re.compile(r"[+-]?[0-9]+")
_DECIMAL_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _number(v, fix: str):
    """int or float from an int, float or text cell; None for blanks."""
    if isinstance(v, bool):
        raise _Bad(f"{v!r} is a boolean, not a number; {fix}")
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if v != v:
            return None
        x = v
    elif isinstance(v, (str, Decimal)):   # Decimal: a Parquet decimal column
        if isinstance(v, str):
            s = v.strip()
            if not s:
                return None
            if _INTEGER_RE.fullmatch(s):
                return int(s)
            # ASCII digits only: Python's int() and Decimal() also read "1_000" and other scripts' digits
            if not _DECIMAL_RE.fullmatch(s) and s.lower().lstrip("+-") not in ("nan", "inf", "infinity"):
                raise _Bad(f"{v!r} is not a number; {fix}")
            d = Decimal(s)          # exact: "9007199254740993.0" stays that integer
        else:
            d = v
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
        if x is None or type(x) is int:
            pass
        elif x != int(x):
            raise _Bad(f"{v!r} is not a whole number; {fix}")
        elif _EXACT_FLOAT_INT < abs(x) and lo <= x <= hi:
            raise _Bad(f"{v!r} is written as a floating-point number above 2**53, so its last digits "
                       "may already be lost; write it as an integer (in pandas: an Int64 column)")
        else:
            x = int(x)
        if x is not None and not lo <= x <= hi:
            raise _Bad(f"{v!r} is out of range; {fix}")
        return x
    return parse


def _float_parser(ok: Callable[[float], bool], fix: str) -> Callable:
    def parse(v):
        x = _number(v, fix)
        if x is None:
            return x
        x = float(x)
        if not ok(x):
            raise _Bad(f"{v!r} is out of range; {fix}")
        return x
    return parse


def _size_parser(name: str) -> Callable:
    fix = f"use a multiple of {SIZE_MULTIPLE} from {MIN_SIZE} to {MAX_SIZE}"
    parse_int = _int_parser(-2 ** 62, 2 ** 62, fix)

    def parse(v):
        x = parse_int(v)
        if x is None:
            return x
        if not MIN_SIZE <= x <= MAX_SIZE:
            raise _Bad(f"{name} {x} is out of range; {fix} (e.g. {MIN_SIZE if x < MIN_SIZE else MAX_SIZE})")
        if x % SIZE_MULTIPLE:
            low = x - x % SIZE_MULTIPLE
            near = " or ".join(str(s) for s in (low, low + SIZE_MULTIPLE) if MIN_SIZE <= s <= MAX_SIZE)
            raise _Bad(f"{name} {x} is not a multiple of {SIZE_MULTIPLE}; use {near}")
        return x
    return parse


def _shown(v, limit: int = 80) -> str:
    """A value as a problem shows it: its repr, cut to `limit` characters (an embedded image's bytes
    would fill the terminal)."""
    text = repr(v)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _text_parser(fix: str, blank_is_empty: bool = False) -> Callable:
    def parse(v):
        if not isinstance(v, str):
            raise _Bad(f"{_shown(v)} ({type(v).__name__}) is not text; {fix}")
        return None if blank_is_empty and not v.strip() else v
    return parse


def _parse_prompt(v):
    if not isinstance(v, str):
        raise _Bad(f"{_shown(v)} ({type(v).__name__}) is not text; write the prompt as text")
    return v if v.strip() else None


def _parse_id(v):
    if isinstance(v, bool):
        raise _Bad(f"{v!r} is a boolean; write the id as text")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return None
        if not math.isfinite(v) or v != int(v):
            raise _Bad(f"{v!r} is not a usable id; write ids as text")
        return str(int(v))
    if not isinstance(v, str):
        raise _Bad(f"{_shown(v)} ({type(v).__name__}) is not text; write the id as text")
    return v if v.strip() else None


def _sampler_parser(resolve: Callable[[str], str]) -> Callable:
    def parse(v):
        if not isinstance(v, str):
            raise _Bad(f"{v!r} ({type(v).__name__}) is not a sampler name; write it as text")
        if not v.strip():
            return None
        try:
            return resolve(v)
        except ValueError as e:
            raise _Bad(str(e)) from None
    return parse


# ----------------------------------------------------------------------------- columns
# Columns are parsed one at a time. Where values repeat (steps, sampler, sizes, negative prompts,
# pass-through tags) each distinct value is parsed once and shared by its rows; high-cardinality
# columns (seed, prompt) take Arrow fast paths when their type allows.

def _distinct(arr) -> tuple[list, np.ndarray] | None:
    """(distinct values, per-row index into them with -1 for null), or None for unhashable types."""
    try:
        enc = pc.dictionary_encode(arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    index = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False)
    return enc.dictionary.to_pylist(), index


def _pylist(arr) -> list:
    """Python values of an Arrow column; repeated strings become one shared object."""
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_dictionary(arr.type):
        d = _distinct(arr)
        if d is not None and len(d[0]) * 2 < len(arr):
            values, index = d
            return list(map((values + [None]).__getitem__, index.tolist()))
    return arr.to_pylist()


def _parse_column(arr, parse: Callable, column: str, bad: dict[int, list], default=None,
                  distinct: bool = True) -> list:
    """Parse one column: a list with the parsed value per row, `default` for empty or bad cells;
    problems go to bad[row index]."""
    n = len(arr)
    if pa.types.is_null(arr.type):
        return [default] * n
    d = _distinct(arr) if distinct else None
    values, index = d if d is not None else (arr.to_pylist(), None)
    parsed, messages = [], {}
    for k, v in enumerate(values):
        x = None
        if v is not None:
            try:
                x = parse(v)
            except _Bad as e:
                messages[k] = str(e)
        parsed.append(default if x is None else x)
    if index is None:
        for k, message in messages.items():
            bad.setdefault(k, []).append(ManifestProblem(k + 1, column, message))
        return parsed
    if messages:
        for i in np.nonzero(np.isin(index, list(messages)))[0].tolist():
            bad.setdefault(i, []).append(ManifestProblem(i + 1, column, messages[int(index[i])]))
    parsed.append(default)                    # index -1: null
    return list(map(parsed.__getitem__, index.tolist()))


def _blank_as_null(arr):
    trimmed = pc.utf8_trim_whitespace(arr)
    return pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, trimmed.type), trimmed)


def _parse_seeds(arr, parse: Callable, bad: dict[int, list]) -> list:
    """Seeds are mostly distinct: integer columns and text columns of plain integers in range are
    checked by Arrow; anything else goes through the per-cell parser for its messages."""
    fast = None
    if pa.types.is_integer(arr.type):
        fast = arr
    elif pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        try:
            fast = pc.cast(_blank_as_null(arr), pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            fast = None
    if fast is not None:
        low, high = pc.min_max(fast).values()
        if low.as_py() is None or (low.as_py() >= 0 and high.as_py() < SEED_LIMIT):
            return fast.to_pylist()
    return _parse_column(arr, parse, "seed", bad, distinct=False)


def _parse_prompts(arr, bad: dict[int, list]) -> list:
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        values = arr.to_pylist()
        blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(arr), ""), True)
        empty_rows = np.nonzero(blank.to_numpy(zero_copy_only=False))[0].tolist()
        for i in empty_rows:
            values[i] = None
    else:
        already = set(bad)
        values = _parse_column(arr, _parse_prompt, "prompt", bad, distinct=False)
        failed = {i for i in bad if i not in already or any(p.column == "prompt" for p in bad[i])}
        empty_rows = [i for i, v in enumerate(values) if v is None and i not in failed]
    for i in empty_rows:
        bad.setdefault(i, []).append(ManifestProblem(i + 1, "prompt", "the prompt is empty; every row needs a prompt"))
    return values


def _resolve_ids(arr, n: int, bad: dict[int, list]) -> list:
    """Ids with defaults filled in (None where bad); checks safety and uniqueness ignoring case."""
    if arr is None:
        given = [None] * n
    elif pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        given = [v if v is None or v.strip() else None for v in arr.to_pylist()]
    else:
        given = _parse_column(arr, _parse_id, "id", bad, distinct=False)
    width = len(default_id(0, n))
    ids = [str(i).zfill(width) if v is None else v for i, v in enumerate(given)]
    safe = SAFE_ID_RE.fullmatch
    for i, row_id in enumerate(ids):
        if given[i] is not None and not safe(row_id):
            bad.setdefault(i, []).append(ManifestProblem(i + 1, "id", id_problem(row_id)))
            ids[i] = None
        elif i in bad and given[i] is None and arr is not None and any(p.column == "id" for p in bad[i]):
            ids[i] = None
    lowered = [None if v is None else v.lower() for v in ids]
    if len(set(lowered)) < n - lowered.count(None) + (None in lowered):
        first: dict[str, int] = {}
        for i, key in enumerate(lowered):
            if key is None:
                continue
            j = first.setdefault(key, i)
            if j == i:
                continue
            how = "the same id" if ids[j] == ids[i] else f"{ids[j]!r}, which differs only by case"
            if given[j] is None:
                how += ", given by default to a row without an id"
            this = f"id {ids[i]!r}" if given[i] is not None else f"this row has no id; its default id {ids[i]!r}"
            bad.setdefault(i, []).append(ManifestProblem(
                i + 1, "id", f"{this} is already used by data row {j + 1} ({how}); ids must be unique, "
                "ignoring case, because they name the output files: change one of them"))
    return ids


# ----------------------------------------------------------------------------- reading files

class _BadRows(Exception):
    """Rows of a CSV file that cannot be parsed: the problems, one per row."""

    def __init__(self, problems: list[ManifestProblem]):
        super().__init__(problems)
        self.problems = problems


def _check_closed_quote(path: Path, table: pa.Table) -> None:
    """_BadRows when the file ends inside a quoted field: the CSV reader takes an unclosed quote as
    running to the end of the file, so the rows after it would silently become part of one value.
    Such a field is the last row's last value, and the file then ends with '"' + that value (quotes
    doubled) where a closed one ends with a quote and at most a line break."""
    if not table.num_rows or not table.num_columns:
        return
    last = table.column(table.num_columns - 1)[table.num_rows - 1].as_py() or ""
    tail = ('"' + last.replace('"', '""')).encode()
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - len(tail) - 2))
        end = f.read()
    if not end.rstrip(b"\r\n").endswith(b'"') and end.endswith(tail):
        raise _BadRows([ManifestProblem(table.num_rows, table.column_names[-1],
                                        "opens a quote that is never closed, so the rest of the file was read as this "
                                        f"one value ({_shown(last, 60)}); close the quote, or write a quote inside a "
                                        "value as \"\"")])


def _read_csv(path: Path) -> pa.Table:
    """A CSV file with every cell as text (empty cells as ""). A row longer than the read block
    (pyarrow: "straddling object ... try to increase block size") is read by retrying with a block
    `_CSV_BLOCK_GROWTH` times larger, up to the file's size (at most CSV_MAX_BLOCK_SIZE). Raises
    _BadRows for malformed rows, _Bad for the rest."""
    import pyarrow.csv as pacsv

    with open(path, "rb") as f:
        head = f.read(4096)
    # a UTF-16 BOM, or text whose every other byte is NUL: UTF-16 (what Excel calls "Unicode text")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or head.count(0) > len(head) // 4:
        raise _Bad("is not UTF-8 text (it looks like UTF-16, Excel's \"Unicode text\"); save it as UTF-8 "
                   "(Excel: \"CSV UTF-8\")")
    parse = pacsv.ParseOptions(newlines_in_values=True)
    limit = min(path.stat().st_size + 1, CSV_MAX_BLOCK_SIZE)
    block = min(CSV_BLOCK_SIZE, limit)
    while True:
        read = pacsv.ReadOptions(block_size=block)
        try:
            names = pacsv.open_csv(path, read_options=read, parse_options=parse).schema.names
            convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                           strings_can_be_null=False, quoted_strings_can_be_null=False)
            table = pacsv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)
            _check_closed_quote(path, table)
            return table
        except pa.ArrowInvalid as e:
            if "straddling" in str(e):
                if block < limit:
                    block = min(block * _CSV_BLOCK_GROWTH, limit)
                    continue
                raise _Bad(f"data row {_rows_before_failure(path, read, parse) + 1} or one shortly after is "
                           f"longer than {block:,} bytes, the most the CSV reader takes in one piece; "
                           "shorten it or write the manifest as Parquet") from None
            if "CSV parse error" in str(e):
                problems = _malformed_rows(path, read)
                if problems:
                    raise _BadRows(problems) from None
            raise


def _rows_before_failure(path: Path, read, parse) -> int:
    """How many data rows a streaming read gets through before it fails."""
    import pyarrow.csv as pacsv

    n = 0
    try:
        for batch in pacsv.open_csv(path, read_options=read, parse_options=parse):
            n += batch.num_rows
    except pa.ArrowException:
        pass
    return n


def _malformed_rows(path: Path, read) -> list[ManifestProblem]:
    """Each row whose field count differs from the header's, with its data row number (a
    single-threaded read numbers the rows)."""
    import pyarrow.csv as pacsv

    problems: list[ManifestProblem] = []

    def handler(row) -> str:
        text = row.text if len(row.text) <= 80 else row.text[:77] + "..."
        where = row.number - 1 if row.number is not None else None
        problems.append(ManifestProblem(where, None, f"has {row.actual_columns} field(s) but the header has "
                                        f"{row.expected_columns} ({text!r}); quote a field that holds a comma, "
                                        'a quote or a line break ("a, b"; a quote inside as "")'))
        return "skip"

    try:
        pacsv.read_csv(path, read_options=pacsv.ReadOptions(block_size=read.block_size, use_threads=False),
                       parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=handler))
    except pa.ArrowException:
        pass
    return problems


def _read_table(path: Path) -> tuple[pa.Table, list[int] | None]:
    """The file as an Arrow table, and for .txt/.jsonl each row's line; CSV cells all as text (empty
    cells as ""). Raises _Bad (or _BadRows, FormatProblems)."""
    suffix = path.suffix.lower()
    if suffix not in CSV_SUFFIXES + PARQUET_SUFFIXES + TXT_SUFFIXES + JSONL_SUFFIXES:
        raise _Bad(f"unsupported file type {path.suffix or '(no extension)'!r}; "
                   "write the manifest as .csv, .parquet, .txt (a prompt a line, or A1111 --prompt lines) or .jsonl")
    if not path.exists():
        raise _Bad("file not found; check the path")
    if not path.is_file():
        raise _Bad("not a file; give the path of a .csv, .parquet, .txt or .jsonl manifest")
    try:
        if suffix in TXT_SUFFIXES:
            return read_txt(path)
        if suffix in JSONL_SUFFIXES:
            return read_jsonl(path)
        if suffix in CSV_SUFFIXES:
            return _read_csv(path), None
        return read_parquet(path), None
    except (pa.ArrowException, OSError, ValueError) as e:
        kind = {".csv": "CSV (UTF-8, comma-separated, one header line)", ".txt": "text", ".jsonl": "JSON lines",
                ".ndjson": "JSON lines"}.get(suffix, "Parquet")
        raise _Bad(f"cannot read the file as {kind}: {e}") from None


_NORMALIZED_COLUMNS = {normalized(c): c for c in COLUMNS}


def _column_problems(names: list[str]) -> list[ManifestProblem]:
    problems = []
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name == "":
            problems.append(ManifestProblem(None, None, f"column {i + 1} has no name; name it or remove it "
                                            "(pandas writes its index this way: use to_csv(index=False))"))
        elif name in seen:
            problems.append(ManifestProblem(None, name, "appears twice in the header; keep one"))
        elif name in RESULT_NAMES and name not in COLUMNS:
            problems.append(ManifestProblem(None, name, f"is the name of a column batchsd adds to the results, "
                                            f"so it would be replaced by the run's value; rename it to pass it "
                                            f"through (e.g. 'src_{name}')"))
        elif name not in COLUMNS and normalized(name) in _NORMALIZED_COLUMNS:
            known = _NORMALIZED_COLUMNS[normalized(name)]
            problems.append(ManifestProblem(None, name, f"looks like {known!r} but would be passed through "
                                            f"unused (names are exact and lower-case); rename it to {known!r}"))
        seen.add(name)
    if "prompt" not in seen:
        separator = next((sep for sep in (";", "\t", "|") if len(names) == 1 and sep in names[0]), None)
        hint = (f"; the header looks separated by {separator!r}, but a .csv manifest is comma-separated: save it "
                "with commas, or as Parquet") if separator else ""
        problems.append(ManifestProblem(None, "prompt", "the required column 'prompt' is missing; "
                                        f"add it (found columns: {', '.join(map(repr, names)) or 'none'}){hint}"))
    return problems


# ----------------------------------------------------------------------------- read_manifest

def read_manifest(path, options: ManifestOptions | None = None) -> Manifest:
    """Read and validate a manifest (with `options`' column renames and wildcards folder), and make
    the job's rows from it (expand.py). Never raises for bad content: problems are returned."""
    path = Path(path)
    options = options or ManifestOptions()
    try:
        table, lines = _read_table(path)
    except _Bad as e:
        return Manifest(path, [], [ManifestProblem(None, None, str(e))], [], [])
    except (_BadRows, FormatProblems) as e:
        return Manifest(path, [], e.problems, [], [])
    table, problems = apply_column_map(table, options.column_map, COLUMNS)
    names = list(table.column_names)
    extra_columns = [c for c in names if c not in COLUMNS]
    is_csv = path.suffix.lower() in CSV_SUFFIXES
    problems += _column_problems(names)
    warnings = lookalike_warnings(extra_columns, names, COLUMNS)
    n = table.num_rows
    if n == 0:
        problems.append(ManifestProblem(None, None, "the manifest has no rows; add one row per image"))
    if problems:
        return Manifest(path, [], problems, names, extra_columns, n, warnings=warnings)
    # pass-through columns keep their Arrow type (a CSV cell is text; an empty one is null)
    extra_values = pa.table({c: _empty_as_null(table.column(c)) if is_csv else table.column(c)
                             for c in extra_columns})
    extra_types = dict(zip(extra_values.column_names, extra_values.schema.types))

    # each Arrow column is dropped once parsed, so that the file and the Python rows are not both
    # held in full at the peak
    arrays = {name: table.column(name) for name in names}
    del table

    def column(name, parse, default=None):
        if name not in arrays:
            return [default] * n
        return _parse_column(arrays.pop(name), parse, name, bad, default)

    bad: dict[int, list[ManifestProblem]] = {}
    ids = _resolve_ids(arrays.pop("id", None), n, bad)
    prompt_column = arrays.pop("prompt")
    # a manifest with a prompt_template column is already expanded: its prompts are used as written
    templates = (PromptTemplates(options.wildcards)
                 if TEMPLATE_COLUMN not in names and may_hold_templates(prompt_column) else None)
    prompts = _parse_prompts(prompt_column, bad)
    del prompt_column
    negatives = column("negative_prompt", _text_parser("write the negative prompt as text"), "")
    seed_parser = _int_parser(0, SEED_LIMIT - 1, f"use an integer from 0 to 2**{SEED_LIMIT.bit_length() - 1}-1 "
                              "(or leave it empty for a seed derived from the id)")

    def parse_seed(v):
        try:
            seed_range = parse_seed_range(v)
        except ValueError as e:
            raise _Bad(str(e)) from None
        return seed_parser(v) if seed_range is None else seed_range

    seeds = _parse_seeds(arrays.pop("seed"), parse_seed, bad) if "seed" in arrays else [None] * n
    steps = column("steps", _int_parser(1, MAX_STEPS, f"use a whole number from 1 to {MAX_STEPS} "
                                        f"(e.g. {DEFAULT_STEPS})"), DEFAULT_STEPS)
    cfgs = column("cfg_scale", _float_parser(lambda x: 0 <= x <= MAX_CFG_SCALE,
                                             f"use a finite number >= 0 and <= {MAX_CFG_SCALE:g} "
                                             f"(e.g. {DEFAULT_CFG_SCALE})"), DEFAULT_CFG_SCALE)
    samplers = column("sampler", _sampler_parser(resolve_sampler), DEFAULT_SAMPLER)
    widths = column("width", _size_parser("width"))
    heights = column("height", _size_parser("height"))
    inits = column("init_image", _text_parser("write the init image's path as text (images embedded in the "
                                              "manifest are not read: save each to a file)", blank_is_empty=True))
    strengths = column("strength", _float_parser(lambda x: 0 < x <= 1,
                                                 "use a number with 0 < strength <= 1 (e.g. 0.75)"))
    counts = column(N_IMAGES, _int_parser(1, MAX_N_IMAGES, f"use a whole number from 1 to {MAX_N_IMAGES:,} "
                                          "(or leave it empty for 1)"))

    models = column("model", _text_parser("write the model's path or name as text", blank_is_empty=True))
    base = os.path.abspath(path.parent)
    row_models, models_facts, model_problems = resolve_row_models(models, Path(base), options.weights_dir,
                                                                 options.prediction_type)
    for i, why in model_problems.items():
        bad.setdefault(i, []).append(ManifestProblem(i + 1, "model", why))

    conditioning = parse_conditioning(column, _int_parser, _text_parser, _Bad, options.prompt_syntax)
    # each row's model's generation, where known now: its LoRAs are checked against it
    generations = [None if i in model_problems else models_facts[key].generation if key else options.model_generation
                   for i, key in enumerate(row_models)]
    if warning := plain_syntax_warning(conditioning, prompts, negatives):
        warnings.append(warning)
    if warning := negative_lora_tag_warning(conditioning, negatives):
        warnings.append(warning)
    if TEMPLATE_COLUMN not in names:   # templates are read in `prompt` only; the negative prompt is used as written
        templated = [i for i, n in enumerate(negatives) if isinstance(n, str) and has_syntax(n)]
        if templated:
            warnings.append(f"{len(templated)} row(s) have a negative_prompt that looks like a prompt template (e.g. "
                            f"data row {templated[0] + 1}: {{a|b}} or __wildcard__): templates are expanded in "
                            "prompt only, so it is used as written")

    # img2img: strength only with an init image; at least one denoising step
    init_paths: dict[int, str] = {}
    for i, (init, strength) in enumerate(zip(inits, strengths)):
        if init is None:
            if strength is not None:
                bad.setdefault(i, []).append(ManifestProblem(
                    i + 1, "strength", "strength is set but init_image is empty; strength only applies "
                    "to img2img: give an init_image or leave strength empty"))
            continue
        if "\0" in init or _URL_RE.match(init):
            why = ("holds a NUL character, which no file path can" if "\0" in init else
                   f"{init[:80]!r} is a URL: batchsd reads init images from files only; download it and give its path")
            bad.setdefault(i, []).append(ManifestProblem(i + 1, "init_image", why))
            continue
        init_paths[i] = os.path.abspath(os.path.join(base, os.path.expanduser(init)))
        if strength is None:
            strengths[i] = strength = DEFAULT_STRENGTH
        steps_ok = not any(p.column == "steps" for p in bad.get(i, ()))
        if steps_ok and img2img_steps(steps[i], strength) < 1:
            bad.setdefault(i, []).append(ManifestProblem(i + 1, "strength",
                                                         _no_denoise_steps_message(steps[i], strength)))

    # expansion (expand.py): its problems are found before the rows are made
    expanding = needs_expansion(counts, seeds, templates)
    if expanding:
        n_per_row = image_counts(counts, seeds, bad)
        compiled = compile_templates(prompts, templates, bad)
        expanding = bool(compiled) or any(n != 1 for n in n_per_row)

    for c in extra_columns:
        del arrays[c]
    extras = [_pylist(extra_values.column(c)) for c in extra_columns]
    rows: list[JobRow] = []
    default_size = options.default_size or DEFAULT_SIZE
    for i, values in enumerate(zip(ids, prompts, negatives, seeds, steps, cfgs, samplers, widths, heights,
                                   strengths, *extras)):
        if i in bad:
            continue
        row_id, prompt, negative, seed, n_steps, cfg, sampler, width, height, strength = values[:10]
        init = init_paths.get(i)
        if init is None:
            size = (models_facts[row_models[i]].default_size or DEFAULT_SIZE) if row_models[i] else default_size
            width, height = width or size, height or size
        if isinstance(seed, SeedRange):
            seed = seed.first
        rows.append(JobRow(i, row_id, prompt, negative, seed_from_id(row_id) if seed is None else seed,
                           n_steps, cfg, sampler, width, height, init, strength,
                           dict(zip(extra_columns, values[10:])), inits[i], conditioning=conditioning[i],
                           model=row_models[i]))
    if expanding:
        rows, more = expand_rows(rows, n_per_row, [s is not None for s in seeds], compiled, templates)
        for i, found in more.items():
            bad.setdefault(i, []).extend(found)
    # the final prompts (templates expanded): A1111 syntax batchsd refuses, each row's LoRA set (the
    # column's entries, then the prompt's <lora:> tags), textual-inversion names; a data row with a
    # problem is left out
    rows, found_in_prompts = _prompt_conditioning(rows, options.lora_dir, generations)
    rows, named = resolve_embeddings(rows, options.embeddings_dir, lambda r: generations[r.data_row - 1])
    for i, found in [*found_in_prompts.items(), *named.items()]:
        bad.setdefault(i, []).extend(ManifestProblem(i + 1, name, why) for name, why in found)
    rows = [r for r in rows if r.data_row - 1 not in named and r.data_row - 1 not in found_in_prompts]
    if expanding:
        extra_values = expanded_extras(extra_values, rows, with_template=bool(compiled))
        if compiled:
            extra_columns = [TEMPLATE_COLUMN, *extra_columns]
            extra_types = {TEMPLATE_COLUMN: pa.string(), **extra_types}
    order = {c: k for k, c in enumerate(COLUMNS)}
    for i in sorted(bad):
        found = sorted(bad[i], key=lambda p: order[p.column])
        problems.extend(found if lines is None else [replace(p, line=lines[i]) for p in found])
    return Manifest(path, rows, problems, names, extra_columns, n, extra_types, extra_values, warnings=warnings)


def _prompt_conditioning(rows: list[JobRow], lora_dir, generations: list) -> tuple[list[JobRow], dict]:
    """Each row with its own conditioning, its LoRA set resolved from the loras column and its final
    prompt's tags (conditioning_columns.resolve_loras), and {data row index: [(column, message)]}
    (each message once per data row) for refused A1111 syntax and LoRAs that do not resolve."""
    conditioning = [dict(r.conditioning) for r in rows]
    prompts, negatives = [r.prompt for r in rows], [r.negative_prompt for r in rows]
    found: dict[int, list[tuple[str, str]]] = {}
    for per_row in (syntax_problems(conditioning, prompts, negatives),
                    resolve_loras(conditioning, prompts, lora_dir, [generations[r.data_row - 1] for r in rows])):
        for k, messages in per_row.items():
            seen = found.setdefault(rows[k].data_row - 1, [])
            seen.extend(m for m in messages if m not in seen)
    return [replace(r, conditioning=c) for r, c in zip(rows, conditioning)], found


def _empty_as_null(arr):
    """A CSV text column with its empty cells as nulls."""
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, arr.type), arr)


_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")   # http://, https://, s3://, file://... (not C:\\ paths)


def _no_denoise_steps_message(steps: int, strength: float) -> str:
    """The problem of a row whose steps * strength < 1, with fixes that work: the strength rounded up
    (4 significant digits) so that int(steps * strength) >= 1, and a step count only within 1..MAX_STEPS."""
    scale = 10.0 ** (3 - math.floor(math.log10(1 / steps)))
    need = math.ceil(scale / steps) / scale
    while img2img_steps(steps, need) < 1:
        need += 1 / scale
    fix = f"raise strength to at least {need:.4g}"
    if strength > 0 and 1 / strength <= MAX_STEPS:     # else no step count in range gives a step
        n = max(steps + 1, math.ceil(1 / strength))
        while n <= MAX_STEPS and img2img_steps(n, strength) < 1:
            n += 1
        if n <= MAX_STEPS:
            fix += f" or steps to at least {n}"
    return f"steps={steps} with strength={strength!r} runs int({steps} * strength) = 0 denoising steps; {fix}"
