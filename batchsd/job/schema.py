"""The results schema: the manifest columns (typed explicitly), the pass-through ("extra") columns
with the types the manifest reader recorded (Manifest.extra_types: a Parquet column's own Arrow
type, string for CSV), then the result columns; and records -> Arrow tables. Parts written by an
older run with other extra-column types are cast to the current types (`conform`); a column that
cannot be cast becomes string. The results table takes its pass-through values from the current
manifest (`overlay_extras`), not from the journaled records.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

# The manifest columns every row has after defaults are resolved (JobRow.to_record()).
MANIFEST_FIELDS: list[pa.Field] = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt", pa.string()),
    pa.field("negative_prompt", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("steps", pa.int64()),
    pa.field("cfg_scale", pa.float64()),
    pa.field("sampler", pa.string()),
    pa.field("width", pa.int64()),
    pa.field("height", pa.int64()),
    pa.field("init_image", pa.string()),
    pa.field("strength", pa.float64()),
    # conditioning_columns.CONDITIONING_COLUMNS (null where not given; prompt_syntax "plain" by default)
    pa.field("original_width", pa.int64()),
    pa.field("original_height", pa.int64()),
    pa.field("crop_top", pa.int64()),
    pa.field("crop_left", pa.int64()),
    pa.field("clip_skip", pa.int64()),
    pa.field("prompt_syntax", pa.string()),
    pa.field("loras", pa.string()),                       # name:multiplier:hash12;... (job/loras.py)
]
MANIFEST_NAMES = [f.name for f in MANIFEST_FIELDS]

# What the run adds.
RESULT_FIELDS: list[pa.Field] = [
    pa.field("status", pa.string(), nullable=False),       # "ok" | "error"
    pa.field("error", pa.string()),
    pa.field("image_path", pa.string()),                   # relative to --out
    pa.field("image_sha256", pa.string()),
    pa.field("latents_path", pa.string()),                 # relative to --out, with --save-latents
    pa.field("model", pa.string()),
    pa.field("model_sha256", pa.string()),
    pa.field("embeddings", pa.string()),                  # name:hash12;... the prompts used (job/embeddings.py)
    # what the row's bits depend on besides the row and the model (resume.Numerics)
    pa.field("torch_version", pa.string()),
    pa.field("device_type", pa.string()),                 # "cpu" | "cuda"
    pa.field("dtype", pa.string()),                       # "float32" | "bfloat16" | "float16"
    pa.field("exact", pa.bool_()),                        # exact mode (model/fast/exact.py)
    pa.field("prediction_type", pa.string()),             # how the model was read: "epsilon" | "v_prediction"
    # the CPU speed choices the row was made with (worker.speed_choices; not compared by resume: the
    # CPU's own kernels differ by machine too, docs/reproducibility.md)
    pa.field("cpu", pa.string()),                         # devices.CpuKind; null on CUDA
    pa.field("winograd", pa.bool_()),                     # the wide 3x3 convolutions ran as Winograd
    pa.field("fused_attention", pa.bool_()),              # the UNet's attention ran the fused bf16 kernel
    pa.field("fused_epilogues", pa.bool_()),              # GEGLU and residual adds ran in oneDNN linears' epilogues
    pa.field("elapsed_s", pa.float64()),
    pa.field("finished_at", pa.timestamp("us", tz="UTC")),
    pa.field("params_hash", pa.string()),
    pa.field("prompt_truncated", pa.bool_()),             # prompt or negative prompt cut at 77 tokens
]
RESULT_NAMES = [f.name for f in RESULT_FIELDS]
NUMERICS_COLUMNS = ["torch_version", "device_type", "dtype", "exact", "prediction_type"]
RESUME_COLUMNS = ["id", "status", "image_path", "image_sha256", "latents_path", "model", "model_sha256", "params_hash",
                  "finished_at", *NUMERICS_COLUMNS]


# ----------------------------------------------------------------------------- schema

def infer_extra_type(values: Iterable[Any]) -> pa.DataType:
    """One arrow type for a pass-through column, from all its values (None ignored): bool, int64,
    float64, else string. Only for records whose columns' types were not recorded."""
    kinds = set()
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool):
            kinds.add("bool")
        elif isinstance(v, int):
            kinds.add("int")
        elif isinstance(v, float):
            kinds.add("float")
        else:
            kinds.add("str")
    if not kinds or kinds == {"str"} or "str" in kinds:
        return pa.string()
    if kinds == {"bool"}:
        return pa.bool_()
    if kinds == {"int"}:
        return pa.int64()
    if kinds <= {"int", "float"}:
        return pa.float64()
    return pa.string()  # bools mixed with numbers


