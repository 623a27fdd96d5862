"""results.parquet: the explicit schema, the durable journal of part files, compaction, resume state.

Layout under --out:

    images/<id>.png                  the image (written first, atomically)
    latents/<id>.npy                 with --save-latents
    .batchsd/parts/part-<seq>.parquet  the journal: one file per finished batch (atomic, fsynced)
    results.parquet                  compacted view: latest record of every processed manifest row
    summary.json                     written last, only when a run finished every row: the done marker

A shard of a sharded run (sharding.py) owns .batchsd/shard-<I>-of-<N>/ (its journal, lock,
run.json and summary.json) and results/part-<I>-of-<N>.parquet instead; images/ is shared
(ids are disjoint). Resume state (`read_prior`) is read from every journal in the folder, so rows
made by any run count, whichever mode made them.

The journal is the source of truth. A row counts as done when its image is in place and a part
file holding its record has been renamed into place (images are renamed before the part that
names them, and every file is fsynced before its rename). Appending a part costs O(batch), never
O(rows written so far).

Compaction reads every part, keeps the latest record per id (highest part number wins), writes it
as one new part (`part-<next seq>`), deletes the older parts, and writes `results.parquet` from it
(only the ids of the current manifest, in manifest order). It runs:
  - during a run, whenever the rows journaled since the last compaction reach
    max(COMPACT_MIN_ROWS, rows at the last compaction): the interval doubles, so total
    compaction work stays linear in the number of rows (amortized O(1) per row). A resumed run
    takes the rows at the last compaction from the journal it reopens (`compacted_rows`: the
    footer of its oldest part), so it does not fold all earlier rows after its first
    COMPACT_MIN_ROWS new ones;
  - at the end of a run and on a clean interrupt (SIGINT/SIGTERM).
So `results.parquet` is always a whole, valid file; after a SIGKILL it may lag behind the
journal by the rows since its last compaction, and the next run (which reads the parts, not
results.parquet) catches it up. Every record in it names an image that exists (or an error).

Schema: the manifest's own columns (typed explicitly below), the pass-through ("extra") columns
with one type per column inferred over the whole manifest (bool, int64, float64, else string),
then the result columns. Parts written by an older run with other extra-column types are cast to
the current types; a column that cannot be cast becomes string.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

JOURNAL_DIR = ".batchsd"
PARTS_DIR = ".batchsd/parts"
RESULTS_FILE = "results.parquet"
SUMMARY_FILE = "summary.json"
COMPACT_MIN_ROWS = 256

# The manifest columns every row has after defaults are resolved (JobRow.to_record()).
MANIFEST_FIELDS: list[pa.Field] = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt", pa.string()),
    pa.field("negative_prompt", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("steps", pa.int64()),
    pa.field("cfg_scale", pa.float64()),
    pa.field("sampler", pa.string()),
    pa.field("width", pa.int64()),
    pa.field("height", pa.int64()),
    pa.field("init_image", pa.string()),
    pa.field("strength", pa.float64()),
]
MANIFEST_NAMES = [f.name for f in MANIFEST_FIELDS]

# What the run adds.
RESULT_FIELDS: list[pa.Field] = [
    pa.field("status", pa.string(), nullable=False),       # "ok" | "error"
    pa.field("error", pa.string()),
    pa.field("image_path", pa.string()),                   # relative to --out
    pa.field("image_sha256", pa.string()),
    pa.field("latents_path", pa.string()),                 # relative to --out, with --save-latents
    pa.field("model", pa.string()),
    pa.field("model_sha256", pa.string()),
    pa.field("elapsed_s", pa.float64()),
    pa.field("finished_at", pa.timestamp("us", tz="UTC")),
    pa.field("params_hash", pa.string()),
    pa.field("prompt_truncated", pa.bool_()),             # prompt or negative prompt cut at 77 tokens
]
RESULT_NAMES = [f.name for f in RESULT_FIELDS]
RESUME_COLUMNS = ["id", "status", "image_path", "latents_path", "model", "model_sha256", "params_hash", "finished_at"]


# ----------------------------------------------------------------------------- schema

def infer_extra_type(values: Iterable[Any]) -> pa.DataType:
    """One arrow type for a pass-through column, from all its values (None ignored)."""
    kinds = set()
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool):
            kinds.add("bool")
        elif isinstance(v, int):
            kinds.add("int")
        elif isinstance(v, float):
            kinds.add("float")
        else:
            kinds.add("str")
    if not kinds or kinds == {"str"} or "str" in kinds:
        return pa.string()
    if kinds == {"bool"}:
        return pa.bool_()
    if kinds == {"int"}:
        return pa.int64()
    if kinds <= {"int", "float"}:
        return pa.float64()
    return pa.string()  # bools mixed with numbers


def to_extra_value(v: Any, typ: pa.DataType) -> Any:
    if v is None:
        return None
    if pa.types.is_string(typ) and not isinstance(v, str):
        if isinstance(v, (dict, list)):
            return json.dumps(v, sort_keys=True)
        return str(v)
    if pa.types.is_floating(typ):
        return float(v)
    return v


def results_schema(extra_types: dict[str, pa.DataType]) -> pa.Schema:
    extras = [pa.field(name, typ) for name, typ in extra_types.items() if name not in MANIFEST_NAMES + RESULT_NAMES]
    return pa.schema(MANIFEST_FIELDS + extras + RESULT_FIELDS)


def extra_types_for(records: Sequence[dict], extra_columns: Sequence[str]) -> dict[str, pa.DataType]:
    return {c: infer_extra_type(r.get(c) for r in records) for c in extra_columns}


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


# ----------------------------------------------------------------------------- atomic files

def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_current_umask()   # what open() would give; mkstemp makes 0600 files


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path, sync_dir: bool = True) -> Iterator[str]:
    """Yield a temp file name in `path`'s folder to write; then fsync it and os.replace it onto
    `path`, so `path` is never seen half-written. On an exception the temp file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, sync_dir: bool = True) -> None:
    with atomic_path(path, sync_dir) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_table(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def remove_stale_temps(folder: Path, pattern: str = ".*.tmp", min_age_s: float = 0.0) -> int:
    """Delete temp files a killed run left behind (`.<name>.<random>.tmp`). Where other processes
    write into the same folder (shards sharing images/), pass min_age_s so that their temp files,
    alive for a moment, are left alone."""
    if not folder.is_dir():
        return 0
    n = 0
    cutoff = time.time() - min_age_s
    for p in folder.glob(pattern):
        try:
            if min_age_s and p.stat().st_mtime > cutoff:
                continue
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


# ----------------------------------------------------------------------------- records -> tables

def records_to_table(records: Sequence[dict], schema: pa.Schema) -> pa.Table:
    columns = {}
    for field in schema:
        vals = [r.get(field.name) for r in records]
        if field.name not in MANIFEST_NAMES and field.name not in RESULT_NAMES:
            vals = [to_extra_value(v, field.type) for v in vals]
        columns[field.name] = pa.array(vals, type=field.type)
    return pa.Table.from_pydict(columns, schema=schema)


def conform(table: pa.Table, schema: pa.Schema) -> tuple[pa.Table, pa.Schema]:
    """Cast `table` to `schema` (missing columns null, unknown columns dropped). A column that
    cannot be cast turns the schema's column into string. Returns (table, possibly widened schema)."""
    cols = []
    fields = list(schema)
    for i, field in enumerate(fields):
        if field.name not in table.column_names:
            cols.append(pa.nulls(table.num_rows, type=field.type))
            continue
        col = table.column(field.name)
        if col.type != field.type:
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                fields[i] = pa.field(field.name, pa.string(), nullable=True)
                col = col.cast(pa.string())
        cols.append(col)
    schema = pa.schema(fields)
    return pa.Table.from_arrays(cols, schema=schema), schema


# ----------------------------------------------------------------------------- journal

_PART_RE = re.compile(r"^part-(\d+)\.parquet$")


@dataclass
class PriorRecord:
    """What resume needs to know about a row's latest journaled result."""
    status: str
    image_path: str | None
    latents_path: str | None
    model: str | None
    model_sha256: str | None
    params_hash: str | None
    finished_at: datetime | None = None
    parts_dir: str | None = None     # the journal it came from (a run's own, or another shard's)


class Journal:
    """Append-only part files under <out>/.batchsd/parts plus compaction into results.parquet.
    Not thread-safe: one writer (the writer thread, then the main thread after it is joined).

    A shard's journal lives elsewhere (sharding.RunLayout): `parts_dir` and `results_path` name
    its own folder and results part; it then cleans only its own temp files."""

    def __init__(self, out_dir: Path, schema: pa.Schema, manifest_ids: Sequence[str], *,
                 parts_dir: Path | None = None, results_path: Path | None = None):
        self.out_dir = Path(out_dir)
        self.parts_dir = Path(parts_dir) if parts_dir is not None else self.out_dir / PARTS_DIR
        self.results_path = Path(results_path) if results_path is not None else self.out_dir / RESULTS_FILE
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.parts_dir)
        if results_path is None:
            remove_stale_temps(self.out_dir)
        else:
            remove_stale_temps(self.results_path.parent, f".{self.results_path.name}.*.tmp")
        self.schema = schema
        self.manifest_ids = list(manifest_ids)
        parts = self.part_files()
        self.next_seq = (max(parts) + 1) if parts else 0
        self.rows_since_compaction = 0                      # rows appended since the last compaction
        self.rows_at_compaction = compacted_rows(parts)      # rows folded by the last one (this run's or an earlier's)

    def part_files(self) -> dict[int, Path]:
        return part_files(self.parts_dir)

    def append(self, records: Sequence[dict]) -> Path | None:
        """Make `records` durable as one new part file. O(len(records))."""
        if not records:
            return None
        path = self.parts_dir / f"part-{self.next_seq:08d}.parquet"
        atomic_write_table(path, records_to_table(records, self.schema))
        self.next_seq += 1
        self.rows_since_compaction += len(records)
        return path

    def should_compact(self) -> bool:
        return self.rows_since_compaction >= max(COMPACT_MIN_ROWS, self.rows_at_compaction)

    def append_table(self, table: pa.Table) -> Path | None:
        """Make already-finished records (another journal's, see `latest_records`) durable here."""
        if table.num_rows == 0:
            return None
        table, self.schema = conform(table, self.schema)
        path = self.parts_dir / f"part-{self.next_seq:08d}.parquet"
        atomic_write_table(path, table)
        self.next_seq += 1
        self.rows_since_compaction += table.num_rows
        return path

    def read_prior(self) -> dict[str, PriorRecord]:
        return read_prior(self.out_dir)

    def _latest_table(self) -> tuple[pa.Table, list[Path]]:
        """(latest record per id over the readable parts, the parts read). An unreadable part is
        left alone: it is neither folded in nor deleted."""
        table, self.schema, read = _latest(self.parts_dir, self.schema)
        return table, read

    def compact(self) -> int:
        """Fold the journal into one part and rewrite results.parquet. Returns rows in results."""
        table, old_parts = self._latest_table()
        if old_parts and len(old_parts) > 1:
            base = self.parts_dir / f"part-{self.next_seq:08d}.parquet"
            atomic_write_table(base, table)
            self.next_seq += 1
            for p in old_parts:
                try:
                    p.unlink()
                except OSError:
                    pass
            fsync_dir(self.parts_dir)
        # results.parquet: one row per processed manifest row, in manifest order
        order = {rid: i for i, rid in enumerate(self.manifest_ids)}
        ids = table.column("id").to_pylist()
        keep = sorted((order[r], i) for i, r in enumerate(ids) if r in order)
        results = table.take(pa.array([i for _, i in keep], type=pa.int64()))
        atomic_write_table(self.results_path, results)
        self.rows_at_compaction = table.num_rows
        self.rows_since_compaction = 0
        return results.num_rows


