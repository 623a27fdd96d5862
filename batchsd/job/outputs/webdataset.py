"""--format webdataset: img2dataset's output layout, as open_clip and NeMo Curator read it.

    webdataset/00000.tar           per ok row: <key>.<png|jpg|webp>, <key>.txt (the prompt),
                                   <key>.json (the result row, outputs/dataset_shards.shard_record)
    webdataset/00000.parquet       every row of the shard, failures too (`key`, `status`, `error`, ...)
    webdataset/00000_stats.json    written last: the shard's done marker (count, successes, failed,
                                   the rows fingerprint resume compares)
    webdataset/sizes.json          {"00000.tar": samples, ...}: open_clip's dataset-size file

A process shard I/N names its files `<I>-of-<N>-<k>` (layout.RunLayout.webdataset_stem); its
sizes.json entries are written by the merge when every process shard is done (merge.py).

A key is the row's id with '.' written as '%2E' (webdataset splits a member name at its first
dot; ids never hold '%', so keys stay distinct). Tar bytes are reproducible: samples in plan order,
a sample's members in name order, mtime 0, uid/gid 0, no owner names, mode 0644, PAX format.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from batchsd.job.atomic import atomic_path, atomic_write_bytes, atomic_write_table, fsync_dir
from batchsd.job.layout import WEBDATASET_TAR_SUFFIX
from batchsd.job.merge import write_webdataset_sizes
from batchsd.job.outputs.dataset_shards import DatasetShards, rows_fingerprint, shard_record
from batchsd.job.schema import records_to_table

TAR_MODE = 0o644


def key_of(row_id: str) -> str:
    return row_id.replace(".", "%2E")


def id_of(key: str) -> str:
    return key.replace("%2E", ".")


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _json_bytes(value) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()


class WebDataset(DatasetShards):
    def __init__(self, layout, spec, **kw):
        self.dir = layout.webdataset_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.remove_own_temps(self.dir, f"{layout.shard.label}-" if layout.sharded else "")
        super().__init__(layout, spec, **kw)

    def stem(self, k: int) -> str:
        return self.layout.webdataset_stem(k, self.count)

    def shard_path(self, k: int) -> Path:
        return self.dir / f"{self.stem(k)}{WEBDATASET_TAR_SUFFIX}"

    def stats_path(self, k: int) -> Path:
        return self.layout.dataset_shard_marker("webdataset", k, self.count)

    def written_fingerprint(self, k: int) -> str | None:
        try:
            stats = json.loads(self.stats_path(k).read_text())
        except (OSError, ValueError):
            return None
        return stats.get("rows_sha256") if isinstance(stats, dict) and self.shard_path(k).is_file() else None

    def read_images(self, k: int) -> Iterator[tuple[str, bytes]]:
        with tarfile.open(self.shard_path(k)) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                if "." + ext == self.spec.suffix and info.isfile():
                    yield id_of(key), tar.extractfile(info).read()

    def write_shard(self, k: int, records: list[dict], image_file) -> None:
        try:
            self.stats_path(k).unlink()        # the marker goes first: the shard is not complete meanwhile
            fsync_dir(self.dir)
        except FileNotFoundError:
            pass
        ok = 0
        with atomic_path(self.shard_path(k)) as tmp:
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                for rec in records:
                    if rec.get("status") != "ok":
                        continue
                    ok += 1
                    key = key_of(rec["id"])
                    image = image_file(rec)
                    members = {key + self.spec.suffix: image,
                               key + ".txt": (rec.get("prompt") or "").encode(),
                               key + ".json": _json_bytes(dict(shard_record(rec), key=key))}
                    for name in sorted(members):
                        data = members[name]
                        if isinstance(data, Path):
                            with open(data, "rb") as f:
                                tar.addfile(_member(name, data.stat().st_size), f)
                        else:
                            tar.addfile(_member(name, len(data)), io.BytesIO(data))
        rows = [dict(shard_record(r), key=key_of(r["id"])) for r in records]
        schema = pa.schema([pa.field("key", pa.string())] +
                           [f for f in self.journal.schema if f.name not in ("finished_at", "elapsed_s", "image_path")])
        atomic_write_table(self.dir / f"{self.stem(k)}.parquet", records_to_table(rows, schema))
        stats = {"count": len(records), "successes": ok, "failed": len(records) - ok,
                 "tar": self.shard_path(k).name, "rows_sha256": rows_fingerprint(records)}
        atomic_write_bytes(self.stats_path(k), (json.dumps(stats, indent=2, sort_keys=True) + "\n").encode())

    def after_shards(self) -> None:
        if not self.layout.sharded and self.count:          # a process shard's sizes are merged at the end (merge.py)
            write_webdataset_sizes(self.dir)