def to_extra_value(v: Any, typ: pa.DataType) -> Any:
    if v is None:
        return None
    if pa.types.is_string(typ) and not isinstance(v, str):
        if isinstance(v, (dict, list)):
            return json.dumps(v, sort_keys=True)
        return str(v)
    if pa.types.is_floating(typ):
        return float(v)
    return v


def results_schema(extra_types: dict[str, pa.DataType]) -> pa.Schema:
    extras = [pa.field(name, typ) for name, typ in extra_types.items() if name not in MANIFEST_NAMES + RESULT_NAMES]
    return pa.schema(MANIFEST_FIELDS + extras + RESULT_FIELDS)


def extra_types_for(records: Sequence[dict], extra_columns: Sequence[str] | Mapping[str, pa.DataType]
                    ) -> dict[str, pa.DataType]:
    """The pass-through columns' types: those given when `extra_columns` maps names to Arrow types
    (Manifest.extra_types: the records are then not read), else inferred from the records."""
    if isinstance(extra_columns, Mapping):
        return dict(extra_columns)
    return {c: infer_extra_type(r.get(c) for r in records) for c in extra_columns}


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


# ----------------------------------------------------------------------------- records -> tables

def records_to_table(records: Sequence[dict], schema: pa.Schema) -> pa.Table:
    """`records` as a table of `schema`. A pass-through value that does not fit its column's type
    (a record made for another schema) makes that column string in this table (conform widens)."""
    arrays, fields = [], []
    for field in schema:
        vals = [r.get(field.name) for r in records]
        if field.name in MANIFEST_NAMES or field.name in RESULT_NAMES:
            arrays.append(pa.array(vals, type=field.type))
            fields.append(field)
            continue
        try:
            arrays.append(pa.array([to_extra_value(v, field.type) for v in vals], type=field.type))
            fields.append(field)
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            arrays.append(pa.array([to_extra_value(v, pa.string()) for v in vals], type=pa.string()))
            fields.append(pa.field(field.name, pa.string()))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def overlay_extras(table: pa.Table, extras: pa.Table) -> pa.Table:
    """`table` (records with an `id` column) with its pass-through columns replaced by those of
    `extras` (`id` plus the current manifest's pass-through columns, Manifest.extras), matched by
    id: null where an id is not in `extras`. Columns: the manifest's, the pass-through columns in
    the extras' order and types, then the result columns. One hash join: linear in both tables."""
    where = pc.index_in(table.column("id"), value_set=extras.column("id").combine_chunks())
    picked = extras.take(where)
    arrays, fields = [], []
    for field in MANIFEST_FIELDS:
        arrays.append(_column_or_nulls(table, field))
        fields.append(field)
    for field in extras.schema:
        if field.name != "id" and field.name not in MANIFEST_NAMES and field.name not in RESULT_NAMES:
            arrays.append(picked.column(field.name))
            fields.append(pa.field(field.name, field.type))
    for field in RESULT_FIELDS:
        arrays.append(_column_or_nulls(table, field))
        fields.append(field)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _column_or_nulls(table: pa.Table, field: pa.Field):
    if field.name not in table.column_names:
        return pa.nulls(table.num_rows, field.type)
    col = table.column(field.name)
    return col if col.type == field.type else col.cast(field.type)


def conform(table: pa.Table, schema: pa.Schema) -> tuple[pa.Table, pa.Schema]:
    """Cast `table` to `schema` (missing columns null, unknown columns dropped). A column that
    cannot be cast turns the schema's column into string. Returns (table, possibly widened schema)."""
    cols = []
    fields = list(schema)
    for i, field in enumerate(fields):
        if field.name not in table.column_names:
            cols.append(pa.nulls(table.num_rows, type=field.type))
            continue
        col = table.column(field.name)
        if col.type != field.type:
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                fields[i] = pa.field(field.name, pa.string(), nullable=True)
                col = col.cast(pa.string())
        cols.append(col)
    schema = pa.schema(fields)
    return pa.Table.from_arrays(cols, schema=schema), schema

