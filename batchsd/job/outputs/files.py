"""Loose files, the default output format: images/<id>.png (A1111 metadata) and, with
--save-latents, latents/<id>.npy, each written atomically under --out."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from batchsd.job.atomic import atomic_write_bytes, fsync_dir
from batchsd.job.layout import IMAGE_SUFFIX, IMAGES_DIR, LATENTS_DIR, LATENTS_SUFFIX, safe_output_path
from batchsd.job.png_metadata import a1111_parameters, encode_png

# result fields that are not known when the image is written, or say where it went
NOT_IN_PNG = ("image_path", "image_sha256", "latents_path", "error", "finished_at", "elapsed_s", "status")


def encode_npy(latent: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(latent, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


class LooseFiles:
    """OutputWriter (outputs/__init__.py) of images/<id>.png and latents/<id>.npy."""

    def __init__(self, out_dir: Path, *, model_name: str, short_hash: str | None, save_latents: bool):
        self.out_dir = Path(out_dir)
        self.model_name, self.short_hash, self.save_latents = model_name, short_hash, save_latents
        self.images_dir = self.out_dir / IMAGES_DIR
        self.latents_dir = self.out_dir / LATENTS_DIR
        self.images_dir.mkdir(parents=True, exist_ok=True)
        if save_latents:
            self.latents_dir.mkdir(parents=True, exist_ok=True)
        self._wrote = False

    def write_row(self, rec: dict, image: Image.Image, latent: np.ndarray | None) -> None:
        row_id = rec["id"]
        png_path = safe_output_path(self.out_dir, IMAGES_DIR, row_id, IMAGE_SUFFIX)
        meta = {k: v for k, v in rec.items() if k not in NOT_IN_PNG}
        png = encode_png(image, a1111_parameters(rec, self.model_name, self.short_hash),
                         json.dumps(meta, sort_keys=True, default=str))
        if self.save_latents and latent is not None:
            npy_path = safe_output_path(self.out_dir, LATENTS_DIR, row_id, LATENTS_SUFFIX)
            atomic_write_bytes(npy_path, encode_npy(latent), sync_dir=False)
            rec["latents_path"] = f"{LATENTS_DIR}/{npy_path.name}"
        atomic_write_bytes(png_path, png, sync_dir=False)
        rec["image_path"] = f"{IMAGES_DIR}/{png_path.name}"
        rec["image_sha256"] = hashlib.sha256(png).hexdigest()
        self._wrote = True

    def flush(self) -> None:
        """The renames themselves durable before the journal part that records them."""
        if self._wrote:
            fsync_dir(self.images_dir)
            if self.save_latents:
                fsync_dir(self.latents_dir)
        self._wrote = False
