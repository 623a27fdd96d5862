"""Every name under --out, in one place: the folders and files a run owns and reads.

    images/<id>.<png|jpg|webp>          --format files: the images (shared by every run and shard of the
                                        folder); images/<id>.txt, the prompt, with --captions
    webdataset/<stem>.tar, <stem>.parquet, <stem>_stats.json, sizes.json      --format webdataset
    data/train-<k>-of-<K>.parquet       --format parquet (Hugging Face layout)
    train/<id>.<ext>, train/metadata.jsonl                                    --format imagefolder
    latents/<id>.npy                    with --save-latents
    results.parquet                     the whole job's results (compacted journal, or merged shards)
    summary.json                        written last by a run that finished every row: the done marker
    results/part-<I>-of-<N>.parquet     a shard's results
    .batchsd/parts/part-<seq>.parquet   the journal of the whole-manifest run
    .batchsd/lock, .batchsd/run.json    its lock and run metadata
    .batchsd/output.json                its output format and dataset-shard plan (outputs/claim.py)
    .batchsd/staging/<id>.<ext>         shard formats: finished images whose dataset shard is not written yet
    .batchsd/shard-<I>-of-<N>/          a shard's journal (parts/), lock, run.json and summary.json

Nothing else in the package spells these names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from batchsd.errors import InputError
from batchsd.job.shards import ShardSpec

JOURNAL_DIR = ".batchsd"
PARTS_DIR = "parts"
LOCK_FILE = "lock"
META_FILE = "run.json"
RESULTS_FILE = "results.parquet"
SUMMARY_FILE = "summary.json"
RESULTS_PARTS_DIR = "results"
IMAGES_DIR = "images"
LATENTS_DIR = "latents"
IMAGE_SUFFIX = ".png"
LATENTS_SUFFIX = ".npy"
CAPTION_SUFFIX = ".txt"
OUTPUT_FILE = "output.json"
STAGING_DIR = "staging"
WEBDATASET_DIR = "webdataset"
WEBDATASET_SIZES_FILE = "sizes.json"
WEBDATASET_TAR_SUFFIX = ".tar"
WEBDATASET_STATS_SUFFIX = "_stats.json"     # a webdataset shard's done marker
HF_PARQUET_DIR = "data"
HF_SPLIT = "train"
IMAGEFOLDER_DIR = "train"
IMAGEFOLDER_METADATA_FILE = "metadata.jsonl"
MIN_DATASET_SHARD_WIDTH = 5
SHARD_DIR_RE = re.compile(r"^shard-(\d+)-of-(\d+)$")


@dataclass(frozen=True)
class RunLayout:
    """The files one run (the whole manifest, or one shard of it) owns under --out.

    whole manifest                          shard 3 of 16
    .batchsd/parts/ (journal)               .batchsd/shard-00003-of-00016/parts/
    .batchsd/lock, .batchsd/run.json        .batchsd/shard-00003-of-00016/lock, .../run.json
    results.parquet                         results/part-00003-of-00016.parquet
    summary.json                            .batchsd/shard-00003-of-00016/summary.json
    images/<id>.png, latents/<id>.npy       the same folders; ids are disjoint across shards
    """
    out_dir: Path
    shard: ShardSpec | None = None

    @property
    def sharded(self) -> bool:
        return self.shard is not None and not self.shard.is_whole

    @property
    def journal_dir(self) -> Path:
        base = self.out_dir / JOURNAL_DIR
        return base / f"shard-{self.shard.label}" if self.sharded else base

    @property
    def parts_dir(self) -> Path:
        return self.journal_dir / PARTS_DIR

    @property
    def results_path(self) -> Path:
        if self.sharded:
            return self.out_dir / RESULTS_PARTS_DIR / f"part-{self.shard.label}.parquet"
        return self.out_dir / RESULTS_FILE

    @property
    def summary_path(self) -> Path:
        return self.journal_dir / SUMMARY_FILE if self.sharded else job_summary_path(self.out_dir)

    @property
    def lock_path(self) -> Path:
        return self.journal_dir / LOCK_FILE

    @property
    def meta_path(self) -> Path:
        return self.journal_dir / META_FILE

    @property
    def images_dir(self) -> Path:
        return self.out_dir / IMAGES_DIR

    def output_dir(self, output_format: str) -> Path:
        """Where a run's images go for an --format (outputs/spec.FORMATS)."""
        return {"webdataset": self.webdataset_dir, "parquet": self.hf_parquet_dir,
                "imagefolder": self.out_dir / IMAGEFOLDER_DIR}.get(output_format, self.images_dir)

    @property
    def latents_dir(self) -> Path:
        return self.out_dir / LATENTS_DIR

    @property
    def output_meta_path(self) -> Path:
        return self.journal_dir / OUTPUT_FILE

    @property
    def staging_dir(self) -> Path:
        return self.journal_dir / STAGING_DIR

    @property
    def webdataset_dir(self) -> Path:
        return self.out_dir / WEBDATASET_DIR

    @property
    def hf_parquet_dir(self) -> Path:
        return self.out_dir / HF_PARQUET_DIR

    @property
    def imagefolder_dir(self) -> Path:
        """train/ for the whole-manifest run; train/<shard label>/ for a shard (its own metadata.jsonl)."""
        base = self.out_dir / IMAGEFOLDER_DIR
        return base / self.shard.label if self.sharded else base

    def webdataset_stem(self, k: int, count: int) -> str:
        """Dataset shard k (of `count`) of this run: `00007` (img2dataset's names), or for process
        shard 3 of 16 `00003-of-00016-00007`, so no two processes ever write one file."""
        stem = f"{k:0{dataset_shard_width(count)}d}"
        return f"{self.shard.label}-{stem}" if self.sharded else stem

    def hf_parquet_name(self, k: int, count: int) -> str:
        """`train-00007-of-00012.parquet`, or for process shard 3 of 16
        `train-00003-of-00016-00007-of-00012.parquet` (Hugging Face reads the split from `train-`)."""
        w = dataset_shard_width(count)
        tail = f"{k:0{w}d}-of-{count:0{w}d}"
        return f"{HF_SPLIT}-{self.shard.label}-{tail}.parquet" if self.sharded else f"{HF_SPLIT}-{tail}.parquet"

    def dataset_shard_marker(self, output_format: str, k: int, count: int) -> Path:
        """The file whose presence says dataset shard k of `count` is written: webdataset's
        <stem>_stats.json (written last), or the parquet shard itself (renamed into place whole)."""
        if output_format == "webdataset":
            return self.webdataset_dir / f"{self.webdataset_stem(k, count)}{WEBDATASET_STATS_SUFFIX}"
        if output_format == "parquet":
            return self.hf_parquet_dir / self.hf_parquet_name(k, count)
        raise ValueError(f"--format {output_format} has no dataset shards")

    def resume_parts_dirs(self) -> list[Path] | None:
        """The journals that can hold records of this run's rows: for a shard, the unsharded run's
        and its own (other shards' journals hold only their own rows: one count per folder), so a
        shard's start reads 2 journals, not N; None (every journal) for the whole-manifest run."""
        if not self.sharded:
            return None
        return [RunLayout(self.out_dir).parts_dir, self.parts_dir]


