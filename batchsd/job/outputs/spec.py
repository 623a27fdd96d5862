"""What a run is asked to write (OutputSpec): the output format, the image format and quality, the
dataset-shard size and caption sidecars; checked before anything runs. Light: no PIL, no numpy
(the CLI and RunOptions import it).

    --format files|webdataset|parquet|imagefolder      (default files: today's loose images)
    --image-format png|jpg|webp                          (default png)
    --quality Q                                          jpg/webp only; default 95 for jpg, 90 for webp
    --shard-size N                                       webdataset/parquet rows per dataset shard (10,000)
    --captions                                           files: images/<id>.txt beside each image
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from batchsd.errors import InputError

FORMATS = ("files", "webdataset", "parquet", "imagefolder")
SHARD_FORMATS = ("webdataset", "parquet")      # rows grouped into dataset shards written once complete
IMAGE_FORMATS = ("png", "jpg", "webp")
IMAGE_SUFFIXES = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
DEFAULT_QUALITY = {"jpg": 95, "webp": 90}     # img2dataset's jpg default; webp lossy at 90
DEFAULT_SHARD_SIZE = 10_000                   # img2dataset's number_sample_per_shard
# columns a format adds beside the result row's (hf_parquet.py, webdataset.py): a pass-through column
# of the same name would be overwritten or written twice
FORMAT_COLUMNS = {"parquet": ("image", "text"), "webdataset": ("key",)}


@dataclass(frozen=True)
class OutputSpec:
    format: str = "files"
    image_format: str = "png"
    quality: int | None = None        # None: DEFAULT_QUALITY for jpg/webp; png ignores it (refused if given)
    shard_size: int = DEFAULT_SHARD_SIZE
    captions: bool = False

    def __post_init__(self):
        check_spec(self)

    @property
    def sharded(self) -> bool:
        """Whether rows are written in dataset shards (kept in staging until their shard is complete)."""
        return self.format in SHARD_FORMATS

    @property
    def suffix(self) -> str:
        return IMAGE_SUFFIXES[self.image_format]

    @property
    def effective_quality(self) -> int | None:
        if self.image_format == "png":
            return None
        return self.quality if self.quality is not None else DEFAULT_QUALITY[self.image_format]

    def to_json(self) -> dict:
        """What output.json records, with the quality resolved: two runs of one --out must agree on it."""
        d = asdict(self)
        d["quality"] = self.effective_quality
        return d


def check_spec(spec: OutputSpec) -> None:
    """InputError naming the option and the fix for a combination that cannot be written."""
    if spec.format not in FORMATS:
        raise InputError(f"--format {spec.format!r}: use one of {', '.join(FORMATS)}")
    if spec.image_format not in IMAGE_FORMATS:
        raise InputError(f"--image-format {spec.image_format!r}: use one of {', '.join(IMAGE_FORMATS)}")
    if spec.quality is not None:
        if spec.image_format == "png":
            raise InputError("--quality applies to --image-format jpg or webp; PNG is lossless: drop --quality")
        if not 1 <= spec.quality <= 100:
            raise InputError(f"--quality {spec.quality}: use a whole number from 1 to 100")
    if spec.shard_size < 1:
        raise InputError(f"--shard-size {spec.shard_size}: use a whole number >= 1")
    if spec.shard_size != DEFAULT_SHARD_SIZE and not spec.sharded:
        raise InputError(f"--shard-size is for --format {' or '.join(SHARD_FORMATS)}; --format {spec.format} "
                         "writes one file per image: drop --shard-size")
    if spec.captions and spec.format != "files":
        raise InputError(f"--captions adds images/<id>.txt to --format files; --format {spec.format} already "
                         "carries each prompt (webdataset: <key>.txt; parquet: `text`; imagefolder: metadata.jsonl "
                         "`text`): drop --captions")


def check_pass_through(spec: OutputSpec, names) -> None:
    """InputError when a pass-through column takes the name of a column `spec`'s format adds."""
    taken = [name for name in names if name in FORMAT_COLUMNS.get(spec.format, ())]
    if taken:
        raise InputError(f"the manifest's column {taken[0]!r} has the name of a column --format {spec.format} "
                         f"writes itself ({', '.join(FORMAT_COLUMNS[spec.format])}); rename it in the manifest "
                         f"(e.g. to 'src_{taken[0]}') or choose another --format")


def check_verify(output_format: str) -> None:
    """InputError for --verify with a format whose images are not one file per row."""
    if output_format in SHARD_FORMATS:
        raise InputError(f"--verify hashes each row's image file; --format {output_format} keeps the images inside "
                         "dataset shards, each written whole with a done marker: drop --verify")
