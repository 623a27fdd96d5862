"""A row's image as file bytes, in the format asked (outputs/spec.py), with its generation
parameters where the format has a place for them:

    png    A1111's `parameters` text chunk and the full row as JSON in a `batchsd` chunk
           (png_metadata.py), as every format's PNGs
    jpg    the A1111 `parameters` text in EXIF UserComment (UNICODE prefix, UTF-16 big-endian, as
    webp   A1111 writes it with piexif, and as its PNG Info tab reads it back); no `batchsd` JSON

Encoding is deterministic: the same image and row give the same bytes (dataset shards rely on it).
"""
from __future__ import annotations

import io
import json
import struct

from PIL import Image

from batchsd.errors import InputError
from batchsd.job.outputs.spec import OutputSpec
from batchsd.job.png_metadata import a1111_parameters, encode_png

# result fields that are not known when the image is written, or say where it went
NOT_IN_PNG = ("image_path", "image_sha256", "latents_path", "error", "finished_at", "elapsed_s", "status")
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
USER_COMMENT_UNICODE = b"UNICODE\x00"
PIL_FORMATS = {"jpg": "JPEG", "webp": "WEBP"}
JPEG_MAX_EXIF = 65533     # one APP1 marker segment holds the whole EXIF block (Pillow's MAX_BYTES_IN_MARKER)


def user_comment(text: str) -> bytes:
    """EXIF UserComment bytes: the 8-byte UNICODE code, then UTF-16-BE (piexif.helper.UserComment.dump)."""
    return USER_COMMENT_UNICODE + text.encode("utf-16-be")


def exif_with_user_comment(text: str) -> bytes:
    """An EXIF block holding only UserComment = `text`, typed UNDEFINED as the EXIF standard (and
    piexif, A1111's reader) want it; Pillow's Exif writer types it BYTE. Big-endian TIFF:
    header, IFD0 with the Exif-IFD pointer, the Exif IFD with UserComment, then its data."""
    data = user_comment(text)
    ifd0, exif_ifd = 8, 8 + 2 + 12 + 4
    data_at = exif_ifd + 2 + 12 + 4
    tiff = (b"MM" + struct.pack(">HI", 42, ifd0)
            + struct.pack(">HHHII", 1, EXIF_IFD, 4, 1, exif_ifd) + struct.pack(">I", 0)
            + struct.pack(">HHHII", 1, EXIF_USER_COMMENT, 7, len(data), data_at) + struct.pack(">I", 0)
            + data)
    return b"Exif\x00\x00" + tiff


def encode_image(image: Image.Image, rec: dict, spec: OutputSpec) -> bytes:
    parameters = a1111_parameters(rec)
    if spec.image_format == "png":
        meta = {k: v for k, v in rec.items() if k not in NOT_IN_PNG}
        return encode_png(image, parameters, json.dumps(meta, sort_keys=True, default=str))
    buf = io.BytesIO()
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    exif = exif_with_user_comment(parameters)
    if spec.image_format == "jpg" and len(exif) > JPEG_MAX_EXIF:
        # the row fails alone (writer.py records it); cutting the text would publish wrong parameters
        raise InputError(f"the generation parameters ({len(parameters):,} characters, {len(exif):,} bytes of EXIF) do "
                         f"not fit in a JPEG's EXIF block ({JPEG_MAX_EXIF:,} bytes, about 32,000 characters): "
                         f"shorten the prompt or negative_prompt, or use --image-format png or webp")
    options = {"quality": spec.effective_quality, "exif": exif}
    if spec.image_format == "webp":
        options["method"] = 4       # Pillow's default effort, spelled out: the bytes depend on it
    rgb.save(buf, format=PIL_FORMATS[spec.image_format], **options)
    return buf.getvalue()
