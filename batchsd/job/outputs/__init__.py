"""The output-writer seam: where a row's image (and latents) go.

An OutputWriter is called from the writer thread only (writer.ResultWriter), one batch at a time:
`write_row` for each ok row, then `flush` once before the batch's journal part is written, so that
a record never names a file that is not durable. `write_row` fills the record's `image_path`,
`image_sha256` and `latents_path`; an InputError from it fails that row only.

Formats: `files` (loose PNGs, outputs/files.py) today; training-ready shards are filed next.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
from PIL import Image


class OutputWriter(Protocol):
    def write_row(self, rec: dict, image: Image.Image, latent: np.ndarray | None) -> None: ...

    def flush(self) -> None: ...
