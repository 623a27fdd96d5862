"""An init image's pixels as the model reads them: the one rule for the Python API (Pipeline) and the
job (job/init_images.py), so that one image gives one set of pixels either way.

- 8-bit modes (RGB, L, P, RGBA, CMYK, ...): PIL's `convert("RGB")` (alpha dropped, as diffusers does).
- 16-bit grayscale (PIL modes I;16*: 16-bit PNG, TIFF): scaled to 8 bits, v * 255 / 65535 rounded,
  where PIL's `convert("RGB")` clips it to white.
- 32-bit integer or float pixels (modes I and F) carry no range to rely on (0..1? 0..255?
  0..65535?), and an image without pixels has none to read: `init_image_problem` says why and how to
  fix it.

Light: PIL and numpy are imported only to convert.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

NO_RANGE_MODES = {"I": "32-bit integer", "F": "32-bit float"}   # PIL modes


def init_image_problem(image: "Image.Image") -> str | None:
    """Why the pixels of `image` cannot be read as an init image (from its header), or None."""
    if image.mode in NO_RANGE_MODES:
        return (f"has {NO_RANGE_MODES[image.mode]} pixels, whose range cannot be told from the file; save it as an "
                "8- or 16-bit PNG")
    if 0 in image.size:
        return f"is {image.size[0]}x{image.size[1]}: it has no pixels"
    return None


def rgb_pixels(image: "Image.Image") -> "Image.Image":
    """8-bit RGB by the rule in the module docstring (call after `init_image_problem` is None)."""
    if image.mode.startswith("I;16"):
        import numpy as np
        from PIL import Image

        wide = np.asarray(image).astype(np.uint32)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    try:
        return image.convert("RGB")
    except ValueError:   # premultiplied La / RGBa: PIL converts them only to their straight-alpha mode first
        return image.convert({"La": "LA", "RGBa": "RGBA"}.get(image.mode, "RGBA")).convert("RGB")
