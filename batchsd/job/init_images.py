"""Init images: their size from the header (to plan img2img rows), their content hash (for resume),
and decoding under guards.

    rows, failures = resolve_image_sizes(manifest.rows)  # failures: {row.index: reason}, recorded per row
    images, errors = load_images(batch.rows)             # decoded one batch ahead by the run's reader

A missing, unreadable, corrupt or too large init image is not a manifest error: that row fails with
its reason and the run goes on. So does a path that is not a regular file (a FIFO, a device, a
socket): it is refused from its stat, never opened, since opening or reading one can block forever
(a FIFO without a writer, a terminal) or have side effects (a tape device). Images are only opened
for their header when sizes are resolved (PIL reads the size lazily); `load_init_image` decodes one
under the same guards. Warnings that image libraries print about a file (PIL's "Corrupt EXIF data")
are silenced: the image is used as stored, the same as without them.

Pixels become 8-bit RGB by model/init_pixels.py's rule (the Python API's too): 16-bit grayscale is
scaled, 32-bit integer or float pixels fail the row from the header, with the fix.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import warnings
from contextlib import contextmanager
from typing import BinaryIO, Iterator, NamedTuple, Sequence

from PIL import Image, ImageOps

from batchsd.errors import InputError
from batchsd.job.rows import JobRow
from batchsd.model.init_pixels import init_image_problem, rgb_pixels
from batchsd.model.request import MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE


# Largest init image decoded: PIL's own default decompression-bomb limit (about 9459x9459), applied
# here whatever Image.MAX_IMAGE_PIXELS is set to. A 2048x2048 RGB image is 12 MiB; this is 256 MiB.
MAX_INIT_IMAGE_PIXELS = 89_478_485

_HASH_CHUNK = 1 << 20


class InitImageInfo(NamedTuple):
    width: int              # upright (EXIF orientation applied)
    height: int
    sha256: str             # of the file's bytes


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a file"


def _not_regular(path: str, mode: int) -> InputError:
    return InputError(f"init image {path} is not a regular file ({_kind(mode)}); give the path of an image "
                      "file (PNG, JPEG or WebP)")


@contextmanager
def _open_regular(path: str) -> Iterator[BinaryIO]:
    """The file at `path` open for reading, only if it is a regular file: stat first, so that a FIFO,
    device or socket is never opened (O_NONBLOCK alone does not make every open harmless); then
    opened with O_NONBLOCK (a FIFO swapped in after the stat does not block the open) and checked
    again with fstat. InputError with the reason otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"init image not found: {path}; check the init_image path "
                         "(relative paths are relative to the manifest's folder)") from None
    except OSError as e:
        raise InputError(f"init image {path} cannot be read ({e.strerror or e}); check the path and its "
                         "permissions") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"init image is a folder, not an image file: {path}")
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise InputError(f"init image {path} cannot be read ({e.strerror or e}); check the path and its "
                         "permissions") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