def part_files(parts_dir: Path) -> dict[int, Path]:
    found = {}
    if parts_dir.is_dir():
        for p in parts_dir.iterdir():
            m = _PART_RE.match(p.name)
            if m:
                found[int(m.group(1))] = p
    return found


def compacted_rows(parts: dict[int, Path]) -> int:
    """Rows in a journal at its last compaction: the footer row count of its oldest readable part
    (a compaction leaves one part holding every row, older than any appended since); one footer
    read, no data. A journal never compacted, or whose last compaction was killed before it deleted
    the parts it folded, gives its oldest part's rows, fewer than it holds (its next compaction then
    comes sooner, as without this); no part gives 0."""
    for seq in sorted(parts):
        try:
            return pq.read_metadata(parts[seq]).num_rows
        except Exception:  # noqa: BLE001 - an unreadable part is left alone (see Journal._latest_table)
            continue
    return 0


def _latest(parts_dir: Path, schema: pa.Schema) -> tuple[pa.Table, pa.Schema, list[Path]]:
    """(latest record per id over the readable parts of one journal, the widened schema, the parts read)."""
    tables, read = [], []
    for seq, path in sorted(part_files(parts_dir).items()):
        try:
            tables.append(pq.read_table(path))
        except Exception:  # noqa: BLE001
            continue
        read.append(path)
    if not tables:
        return records_to_table([], schema), schema, read
    conformed = []
    for t in tables:  # widen until every table fits the same schema
        c, schema = conform(t, schema)
        conformed.append(c)
    conformed = [conform(c, schema)[0] for c in conformed]
    table = pa.concat_tables(conformed)
    # keep the last occurrence of every id (parts in seq order, rows in order within a part)
    ids = table.column("id").to_pylist()
    last = {}
    for i, rid in enumerate(ids):
        last[rid] = i
    keep = sorted(last.values())
    return table.take(pa.array(keep, type=pa.int64())), schema, read


