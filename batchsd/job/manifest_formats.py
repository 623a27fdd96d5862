"""Manifests as people have them, besides CSV and Parquet (manifest.py reads those): `.txt` and
`.jsonl`, each read into an Arrow table with the manifest's column names, then validated as any
manifest is. Blank lines are not rows; a row's problems name its line (ManifestProblem.line).

`.txt`, two kinds, told apart by the file's lines (UTF-8; surrounding whitespace ignored):
- **A1111 "Prompts from file or textbox"**: when any non-blank line starts with `--`, every
  non-blank line is a line of options, read with shlex as A1111 reads them:
  `--prompt "a cat" --negative_prompt "blurry" --steps 20 --cfg_scale 7 --seed 5
  --sampler_name "Euler a" --width 512 --height 768 --n_iter 2 --batch_size 2`.
  As in A1111, the words after `--prompt` / `--negative_prompt` up to the next `--` option are
  joined with spaces. `--sampler_name` goes to `sampler` (A1111 names are accepted there);
  `--n_iter N --batch_size B` make N*B images (`n_images`) with seeds seed, seed+1, ..., as A1111
  makes them; `--seed -1` (A1111's "random") means the default seed, derived from the row's id.
  Stricter than A1111 where it would silently misread: an option whose next word is another
  option (`--negative_prompt --steps 20`, where A1111 takes "--steps 20" as the negative prompt)
  and an option given twice are problems naming the line.
  A1111's other options (`--sd_model`, `--styles`, `--subseed`, `--restore_faces`, ...) and
  unknown ones are problems naming the line; so is a line that does not start with `--` in such
  a file (write it as `--prompt "..."`).
- **One prompt a line**: otherwise, each non-blank line is a row's prompt.

`.jsonl`: one JSON object a line, its keys the columns (missing keys are empty cells). A column
whose values are all of one JSON kind keeps it (numbers, text, lists, objects); one with mixed kinds
is read as text (a number as its digits, a list or object as JSON), so `"seed": 5` and
`"seed": "100-199"` may share a column. So is a column holding an empty object `{}` (Parquet has
no struct without fields). Lines are split at line feeds only: U+2028 and the like are characters
of a value, as JSON has them. A key given twice in one object, and NaN or Infinity (not JSON, though
Python's reader takes them), are problems naming the line.

`.parquet`: read with pyarrow; a column name given twice is a problem, and Arrow's view types
(string_view, binary_view, list_view), which the results' Parquet writer cannot take rows from, are
read as their plain types (the same values).
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchsd.job.rows import ManifestProblem

TXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")

# A1111 option -> manifest column
A1111_OPTIONS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "seed", "steps": "steps",
                 "cfg_scale": "cfg_scale", "sampler_name": "sampler", "width": "width", "height": "height"}
A1111_COUNT_OPTIONS = ("n_iter", "batch_size")      # their product is `n_images`
_A1111_TEXT_OPTIONS = ("prompt", "negative_prompt")  # the words up to the next option are joined
# options of A1111's script that batchsd has no setting for
A1111_UNSUPPORTED = ("sd_model", "outpath_samples", "outpath_grids", "prompt_for_display", "styles",
                     "subseed_strength", "subseed", "seed_resize_from_h", "seed_resize_from_w", "sampler_index",
                     "restore_faces", "tiling", "do_not_save_samples", "do_not_save_grid")
_A1111_ALL_OPTIONS = {*A1111_OPTIONS, *A1111_COUNT_OPTIONS, *A1111_UNSUPPORTED}


class FormatProblems(Exception):
    """A .txt or .jsonl file that cannot be read as a table: its problems, by line."""

    def __init__(self, problems: list[ManifestProblem]):
        super().__init__(problems)
        self.problems = problems


def _lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of each non-blank line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise FormatProblems([ManifestProblem(None, None, f"is not UTF-8 text ({e.reason} at byte {e.start}); "
                                              "save it as UTF-8")]) from None
    # "\n" only: str.splitlines also splits at U+2028, U+0085, form feeds ..., which are a value's characters
    return [(n, line.strip()) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def read_txt(path: Path) -> tuple[pa.Table, list[int]]:
    """A .txt manifest as a table of text columns, and each row's line number."""
    lines = _lines(path)
    option_lines = [n for n, line in lines if line.startswith("--")]
    if not option_lines:
        return pa.table({"prompt": pa.array([line for _, line in lines], pa.string())}), [n for n, _ in lines]
    problems: list[ManifestProblem] = []
    rows: list[dict[str, str]] = []
    for n, line in lines:
        try:
            rows.append(_a1111_options(line, first_option_line=option_lines[0]))
        except ValueError as e:
            problems.append(ManifestProblem(None, None, str(e), line=n))
    if problems:
        raise FormatProblems(problems)
    given = [c for c in [*A1111_OPTIONS.values(), "n_images"] if c != "prompt" and any(c in r for r in rows)]
    columns = ["prompt", *given]
    return (pa.table({c: pa.array([r.get(c) for r in rows], pa.string()) for c in columns}),
            [n for n, _ in lines])


