"""The reader: a manifest file -> the job's rows, validated, with img2img sizes resolved.

Everything here happens before any model loads. A manifest with problems is refused whole
(ManifestInvalid, exit 2); an init image that cannot be used fails only its row (`row_errors`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from batchsd.errors import InputError
from batchsd.job.init_images import resolve_image_sizes
from batchsd.job.layout import RunLayout
from batchsd.job.manifest import read_manifest
from batchsd.job.options import ManifestInvalid, RunOptions, UsageError
from batchsd.job.outputs.spec import check_pass_through, check_verify
from batchsd.job.rows import JobRow, Manifest, ManifestOptions
from batchsd.job.shards import ShardSpec

DEFAULT_OUT_ROOT = Path("outputs")


def default_out_dir(manifest: Path) -> Path:
    return DEFAULT_OUT_ROOT / Path(manifest).stem


def read_rows(manifest_path: Path, limit: int | None, shard: ShardSpec | None = None,
              options: ManifestOptions | None = None) -> tuple[Manifest, list[JobRow], dict[str, str]]:
    """(the manifest read with `options`, its first `limit` rows (after expansion; of `shard` only, if
    given) with img2img sizes resolved, {id: why the row cannot be made}). Rows whose init image is
    unusable stay in the list, with their reason. Sizes are resolved for the rows returned only (one
    header read per row made)."""
    manifest = read_manifest(manifest_path, options)
    if manifest.problems:
        raise ManifestInvalid(manifest)
    rows = manifest.rows[:limit] if limit is not None else list(manifest.rows)
    if shard is not None:
        rows = [r for r in rows if shard.owns(r.id)]
    resolved, failures = resolve_image_sizes(rows)
    by_index = {r.index: r for r in resolved}
    rows = [by_index.get(r.index, r) for r in rows]
    row_errors = {r.id: str(failures[r.index]) for r in rows if r.index in failures}
    return manifest, rows, row_errors


@dataclass
class Job:
    manifest: Manifest
    rows: list[JobRow]                       # this run's rows (after --limit, this shard's), sizes resolved
    row_errors: dict[str, str]               # id -> why the row cannot be made (unreadable init image)
    out_dir: Path
    layout: RunLayout                        # the files this run owns (a shard's, or the whole run's)
    job_ids: list[str] = field(default_factory=list)   # every shard's rows after --limit, in manifest order

    @property
    def beyond_limit(self) -> int:
        """Manifest rows that --limit leaves out of the job (0 without a limit)."""
        return len(self.manifest.rows) - len(self.job_ids)

    @property
    def shard(self) -> ShardSpec | None:
        return self.layout.shard if self.layout.sharded else None

    def whole_job_rows(self) -> list[JobRow]:
        """Every shard's rows after --limit, in manifest order, sizes resolved: this run's as they are,
        the other shards' resolved now (one init image header read per img2img row), as they read them."""
        if self.shard is None:
            return list(self.rows)
        mine = {r.id: r for r in self.rows}
        rows = self.manifest.rows[:len(self.job_ids)]
        resolved, _ = resolve_image_sizes([r for r in rows if r.id not in mine])
        by_index = {r.index: r for r in resolved}
        return [mine.get(r.id) or by_index.get(r.index, r) for r in rows]

    def journal_ids(self) -> list[str]:
        """The manifest ids this run's results file covers, in manifest order."""
        shard = self.shard
        return [r.id for r in self.manifest.rows if shard is None or shard.owns(r.id)]


def warning_lines(manifest: Manifest) -> list[str]:
    """The manifest's warnings (columns that look like unused parameters), one line each."""
    return [f"warning: {manifest.path}: {w}" for w in manifest.warnings]


def read_job(opts: RunOptions) -> Job:
    """The job `opts` asks for; UsageError/ManifestInvalid (exit 2) before anything runs."""
    if opts.batch_size is not None and opts.batch_size < 1:
        raise UsageError(f"--batch-size {opts.batch_size}: use a whole number >= 1")
    if opts.limit is not None and opts.limit < 0:
        raise UsageError(f"--limit {opts.limit}: use a whole number >= 0")
    shard = opts.shard if opts.shard is not None and not opts.shard.is_whole else None
    manifest, rows, row_errors = read_rows(opts.manifest, opts.limit, shard, opts.manifest_options)
    try:
        check_pass_through(opts.output, manifest.extra_types)
        if opts.verify:
            check_verify(opts.output.format)
    except InputError as e:
        raise UsageError(str(e)) from None
    job_ids = [r.id for r in manifest.rows[: opts.limit]]   # every shard's rows (a None limit slices all)
    out_dir = Path(opts.out_dir) if opts.out_dir is not None else default_out_dir(Path(opts.manifest))
    return Job(manifest, rows, row_errors, out_dir, RunLayout(out_dir, shard), job_ids)
