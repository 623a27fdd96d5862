"""The journal: durable part files of finished records, compaction into the results table, and
the resume state read back from it. (Every file name it uses comes from layout.py.)

The journal is the source of truth. A row counts as done when its image is in place and a part
file holding its record has been renamed into place (images are renamed before the part that
names them, and every file is fsynced before its rename). Appending a part costs O(batch), never
O(rows written so far). A shard of a sharded run has its own journal (layout.RunLayout); resume
state (`read_prior`) is read from every journal in the folder, so rows made by any run count,
whichever mode made them.

Compaction reads every part, keeps the latest record per id (highest part number wins), writes it
as one new part (`part-<next seq>`), deletes the older parts, and writes the results table from it
(only the ids of the current manifest, in manifest order). It runs:
  - during a run, whenever the rows journaled since the last compaction reach
    max(COMPACT_MIN_ROWS, rows at the last compaction): the interval doubles, so total
    compaction work stays linear in the number of rows (amortized O(1) per row). A resumed run
    takes the rows at the last compaction from the journal it reopens (`compacted_rows`: the
    footer of its oldest part), so it does not fold all earlier rows after its first
    COMPACT_MIN_ROWS new ones;
  - at the end of a run and on a clean interrupt (SIGINT/SIGTERM).
So the results table is always a whole, valid file; after a SIGKILL it may lag behind the
journal by the rows since its last compaction, and the next run (which reads the parts, not
the table) catches it up. Every record in it names an image that exists (or an error): an ok
record whose files are gone (deleted by hand since it was made; the run remakes that row) is left
out of the table until the row is made again, as `batchsd status` counts it missing.

The results table shows the manifest as it is now: its pass-through columns come from the current
manifest (`extras`, by id), not from the records, which keep the values they were made with (a
changed pass-through column does not remake a row: params_hash ignores it).

A file named like a part that is not one of ours (a readable Parquet file without the `id` and
`status` text columns) is never read as a record: read_prior and compaction skip it, and the
Journal renames it out of the part-file pattern (`<name>.not-batchsd`) when it opens, listing it in
`quarantined` for the run to warn about. A part that cannot be read (damaged on disk) is left in
place, skipped, and listed in `unreadable` for the run to warn about: its rows are made again.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from batchsd.job.atomic import atomic_write_table, fsync_dir, remove_stale_temps
from batchsd.job.layout import RunLayout, journal_parts_dirs
from batchsd.job.present import existing_files
from batchsd.job.schema import RESUME_COLUMNS, conform, overlay_extras, records_to_table

COMPACT_MIN_ROWS = 256
QUARANTINE_SUFFIX = ".not-batchsd"

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
    torch_version: str | None = None  # the numerics it was made with (resume.Numerics); None: not recorded
    device_type: str | None = None
    dtype: str | None = None
    exact: bool | None = None
    prediction_type: str | None = None   # None: not recorded (a row from before it was)
    image_sha256: str | None = None      # of the image file's bytes (what --verify compares)


@dataclass(frozen=True)
class Quarantined:
    """A file in the parts folder that is not a batchsd part, renamed out of the way."""
    path: Path                 # its name as found
    moved_to: Path | None      # its new name; None when it could not be renamed (it is skipped anyway)
    reason: str

    def __str__(self) -> str:
        where = (f"renamed it to {self.moved_to.name}" if self.moved_to is not None
                 else "could not rename it, so it is skipped")
        return (f"{self.path} is not a batchsd journal part ({self.reason}); it was not read and batchsd "
                f"{where}: move it out of {self.path.parent} if it is yours")


def foreign_part_reason(schema: pa.Schema) -> str | None:
    """Why a readable Parquet file is not one of our parts (no text `id` and `status` columns), or None."""
    missing = [c for c in ("id", "status") if c not in schema.names]
    if missing:
        return f"no {' or '.join(map(repr, missing))} column"
    for c in ("id", "status"):
        typ = schema.field(c).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            return f"its {c!r} column is {typ}, not text"
    return None


class Journal:
    """Append-only part files under <out>/.batchsd/parts plus compaction into results.parquet.
    Not thread-safe: one writer (the writer thread, then the main thread after it is joined).

    A shard's journal lives elsewhere (layout.RunLayout): `parts_dir` and `results_path` name
    its own folder and results part; it then cleans only its own temp files.

    `extras` (Manifest.extras: `id` plus the pass-through columns) gives the results table its
    pass-through values and types; without it they come from the records. `quarantined` lists the
    files of the parts folder that were not ours (module docstring), for the caller to warn about."""

    def __init__(self, out_dir: Path, schema: pa.Schema, manifest_ids: Sequence[str], *,
                 parts_dir: Path | None = None, results_path: Path | None = None,
                 extras: pa.Table | None = None):
        self.out_dir = Path(out_dir)
        self.parts_dir = Path(parts_dir) if parts_dir is not None else RunLayout(self.out_dir).parts_dir
        self.results_path = Path(results_path) if results_path is not None else RunLayout(self.out_dir).results_path
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.parts_dir)
        if results_path is None:
            remove_stale_temps(self.out_dir)
        else:
            remove_stale_temps(self.results_path.parent, f".{self.results_path.name}.*.tmp")
        self.schema = schema
        self.manifest_ids = list(manifest_ids)
        self.extras = extras
        self.quarantined: list[Quarantined] = []
        self.unreadable: list[tuple[Path, str]] = []        # parts that cannot be read: (path, why), for a warning
        self._quarantine_foreign_parts()
        parts = self.part_files()
        self.next_seq = _next_free_seq(self.parts_dir)
        self.rows_since_compaction = 0                      # rows appended since the last compaction
        self.rows_at_compaction = compacted_rows(parts)      # rows folded by the last one (this run's or an earlier's)

    def part_files(self) -> dict[int, Path]:
        return part_files(self.parts_dir)

    def _quarantine_foreign_parts(self) -> None:
        """Rename the readable part-named files that are not ours; list those that cannot be read
        whole (decoded, as read_prior and compaction read them: a damaged column is found too)."""
        for path in self.part_files().values():
            try:
                reason = foreign_part_reason(pq.read_table(path).schema)
            except Exception as e:  # noqa: BLE001 - unreadable: left alone (see _latest_table), reported
                self.unreadable.append((path, f"{type(e).__name__}: {e}"))
                continue
            if reason is not None:
                self._quarantine(path, reason)

    def _quarantine(self, path: Path, reason: str) -> None:
        target = path.with_name(path.name + QUARANTINE_SUFFIX)
        k = 1
        while target.exists():
            target = path.with_name(f"{path.name}{QUARANTINE_SUFFIX}.{k}")
            k += 1
        try:
            os.rename(path, target)
            fsync_dir(self.parts_dir)
        except OSError:
            target = None
        self.quarantined.append(Quarantined(path, target, reason))

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
        table, self.schema, read = _latest(self.parts_dir, self.schema, self._quarantine)
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
        # results.parquet: one row per processed manifest row, in manifest order, with the
        # manifest's current pass-through values
        order = {rid: i for i, rid in enumerate(self.manifest_ids)}
        ids = table.column("id").to_pylist()
        gone = self._ok_rows_without_files(table)
        keep = sorted((order[r], i) for i, r in enumerate(ids) if r in order and i not in gone)
        results = table.take(pa.array([i for _, i in keep], type=pa.int64()))
        if self.extras is not None:
            results = overlay_extras(results, self.extras)
        atomic_write_table(self.results_path, results)
        self.rows_at_compaction = table.num_rows
        self.rows_since_compaction = 0
        return results.num_rows

    def _ok_rows_without_files(self, table: pa.Table) -> set[int]:
        """Indices of the ok records in `table` whose image or latents file is not in place."""
        status = table.column("status").to_pylist()
        named = {c: table.column(c).to_pylist() for c in ("image_path", "latents_path")}
        ok = [i for i, s in enumerate(status) if s == "ok"]
        present = existing_files(self.out_dir, [p for c in named.values() for i in ok if (p := c[i])])
        return {i for i in ok if any(c[i] and c[i] not in present for c in named.values())}


def part_files(parts_dir: Path) -> dict[int, Path]:
    """{sequence number: path} of the regular files named like parts. Anything else with such a
    name (a folder, a link, a FIFO that would block a read) is ignored: parts are only ever
    regular files renamed into place."""
    found = {}
    try:
        entries = list(os.scandir(parts_dir))
    except OSError:
        return found
    for entry in entries:
        m = _PART_RE.match(entry.name)
        try:
            if m and entry.is_file(follow_symlinks=False):
                found[int(m.group(1))] = Path(entry.path)
        except OSError:
            continue
    return found


def _next_free_seq(parts_dir: Path) -> int:
    """One more than the highest part number in any name of the folder (non-regular files too, so
    that a new part never lands on one)."""
    try:
        names = os.listdir(parts_dir)
    except OSError:
        return 0
    seqs = [int(m.group(1)) for m in map(_PART_RE.match, names) if m]
    return max(seqs) + 1 if seqs else 0


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


def _latest(parts_dir: Path, schema: pa.Schema, quarantine=None) -> tuple[pa.Table, pa.Schema, list[Path]]:
    """(latest record per id over the readable parts of one journal, the widened schema, the parts read).
    A file that is not ours is skipped, and passed to `quarantine(path, reason)` if given."""
    tables, read = [], []
    for seq, path in sorted(part_files(parts_dir).items()):
        try:
            table = pq.read_table(path)
        except Exception:  # noqa: BLE001
            continue
        reason = foreign_part_reason(table.schema)
        if reason is not None:
            if quarantine is not None:
                quarantine(path, reason)
            continue
        tables.append(table)
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


def read_prior(out_dir: Path, parts_dirs: Sequence[Path] | None = None) -> dict[str, PriorRecord]:
    """Latest journaled record per id (resume state), over every journal in `out_dir` (the
    whole-manifest one and every shard's) unless `parts_dirs` is given. Within a journal the last
    part wins; across journals the record finished last. Reads only; an unreadable part, or a
    file that is not ours, is skipped (its rows are then simply made again)."""
    latest: dict[str, PriorRecord] = {}
    dirs = journal_parts_dirs(out_dir) if parts_dirs is None else [Path(d) for d in parts_dirs]
    for parts_dir in dirs:
        mine: dict[str, PriorRecord] = {}
        for seq, path in sorted(part_files(parts_dir).items()):
            try:
                # every column decoded, not only the resume columns: a part whose other columns are
                # damaged must be skipped here too (its rows made again), as compaction and the
                # merge skip it, never counted done with a record nothing else can read
                t = pq.read_table(path)
            except Exception:  # noqa: BLE001
                continue
            if foreign_part_reason(t.schema) is not None:
                continue                # not ours (the Journal that owns the folder renames it)
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


