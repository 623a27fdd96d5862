"""The writer: PNG encoding with A1111-style metadata, atomic image/latent files, journal appends.

It runs in its own thread beside the model (a bounded queue of finished batches between them), so
PNG compression, hashing and fsyncs never hold up the next UNet forward. Per batch, in order:

    1. for every ok row: encode the PNG (text chunks `parameters` and `batchsd`), write it to a
       temp file in images/, fsync, os.replace to images/<id>.png; same for latents/<id>.npy
    2. append one part file with the batch's records to the journal (fsync + os.replace)
    3. compact the journal into results.parquet when its interval is due (see results.py)

so a record never names an image that is not in place. A failure in the thread (disk full, ...)
is kept and raised in the main thread at its next `submit` or at `close`.
"""
from __future__ import annotations

import hashlib
import io
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from batchsd.errors import InputError
from batchsd.job.results import Journal, atomic_write_bytes, fsync_dir, now_utc, remove_stale_temps

# canonical sampler name -> the name AUTOMATIC1111's web UI writes in its `parameters` chunk
A1111_SAMPLER_NAMES = {
    "ddpm": "DDPM",
    "ddim": "DDIM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
}


def _num(x: float) -> str:
    """Numbers as A1111 infotexts usually read: 7, 7.5, 0.75."""
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def a1111_parameters(record: dict, model_name: str, short_hash: str | None) -> str:
    """The A1111 `parameters` text: prompt, optional `Negative prompt:` line, then the settings line."""
    lines = [record.get("prompt") or ""]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    sampler = record.get("sampler") or ""
    settings = [
        f"Steps: {record['steps']}",
        f"Sampler: {A1111_SAMPLER_NAMES.get(sampler, sampler)}",
        f"CFG scale: {_num(float(record['cfg_scale']))}",
        f"Seed: {record['seed']}",
        f"Size: {record['width']}x{record['height']}",
    ]
    if short_hash:
        settings.append(f"Model hash: {short_hash}")
    settings.append(f"Model: {model_name}")
    if record.get("init_image") is not None and record.get("strength") is not None:
        settings.append(f"Denoising strength: {_num(float(record['strength']))}")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def encode_png(image: Image.Image, parameters: str, record_json: str) -> bytes:
    info = PngInfo()
    info.add_text("parameters", parameters)   # tEXt, or iTXt when the text is not latin-1
    info.add_text("batchsd", record_json)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=4)
    return buf.getvalue()