def _a1111_options(line: str, first_option_line: int) -> dict[str, str]:
    """One line of A1111 options -> {column: text}. ValueError with the reason and fix."""
    if not line.startswith("--"):
        raise ValueError(f"does not start with '--', but line {first_option_line} does: in an A1111 prompts file "
                         "every line is options; write this one as --prompt \"...\"")
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise ValueError(f"cannot be split into options ({e}); close the quotes (\"...\") or escape the quote "
                         "inside with \\\"") from None
    row: dict[str, str] = {}
    counts = {}
    given: set[str] = set()
    pos = 0
    while pos < len(words):
        word = words[pos]
        option = word[2:]
        if not word.startswith("--") or not option:
            raise ValueError(f"{word!r} is not an option; options are --name value (quote values with spaces)")
        if option in A1111_UNSUPPORTED:
            raise ValueError(f"--{option} is an A1111 option batchsd has no setting for; remove it "
                             f"(batchsd reads --{', --'.join([*A1111_OPTIONS, *A1111_COUNT_OPTIONS])})")
        if option not in A1111_OPTIONS and option not in A1111_COUNT_OPTIONS:
            raise ValueError(f"unknown option --{option}; batchsd reads "
                             f"--{', --'.join([*A1111_OPTIONS, *A1111_COUNT_OPTIONS])}")
        if pos + 1 >= len(words):
            raise ValueError(f"--{option} has no value; give one (--{option} VALUE)")
        pos += 1
        value = words[pos]
        if value[2:] in _A1111_ALL_OPTIONS and value.startswith("--"):   # A1111 would take it as the value
            raise ValueError(f"--{option} has no value (the next word is the option {value}); give one, or quote a "
                             f"value that starts with -- (--{option} \"{value} ...\")")
        pos += 1
        if option in _A1111_TEXT_OPTIONS:
            while pos < len(words) and not words[pos].startswith("--"):
                value += " " + words[pos]
                pos += 1
        column = A1111_OPTIONS.get(option, option)
        if option in given:
            raise ValueError(f"--{option} is given twice; keep one")
        given.add(option)
        if option in A1111_COUNT_OPTIONS:
            try:
                counts[option] = int(value)
            except ValueError:
                raise ValueError(f"--{option} {value!r} is not a whole number; write e.g. --{option} 2") from None
            if counts[option] < 1:
                raise ValueError(f"--{option} {value} is below 1; use a whole number >= 1")
            continue
        if option == "seed" and value.strip() == "-1":
            continue                     # A1111's "random seed": batchsd's default seed, from the id
        row[column] = value
    if "prompt" not in row:
        raise ValueError("has no --prompt; every line needs one (--prompt \"...\")")
    if counts:
        row["n_images"] = str(counts.get("n_iter", 1) * counts.get("batch_size", 1))
    return row