def latest_records(parts_dir: Path, schema: pa.Schema, ids: Iterable[str]) -> pa.Table:
    """The latest records of `ids` in one journal (read only), conformed to `schema`."""
    table, _, _ = _latest(Path(parts_dir), schema)
    wanted = set(ids)
    keep = [i for i, rid in enumerate(table.column("id").to_pylist()) if rid in wanted]
    return table.take(pa.array(keep, type=pa.int64()))


def all_parts_dirs(out_dir: Path) -> list[Path]:
    """Every journal under `out_dir`: the whole-manifest run's, then each shard's (sharding.RunLayout)."""
    from batchsd.scale.sharding import journal_parts_dirs

    return journal_parts_dirs(Path(out_dir))


def read_prior(out_dir: Path, parts_dirs: Sequence[Path] | None = None) -> dict[str, PriorRecord]:
    """Latest journaled record per id (resume state), over every journal in `out_dir` (the
    whole-manifest one and every shard's) unless `parts_dirs` is given. Within a journal the last
    part wins; across journals the record finished last. Reads only; an unreadable part is skipped
    (its rows are then simply made again)."""
    latest: dict[str, PriorRecord] = {}
    dirs = all_parts_dirs(out_dir) if parts_dirs is None else [Path(d) for d in parts_dirs]
    for parts_dir in dirs:
        mine: dict[str, PriorRecord] = {}
        for seq, path in sorted(part_files(parts_dir).items()):
            try:
                names = pq.read_schema(path).names
                t = pq.read_table(path, columns=[c for c in RESUME_COLUMNS if c in names])
            except Exception:  # noqa: BLE001
                continue
            cols = {c: t.column(c).to_pylist() if c in t.column_names else [None] * t.num_rows
                    for c in RESUME_COLUMNS}
            for i, rid in enumerate(cols["id"]):
                mine[rid] = PriorRecord(**{c: cols[c][i] for c in RESUME_COLUMNS if c != "id"},
                                        parts_dir=str(parts_dir))
        if not latest:
            latest = mine
            continue
        for rid, rec in mine.items():
            old = latest.get(rid)
            if old is None or _later(rec, old):
                latest[rid] = rec
    return latest


def _later(a: PriorRecord, b: PriorRecord) -> bool:
    """Whether record `a` (from a journal read after b's) replaces `b`: it finished later, or at
    the same time (a copy of the same record), or b's time is unknown."""
    if a.finished_at is None or b.finished_at is None:
        return b.finished_at is None
    return a.finished_at >= b.finished_at


def read_results(out_dir: Path) -> pa.Table:
    return pq.read_table(Path(out_dir) / RESULTS_FILE)


def write_summary(out_dir: Path, summary: dict, path: Path | None = None) -> None:
    """<out>/summary.json, or `path` (a shard's own summary)."""
    path = Path(path) if path is not None else Path(out_dir) / SUMMARY_FILE
    atomic_write_bytes(path, (json.dumps(summary, indent=2, default=str) + "\n").encode())


def clear_summary(out_dir: Path, path: Path | None = None) -> None:
    try:
        (Path(path) if path is not None else Path(out_dir) / SUMMARY_FILE).unlink()
    except FileNotFoundError:
        pass
