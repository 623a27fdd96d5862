"""Planner: give img2img rows their size from the init image's header, then group rows into batches.

    rows, failures = resolve_image_sizes(manifest.rows)  # failures: {row.index: reason}, recorded per row
    for batch in plan_batches(rows, batch_size): ...      # each batch is one Pipeline.generate call

A missing, unreadable, corrupt or too large init image is not a manifest error: that row fails with
its reason and the run goes on. Images are only opened for their header here (PIL reads the size
lazily); `load_init_image` decodes one for the runner under the same guards.
"""
from __future__ import annotations

import dataclasses
import hashlib
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

from batchsd.errors import InputError
from batchsd.job.manifest import MAX_SIZE, MIN_SIZE
from batchsd.job.rows import JobRow

# Largest init image decoded: PIL's own default decompression-bomb limit (about 9459x9459), applied
# here whatever Image.MAX_IMAGE_PIXELS is set to. A 2048x2048 RGB image is 12 MiB; this is 256 MiB.
MAX_INIT_IMAGE_PIXELS = 89_478_485


@dataclass(frozen=True)
class Batch:
    key: tuple              # (width, height, steps, sampler, img2img denoising steps or None) = Pipeline.batch_key
    rows: list[JobRow]      # in file order; len(rows) <= batch_size

    @property
    def is_img2img(self) -> bool:
        return self.key[4] is not None


def batch_key(row: JobRow) -> tuple:
    """Rows with equal keys can share UNet forwards; prompts, seeds and cfg_scale may differ."""
    if row.width is None or row.height is None:
        raise ValueError(f"row {row.id!r} has no size yet: call resolve_image_sizes(rows) before planning")
    return (row.width, row.height, row.steps, row.sampler, row.denoise_steps)


# ----------------------------------------------------------------------------- init images

def _open_guarded(path: str) -> Image.Image:
    """Open lazily (header only); raise InputError with the reason for anything unusable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except FileNotFoundError:
        raise InputError(f"init image not found: {path}; check the init_image path "
                         "(relative paths are relative to the manifest's folder)") from None
    except IsADirectoryError:
        raise InputError(f"init image is a folder, not an image file: {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"init image {path} is too large to decode safely (more than "
                         f"{MAX_INIT_IMAGE_PIXELS:,} pixels); resize it first") from None
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InputError(f"init image {path} cannot be read as an image ({e}); "
                         "use a PNG, JPEG or WebP file") from None
    width, height = image.size
    if width * height > MAX_INIT_IMAGE_PIXELS:
        image.close()
        raise InputError(f"init image {path} is too large to decode safely: {width}x{height} = "
                         f"{width * height:,} pixels, more than {MAX_INIT_IMAGE_PIXELS:,}; resize it first")
    return image


_TRANSPOSED = {5, 6, 7, 8}   # EXIF orientations that swap width and height


def init_image_size(path: str) -> tuple[int, int]:
    """(width, height) upright (EXIF orientation applied), from the header; InputError when unusable."""
    image = _open_guarded(path)
    try:
        width, height = image.size
        try:
            orientation = image.getexif().get(0x0112)
        except Exception:       # a broken EXIF block: load_init_image ignores it the same way
            orientation = None
        return (height, width) if orientation in _TRANSPOSED else (width, height)
    finally:
        image.close()


def load_init_image(path: str) -> Image.Image:
    """Decode an init image to upright RGB (EXIF orientation applied, as diffusers' load_image; fully
    loaded, file closed); InputError with the reason when unusable, including a file whose header
    reads but whose data is truncated or corrupt."""
    image = _open_guarded(path)
    try:
        with image:
            image.load()
            try:
                upright = ImageOps.exif_transpose(image)
            except Exception:   # a broken EXIF block: keep the pixels as stored
                upright = image
            return upright.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"init image {path} is corrupt or truncated ({e}); re-save or replace it") from None


def resolve_image_sizes(rows: list[JobRow]) -> tuple[list[JobRow], dict[int, str]]:
    """Check every img2img row's init image header and fill in a missing width/height from it.

    A missing dimension becomes the image's, rounded down to a multiple of 8; it must then be in
    64..2048. Returns (runnable rows in the given order, {row.index: reason} for rows that fail).
    Each distinct path is opened once.
    """
    sizes: dict[str, tuple[int, int] | str] = {}
    resolved: list[JobRow] = []
    failures: dict[int, str] = {}
    for row in rows:
        if row.init_image is None:
            resolved.append(row)
            continue
        size = sizes.get(row.init_image)
        if size is None:
            try:
                size = init_image_size(row.init_image)
            except InputError as e:
                size = str(e)
            sizes[row.init_image] = size
        if isinstance(size, str):
            failures[row.index] = size
            continue
        if row.width is not None and row.height is not None:
            resolved.append(row)
            continue
        w0, h0 = size
        width = row.width if row.width is not None else w0 // 8 * 8
        height = row.height if row.height is not None else h0 // 8 * 8
        if not (MIN_SIZE <= width <= MAX_SIZE and MIN_SIZE <= height <= MAX_SIZE):
            failures[row.index] = (
                f"init image {row.init_image} is {w0}x{h0}, which gives {width}x{height} rounded down to "
                f"multiples of 8, outside {MIN_SIZE}..{MAX_SIZE}; set width and height in the manifest "
                "(the image is resized to them)")
            continue
        resolved.append(dataclasses.replace(row, width=width, height=height))
    return resolved, failures


# ----------------------------------------------------------------------------- batches and shards

def plan_batches(rows: list[JobRow], batch_size: int) -> list[Batch]:
    """Group rows by batch_key (whatever their order in the file) and split groups into batch_size chunks.

    Order: groups by first appearance, chunks of a group in file order, then the next group.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[tuple, list[JobRow]] = {}
    for row in rows:
        groups.setdefault(batch_key(row), []).append(row)
    return [Batch(key, group[start:start + batch_size])
            for key, group in groups.items()
            for start in range(0, len(group), batch_size)]


def shard_of(row_id: str, n: int) -> int:
    """Which of n shards a row belongs to: stable across runs and machines (sha256 of the id).

    Domain-separated from the default seed (which also hashes the id), so shard and seed are unrelated.
    """
    if n < 1:
        raise ValueError(f"the number of shards must be >= 1, got {n}")
    digest = hashlib.sha256(b"batchsd-shard\0" + row_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % n
