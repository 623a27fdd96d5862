"""--format parquet: the Hugging Face Hub's parquet layout, images embedded.

    data/train-00000-of-00004.parquet      the ok rows of dataset shard 0 of 4 (the count is known
                                           before the run: ceil(rows / --shard-size))

Columns: `image` as the datasets `Image` struct (`bytes`, `path` = <id>.<ext>), `text` (the
prompt), then the row: id, negative_prompt, seed, steps, cfg_scale, sampler, width, height, the
pass-through columns, model, model_sha256, params_hash, image_sha256. The schema metadata holds
the datasets features under the `huggingface` key (so `datasets.load_dataset("parquet", ...)`
decodes `image` as a PIL image) and, under `batchsd`, the rows fingerprint that marks the file
complete (outputs/dataset_shards.py): the file is renamed into place whole, so it is its own done
marker. Failed rows are only in results.parquet. A process shard I/N names its files
`train-<I>-of-<N>-<k>-of-<K>.parquet`. Row groups of ROW_GROUP_ROWS images.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from batchsd.job.atomic import atomic_path
from batchsd.job.layout import HF_SPLIT
from batchsd.job.outputs.dataset_shards import DatasetShards, rows_fingerprint

ROW_GROUP_ROWS = 100
IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
ROW_COLUMNS = ["id", "negative_prompt", "seed", "steps", "cfg_scale", "sampler", "width", "height"]
TAIL_COLUMNS = ["model", "model_sha256", "params_hash", "image_sha256"]
NOT_COLUMNS = {"prompt", "init_image", "strength", "status", "error", "image_path", "latents_path",
               "elapsed_s", "finished_at", "prompt_truncated"}
_ARROW_TO_DATASETS = {"double": "float64", "float": "float32", "halffloat": "float16"}


def hf_dtype(typ: pa.DataType) -> str | None:
    """The datasets `Value` dtype of a primitive Arrow type; None for nested types (written as JSON text)."""
    if pa.types.is_timestamp(typ):
        return f"timestamp[{typ.unit}, tz={typ.tz}]" if typ.tz else f"timestamp[{typ.unit}]"
    if pa.types.is_boolean(typ):
        return "bool"
    if pa.types.is_date32(typ):
        return "date32"
    if pa.types.is_date64(typ):
        return "date64"
    if (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_string(typ)
            or pa.types.is_large_string(typ) or pa.types.is_binary(typ)):
        return _ARROW_TO_DATASETS.get(str(typ), str(typ))
    return None


class HFParquet(DatasetShards):
    def __init__(self, layout, spec, **kw):
        self.dir = layout.hf_parquet_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.remove_own_temps(self.dir, f"{HF_SPLIT}-{layout.shard.label}-" if layout.sharded else "")
        super().__init__(layout, spec, **kw)

    def shard_path(self, k: int) -> Path:
        return self.dir / self.layout.hf_parquet_name(k, self.count)

    def written_fingerprint(self, k: int) -> str | None:
        try:
            meta = pq.read_schema(self.shard_path(k)).metadata or {}
            return json.loads(meta[b"batchsd"])["rows_sha256"]
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
            return None

    def read_images(self, k: int) -> Iterator[tuple[str, bytes]]:
        for batch in pq.ParquetFile(self.shard_path(k)).iter_batches(columns=["id", "image"], batch_size=ROW_GROUP_ROWS):
            for rid, image in zip(batch.column("id").to_pylist(), batch.column("image").to_pylist()):
                yield rid, image["bytes"]

    def _schema(self, records: list[dict]) -> tuple[pa.Schema, dict]:
        """The shard's Arrow schema and its datasets features: `image`, `text`, the row columns."""
        src = self.journal.schema
        extras = [f for f in src if f.name not in set(ROW_COLUMNS) | set(TAIL_COLUMNS) | NOT_COLUMNS]
        fields = [pa.field("image", IMAGE_TYPE), pa.field("text", pa.string())]
        fields += [src.field(c) for c in ROW_COLUMNS]
        for f in extras:
            fields.append(f if hf_dtype(f.type) else pa.field(f.name, pa.string()))
        fields += [src.field(c) for c in TAIL_COLUMNS]
        features = {"image": {"_type": "Image"}}
        for f in fields[1:]:
            features[f.name] = {"dtype": hf_dtype(f.type), "_type": "Value"}
        fields = [pa.field(f.name, f.type) for f in fields]
        return pa.schema(fields), features

    def write_shard(self, k: int, records: list[dict], image_file) -> None:
        schema, features = self._schema(records)
        ok = [r for r in records if r.get("status") == "ok"]
        metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode(),
                    b"batchsd": json.dumps({"rows_sha256": rows_fingerprint(records), "rows": len(records),
                                            "ok": len(ok)}).encode()}
        schema = schema.with_metadata(metadata)
        with atomic_path(self.shard_path(k)) as tmp:
            with pq.ParquetWriter(tmp, schema, compression="snappy") as writer:
                for start in range(0, len(ok), ROW_GROUP_ROWS):
                    writer.write_table(self._table(ok[start:start + ROW_GROUP_ROWS], schema, image_file),
                                       row_group_size=ROW_GROUP_ROWS)
                if not ok:
                    writer.write_table(schema.empty_table())

    def _table(self, rows: list[dict], schema: pa.Schema, image_file) -> pa.Table:
        cols = {"image": [{"bytes": image_file(r).read_bytes(), "path": f"{r['id']}{self.spec.suffix}"} for r in rows],
                "text": [r.get("prompt") or "" for r in rows]}
        for f in schema:
            if f.name in cols:
                continue
            values = [r.get(f.name) for r in rows]
            if pa.types.is_string(f.type) and f.name not in ROW_COLUMNS + TAIL_COLUMNS:
                values = [v if v is None or isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
                          for v in values]
            cols[f.name] = values
        return pa.Table.from_pydict(cols, schema=schema)
