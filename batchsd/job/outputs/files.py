"""Loose files, the default output format: images/<id>.<png|jpg|webp> (outputs/encode.py), with
--captions images/<id>.txt (the prompt, as kohya-style trainers read captions), and with
--save-latents latents/<id>.npy; each written atomically under --out. The imagefolder format
(outputs/imagefolder.py) writes its images with the same class into its own folder."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from batchsd.job.atomic import atomic_write_bytes, fsync_dir
from batchsd.job.layout import CAPTION_SUFFIX, IMAGES_DIR, LATENTS_DIR, LATENTS_SUFFIX, safe_output_path
from batchsd.job.outputs.encode import encode_image
from batchsd.job.outputs.spec import OutputSpec


def encode_npy(latent: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(latent, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


class LatentFiles:
    """latents/<id>.npy for every format with --save-latents (a shard format keeps latents loose)."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.out_dir, self.enabled = Path(out_dir), enabled
        self.dir = self.out_dir / LATENTS_DIR
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)

    def write(self, rec: dict, latent: np.ndarray | None) -> None:
        if self.enabled and latent is not None:
            npy_path = safe_output_path(self.out_dir, LATENTS_DIR, rec["id"], LATENTS_SUFFIX)
            atomic_write_bytes(npy_path, encode_npy(latent), sync_dir=False)
            rec["latents_path"] = f"{LATENTS_DIR}/{npy_path.name}"

    def flush(self) -> None:
        if self.enabled:
            fsync_dir(self.dir)


class LooseFiles:
    """OutputWriter (outputs/__init__.py) of <folder>/<id><suffix> (+ <id>.txt with captions) and
    latents/<id>.npy. `folder` is relative to out_dir: images/ for --format files."""

    def __init__(self, out_dir: Path, *, save_latents: bool, spec: OutputSpec | None = None,
                 folder: str = IMAGES_DIR):
        self.out_dir = Path(out_dir)
        self.save_latents = save_latents
        self.spec = spec if spec is not None else OutputSpec()
        self.folder = folder
        self.images_dir = self.out_dir / folder
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.latents = LatentFiles(self.out_dir, save_latents)
        self._wrote = False

    def write_row(self, rec: dict, image: Image.Image, latent: np.ndarray | None) -> None:
        row_id = rec["id"]
        image_path = safe_output_path(self.out_dir, self.folder, row_id, self.spec.suffix)
        data = encode_image(image, rec, self.spec)
        self.latents.write(rec, latent)
        if self.spec.captions:
            caption_path = safe_output_path(self.out_dir, self.folder, row_id, CAPTION_SUFFIX)
            atomic_write_bytes(caption_path, (rec.get("prompt") or "").encode(), sync_dir=False)
        atomic_write_bytes(image_path, data, sync_dir=False)
        rec["image_path"] = f"{self.folder}/{image_path.name}"
        rec["image_sha256"] = hashlib.sha256(data).hexdigest()
        self._wrote = True

    def flush(self) -> None:
        """The renames themselves durable before the journal part that records them."""
        if self._wrote:
            fsync_dir(self.images_dir)
            self.latents.flush()
        self._wrote = False

    def journaled(self, records: list[dict]) -> None:
        """Nothing to do once a batch is journaled: every file is already in its final place."""

    def checkpoint(self) -> None:
        """Nothing to rewrite at a compaction."""

    def close(self) -> None:
        """Nothing is pending at the end of a run."""