def read_jsonl(path: Path) -> tuple[pa.Table, list[int]]:
    """A .jsonl manifest as a table (column order: first seen), and each row's line number."""
    problems: list[ManifestProblem] = []
    records: list[dict] = []
    numbers: list[int] = []
    for n, line in _lines(path):
        try:
            record = json.loads(line, object_pairs_hook=_object_without_repeats, parse_constant=_not_json)
        except ValueError as e:
            problems.append(ManifestProblem(None, None, f"is not valid JSON ({e}); write one JSON object a line",
                                            line=n))
            continue
        if not isinstance(record, dict):
            problems.append(ManifestProblem(None, None, f"is a JSON {type(record).__name__}, not an object; write "
                                            'one object a line ({"prompt": "...", ...})', line=n))
            continue
        records.append(record)
        numbers.append(n)
    if problems:
        raise FormatProblems(problems)
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    return pa.table({name: _json_column([r.get(name) for r in records]) for name in names}), numbers


def _object_without_repeats(pairs: list[tuple]) -> dict:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"key {repeated[0]!r} is given twice in one object; keep one")
    return dict(pairs)


def _not_json(word: str):
    raise ValueError(f"{word} is not a JSON value; leave the key out (or write null) for the default")


def _json_column(values: list) -> pa.Array:
    """One kind of JSON value: Arrow's own type for it; mixed kinds (or numbers beyond int64), or an
    empty object anywhere in it (Parquet cannot store a struct without fields): text."""
    kinds = {type(v) for v in values if v is not None}
    if kinds and not kinds <= {int, float} and len(kinds) > 1:
        return pa.array([_as_text(v) for v in values], pa.string())
    try:
        arr = pa.array(values)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        return pa.array([_as_text(v) for v in values], pa.string())
    return pa.array([_as_text(v) for v in values], pa.string()) if _has_empty_struct(arr.type) else arr


def _has_empty_struct(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        return t.num_fields == 0 or any(_has_empty_struct(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _has_empty_struct(t.value_type)
    return False


def _as_text(v):
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False, sort_keys=True)
    return json.dumps(v)   # numbers as written in JSON; true/false stay JSON's words


def read_parquet(path: Path) -> pa.Table:
    """A Parquet manifest as a table: names given twice refused (FormatProblems), view types read
    as their plain types."""
    names = pq.read_schema(path).names
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise FormatProblems([ManifestProblem(None, name, "appears twice in the file's columns; keep one")
                              for name in twice])
    table = pq.read_table(path)
    for i, field in enumerate(table.schema):
        plain = _plain_type(field.type)
        if plain != field.type:   # rebuilt from Python values: Arrow 26 casts list_view to invalid lists
            table = table.set_column(i, field.with_type(plain),
                                     pa.chunked_array([pa.array(table.column(i).to_pylist(), plain)], plain))
    return table


_PLAIN = {pa.string_view(): pa.string(), pa.binary_view(): pa.binary()}


def _plain_type(t: pa.DataType) -> pa.DataType:
    """`t` with every view type (string_view, binary_view, list_view) replaced by its plain type."""
    if t in _PLAIN:
        return _PLAIN[t]
    if pa.types.is_list_view(t) or pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_plain_type(t.value_type)))
    if pa.types.is_large_list_view(t) or pa.types.is_large_list(t):
        return pa.large_list(t.value_field.with_type(_plain_type(t.value_type)))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(_plain_type(t.value_type)), t.list_size)
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_plain_type(t.field(i).type)) for i in range(t.num_fields)])
    if pa.types.is_map(t):
        return pa.map_(t.key_field.with_type(_plain_type(t.key_type)),
                       t.item_field.with_type(_plain_type(t.item_type)), t.keys_sorted)
    return t