def dataset_shard_width(count: int) -> int:
    return max(MIN_DATASET_SHARD_WIDTH, len(str(max(0, count - 1))))


def shard_dirs(out_dir: Path) -> dict[tuple[int, int], Path]:
    """{(index, count): journal folder} of every shard that has run in `out_dir`."""
    base = Path(out_dir) / JOURNAL_DIR
    found = {}
    if base.is_dir():
        for p in base.iterdir():
            m = SHARD_DIR_RE.match(p.name)
            if m and p.is_dir():
                found[(int(m.group(1)), int(m.group(2)))] = p
    return found


def journal_parts_dirs(out_dir: Path) -> list[Path]:
    """Every journal in `out_dir`: the whole-manifest one first, then the shards' in name order."""
    dirs = [RunLayout(Path(out_dir)).parts_dir] + [d / PARTS_DIR for _, d in sorted(shard_dirs(out_dir).items())]
    return [d for d in dirs if d.is_dir()]


def check_shard_count(out_dir: Path, shard: ShardSpec) -> None:
    """One --out holds shards of one count: refuse a count other than the one already there."""
    counts = {count for _, count in shard_dirs(out_dir)} - {shard.count}
    if counts:
        other = sorted(counts)[0]
        raise InputError(f"{out_dir} already holds the shards of a {other}-way run ({JOURNAL_DIR}/shard-*-of-{other}); "
                         f"this is shard {shard.index}/{shard.count}. Use {other} shards again (the same "
                         f"--array/--nproc-per-node/completions), finish the rest without sharding (`batchsd run` "
                         "with no shard makes every row still missing and writes results.parquet), or use another --out")


def job_results_path(out_dir: Path) -> Path:
    """The whole job's results table (an unsharded run's own, or the shards' merge)."""
    return Path(out_dir) / RESULTS_FILE


def job_summary_path(out_dir: Path) -> Path:
    """The whole job's done marker."""
    return Path(out_dir) / SUMMARY_FILE


def check_plain_folders(layout: RunLayout) -> None:
    """Output paths never leave --out: refuse a folder under it that is a link (or not a folder),
    whatever it points to. InputError naming the folder and the fix."""
    for folder in (layout.images_dir, layout.latents_dir, layout.out_dir / JOURNAL_DIR,
                   layout.out_dir / RESULTS_PARTS_DIR, layout.webdataset_dir, layout.hf_parquet_dir,
                   layout.out_dir / IMAGEFOLDER_DIR):
        if folder.is_symlink():
            raise InputError(f"{folder} is a link ({folder} -> {folder.readlink()}); batchsd writes only inside "
                             f"--out {layout.out_dir}: replace the link with a plain folder, or use another --out")
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{folder} is a file, not a folder: move it away, or use another --out")


def safe_output_path(out_dir: Path, folder: str, row_id: str, suffix: str) -> Path:
    """<out>/<folder>/<id><suffix>, to be written by renaming a regular file onto it.

    The id must be a plain file name, and <folder> a plain folder (not a link) inside --out; a link
    at the path itself is not followed (the rename replaces the link, never its target). A folder at
    the path fails the row. InputError with the reason and the fix."""
    if not row_id or row_id in (".", "..") or any(c in row_id for c in "/\\\x00"):
        raise InputError(f"id {row_id!r} would write outside {Path(out_dir) / folder}: ids must be plain file names "
                         f"(letters, digits, '-', '_', '.')")
    base = Path(out_dir) / folder
    if base.is_symlink() or not base.is_dir():
        raise InputError(f"{base} is not a plain folder inside --out (a link, or missing); batchsd writes only "
                         "inside --out: replace it with a plain folder")
    path = base / f"{row_id}{suffix}"
    if path.is_dir() and not path.is_symlink():
        raise InputError(f"{path} is a folder, so the row's file cannot be written there: remove or rename it")
    return path