def encode_npy(latent: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(latent, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def safe_output_path(out_dir: Path, folder: str, row_id: str, suffix: str) -> Path:
    """<out>/<folder>/<id><suffix>, refusing any id that would land outside that folder."""
    base = (out_dir / folder).resolve()
    path = (base / f"{row_id}{suffix}").resolve()
    if path.parent != base or not row_id or row_id in (".", "..") or "/" in row_id or "\\" in row_id or "\x00" in row_id:
        raise InputError(f"id {row_id!r} would write outside {base}: ids must be plain file names "
                         f"(letters, digits, '-', '_', '.')")
    return path


@dataclass
class BatchResult:
    """One finished generate() call (or a set of failed rows) on its way to disk."""
    records: list[dict]                          # manifest record per row (to_record() + params_hash)
    images: list[Image.Image | None]             # None for failed rows
    latents: np.ndarray | None = None            # [B, 4, h, w] float32, rows aligned with records
    errors: list[str | None] = field(default_factory=list)
    elapsed_s: float = 0.0                        # generation seconds for the whole batch
    truncated: list[bool] = field(default_factory=list)


class ResultWriter:
    """Writes BatchResults in a background thread; `on_written(n_ok, n_failed)` after each batch."""

    def __init__(self, out_dir: Path, journal: Journal, *, model_name: str, model_sha256: str | None,
                 short_hash: str | None, save_latents: bool, on_written: Callable[[int, int], None] | None = None,
                 queue_size: int = 2, temp_min_age_s: float = 0.0):
        self.out_dir = Path(out_dir)
        self.images_dir = self.out_dir / "images"
        self.latents_dir = self.out_dir / "latents"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        # temp_min_age_s > 0 where other processes write into the same folders (shards, Ray actors)
        remove_stale_temps(self.images_dir, min_age_s=temp_min_age_s)
        if save_latents:
            self.latents_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.latents_dir, min_age_s=temp_min_age_s)
        self.journal = journal
        self.model_name = model_name
        self.model_sha256 = model_sha256
        self.short_hash = short_hash
        self.save_latents = save_latents
        self.on_written = on_written
        self.queue: queue.Queue[BatchResult | None] = queue.Queue(maxsize=queue_size)
        self.error: BaseException | None = None
        self.written_ok = 0
        self.written_failed = 0
        self.write_seconds = 0.0
        self._thread = threading.Thread(target=self._loop, name="batchsd-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ main-thread side
    def submit(self, batch: BatchResult) -> None:
        self._raise_if_failed()
        while True:
            try:
                self.queue.put(batch, timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def close(self) -> None:
        """Wait until everything submitted is durable, then stop the thread."""
        if self._thread.is_alive():
            while True:
                try:
                    self.queue.put(None, timeout=0.5)
                    break
                except queue.Full:
                    if not self._thread.is_alive():
                        break
            self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise RuntimeError(f"writing results failed: {err}") from err

    # ------------------------------------------------------------------ writer thread
    def _loop(self) -> None:
        while True:
            batch = self.queue.get()
            if batch is None:
                return
            if self.error is not None:
                continue  # drain after a failure; the main thread sees the error
            try:
                t0 = time.perf_counter()
                n_ok, n_failed = self._write(batch)
                self.write_seconds += time.perf_counter() - t0
                self.written_ok += n_ok
                self.written_failed += n_failed
                if self.on_written is not None:
                    self.on_written(n_ok, n_failed)
            except BaseException as e:  # noqa: BLE001 - reported to the main thread
                self.error = e

    def _write(self, batch: BatchResult) -> tuple[int, int]:
        n = len(batch.records)
        per_row_s = batch.elapsed_s / max(1, n)
        out_records = []
        n_ok = n_failed = 0
        wrote_files = False
        for i, rec in enumerate(batch.records):
            rec = dict(rec)
            image = batch.images[i] if i < len(batch.images) else None
            error = batch.errors[i] if i < len(batch.errors) else None
            rec.update(model=self.model_name, model_sha256=self.model_sha256, image_path=None,
                       image_sha256=None, latents_path=None, error=None,
                       prompt_truncated=batch.truncated[i] if i < len(batch.truncated) else None)
            if image is not None and error is None:
                try:
                    self._write_row_files(rec, image, batch.latents[i] if batch.latents is not None else None)
                    rec.update(status="ok", elapsed_s=per_row_s)
                    wrote_files = True
                    n_ok += 1
                except InputError as e:
                    rec.update(status="error", error=str(e), elapsed_s=None)
                    n_failed += 1
            else:
                rec.update(status="error", error=error or "no image was produced", elapsed_s=None)
                n_failed += 1
            rec["finished_at"] = now_utc()
            out_records.append(rec)
        if wrote_files:  # the renames themselves must be durable before the record that names them
            fsync_dir(self.images_dir)
            if self.save_latents:
                fsync_dir(self.latents_dir)
        self.journal.append(out_records)
        if self.journal.should_compact():
            self.journal.compact()
        return n_ok, n_failed

    def _write_row_files(self, rec: dict, image: Image.Image, latent: np.ndarray | None) -> None:
        row_id = rec["id"]
        png_path = safe_output_path(self.out_dir, "images", row_id, ".png")
        meta = {k: v for k, v in rec.items() if k not in ("image_path", "image_sha256", "latents_path", "error",
                                                           "finished_at", "elapsed_s", "status")}
        png = encode_png(image, a1111_parameters(rec, self.model_name, self.short_hash),
                         json.dumps(meta, sort_keys=True, default=str))
        if self.save_latents and latent is not None:
            npy_path = safe_output_path(self.out_dir, "latents", row_id, ".npy")
            atomic_write_bytes(npy_path, encode_npy(latent), sync_dir=False)
            rec["latents_path"] = npy_path.relative_to(self.out_dir.resolve()).as_posix()
        atomic_write_bytes(png_path, png, sync_dir=False)
        rec["image_path"] = png_path.relative_to(self.out_dir.resolve()).as_posix()
        rec["image_sha256"] = hashlib.sha256(png).hexdigest()