@contextmanager
def _quiet() -> Iterator[None]:
    """Image libraries' warnings silenced (PIL's "Corrupt EXIF data" and the like: the image is used
    as stored), except PIL's decompression-bomb warning, raised as an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _open_guarded(f: BinaryIO, path: str) -> Image.Image:
    """Open lazily (header only) from the open file `f`; raise InputError with the reason for
    anything unusable. Call under _quiet()."""
    try:
        image = Image.open(f)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"init image {path} is too large to decode safely (more than "
                         f"{MAX_INIT_IMAGE_PIXELS:,} pixels); resize it first") from None
    except Image.UnidentifiedImageError:   # its message names the file object, not the file
        empty = os.fstat(f.fileno()).st_size == 0 if hasattr(f, "fileno") else False
        raise InputError(f"init image {path!r} {'is empty' if empty else 'is not an image file PIL can read'}; "
                         "use a PNG, JPEG or WebP file") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"init image {path!r} cannot be read as an image ({e}); "
                         "use a PNG, JPEG or WebP file") from None
    width, height = image.size
    if width * height > MAX_INIT_IMAGE_PIXELS:
        image.close()
        raise InputError(f"init image {path} is too large to decode safely: {width}x{height} = "
                         f"{width * height:,} pixels, more than {MAX_INIT_IMAGE_PIXELS:,}; resize it first")
    if why := init_image_problem(image):
        image.close()
        raise InputError(f"init image {path} {why}")
    return image


_TRANSPOSED = {5, 6, 7, 8}   # EXIF orientations that swap width and height


def _upright_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    try:
        orientation = image.getexif().get(0x0112)
    except Exception:       # a broken EXIF block: load_init_image ignores it the same way
        orientation = None
    return (height, width) if orientation in _TRANSPOSED else (width, height)


def init_image_size(path: str) -> tuple[int, int]:
    """(width, height) upright (EXIF orientation applied), from the header; InputError when unusable."""
    with _open_regular(path) as f, _quiet():
        image = _open_guarded(f, path)
        try:
            return _upright_size(image)
        finally:
            image.close()


def inspect_init_image(path: str) -> InitImageInfo:
    """The upright size from the header and the sha256 of the file's bytes, from one open of the
    file; InputError when unusable."""
    with _open_regular(path) as f:
        digest = hashlib.sha256()
        try:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
            f.seek(0)
        except OSError as e:
            raise InputError(f"init image {path} cannot be read ({e.strerror or e}); check the file") from None
        with _quiet():
            image = _open_guarded(f, path)
            try:
                width, height = _upright_size(image)
            finally:
                image.close()
    return InitImageInfo(width, height, digest.hexdigest())


def load_init_image(path: str) -> Image.Image:
    """Decode an init image to upright RGB (EXIF orientation applied, as diffusers' load_image; fully
    loaded, file closed); InputError with the reason when unusable, including a file whose header
    reads but whose data is truncated or corrupt."""
    with _open_regular(path) as f, _quiet():
        image = _open_guarded(f, path)
        try:
            with image:
                image.load()
                try:
                    upright = ImageOps.exif_transpose(image)
                except Exception:   # a broken EXIF block: keep the pixels as stored
                    upright = image
                return rgb_pixels(upright)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InputError(f"init image {path} is too large to decode safely; resize it first") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise InputError(f"init image {path} is corrupt or truncated ({e}); re-save or replace it") from None


def resolve_image_sizes(rows: list[JobRow]) -> tuple[list[JobRow], dict[int, str]]:
    """Check every img2img row's init image, record its content hash and fill in a missing
    width/height from its header.

    A missing dimension becomes the image's, rounded down to a multiple of 8; it must then be in
    64..2048. Every img2img row gets `init_image_sha256` (part of its params_hash, so that an image
    replaced in place is made again). Returns (runnable rows in the given order, {row.index: reason}
    for rows that fail). Each distinct path is opened and read once: hashing reads the whole file,
    where the size alone needs only its header, and that read is the price of noticing a replaced
    image.
    """
    infos: dict[str, InitImageInfo | str] = {}
    resolved: list[JobRow] = []
    failures: dict[int, str] = {}
    for row in rows:
        if row.init_image is None:
            resolved.append(row)
            continue
        info = infos.get(row.init_image)
        if info is None:
            try:
                info = inspect_init_image(row.init_image)
            except InputError as e:
                info = str(e)
            infos[row.init_image] = info
        if isinstance(info, str):
            failures[row.index] = info
            continue
        w0, h0, sha256 = info
        width = row.width if row.width is not None else w0 // SIZE_MULTIPLE * SIZE_MULTIPLE
        height = row.height if row.height is not None else h0 // SIZE_MULTIPLE * SIZE_MULTIPLE
        if not (MIN_SIZE <= width <= MAX_SIZE and MIN_SIZE <= height <= MAX_SIZE):
            failures[row.index] = (
                f"init image {row.init_image} is {w0}x{h0}, which gives {width}x{height} rounded down to "
                f"multiples of {SIZE_MULTIPLE}, outside {MIN_SIZE}..{MAX_SIZE}; set width and height in the "
                "manifest (the image is resized to them)")
            continue
        resolved.append(dataclasses.replace(row, width=width, height=height, init_image_sha256=sha256))
    return resolved, failures


def load_images(rows: Sequence[JobRow]) -> tuple[dict, dict]:
    images, errors = {}, {}
    for r in rows:
        if r.init_image is None:
            continue
        try:
            images[r.id] = load_init_image(r.init_image)
        except InputError as e:
            errors[r.id] = str(e)
    return images, errors
