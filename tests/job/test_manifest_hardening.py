"""Bad or unusual input found by an adversarial run: every case either works end to end or stops with
a message naming the row, the column and the fix; never a traceback, never lost work.

Item numbers refer to that run's findings: 3 result-named pass-through columns, 5 uint64 pass-through,
6 pass-through types, 7 changed pass-through columns, 8 cfg_scale limit and one home for the limits,
9 init image replaced in place, 10 FIFO/device/socket as init image, 16 foreign journal part,
20 CSV with a huge field, 21a PIL warnings.
"""
from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import decimal
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

import batchsd.job.init_images as init_images
import batchsd.job.manifest as manifest_mod
from batchsd.cli import app
from batchsd.errors import InputError
from batchsd.job.init_images import inspect_init_image, load_init_image, resolve_image_sizes
from batchsd.job.journal import Journal, read_prior
from batchsd.job.layout import RunLayout
from batchsd.job.manifest import COLUMNS, read_manifest
from batchsd.job.rows import JobRow
from batchsd.job.schema import RESULT_NAMES, results_schema
from batchsd.model import request

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("cached_tiny")   # tests/job/conftest.py


class Hung(BaseException):
    """Not an OSError (TimeoutError is): code that catches OSError around an open must not swallow it."""


@pytest.fixture
def no_hang():
    """Turn a hang (a FIFO opened for reading) into a test failure after 60 s."""
    def timeout(signum, frame):
        raise Hung("hung: something opened a FIFO or device for reading")
    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert "Traceback" not in result.output
    return result


def run_tiny(manifest: Path, *extra: str):
    return invoke("run", str(manifest), "--model", "tiny", *extra)


def results(out: Path) -> pa.Table:
    return pq.read_table(out / "results.parquet")


def by_id(table: pa.Table, column: str) -> dict:
    return dict(zip(table.column("id").to_pylist(), table.column(column).to_pylist()))


def save_noise(path: Path, w: int = 64, h: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def small_rows(n: int) -> dict:
    """The manifest columns of n quick tiny-model rows (64x64, 2 steps)."""
    return {"id": [f"r{i}" for i in range(n)], "prompt": [f"prompt {i}" for i in range(n)],
            "seed": pa.array(range(n), pa.int64()), "steps": pa.array([2] * n, pa.int64()),
            "width": pa.array([64] * n, pa.int64()), "height": pa.array([64] * n, pa.int64())}


# ----------------------------------------------------------------------------- 3: result-named columns

@pytest.mark.parametrize("name", [n for n in RESULT_NAMES if n not in COLUMNS])   # `model` is read: test_row_models
def test_pass_through_column_named_like_a_result_column_is_refused(tmp_path, name):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"prompt,steps,width,height,{name}\na cat,2,64,64,kept\n")
    m = read_manifest(manifest)
    assert [(p.row, p.column) for p in m.problems] == [(None, name)]
    assert f"src_{name}" in m.problems[0].message and "rename" in m.problems[0].message

    r = invoke("validate", str(manifest))
    assert r.exit_code == 2 and f"column {name!r}" in r.stdout and f"src_{name}" in r.stdout
    assert "passed through" not in r.stdout
    r = run_tiny(manifest)
    assert r.exit_code == 2 and f"src_{name}" in r.stderr and "nothing was run" in r.stderr
    assert not (tmp_path / "outputs").exists()


def test_a_model_cell_naming_no_checkpoint_is_the_rows_problem(tmp_path, monkeypatch):
    """A `model` cell is read (per-row models: tests/job/test_row_models.py); one that names nothing
    is a problem of its row and column that says where batchsd looked and what to write."""
    monkeypatch.chdir(tmp_path)
    manifest = tmp_path / "m.csv"
    manifest.write_text("prompt,model\na cat,\na dog,sdxl.safetensors\n")
    (problem,) = read_manifest(manifest).problems
    assert (problem.row, problem.column) == (2, "model")
    assert "no checkpoint 'sdxl.safetensors'" in problem.message and "weights" in problem.message
    assert "relative to the manifest's folder" in problem.message and "'tiny'" in problem.message


# ----------------------------------------------------------------------------- 5: uint64 >= 2**63

def test_uint64_pass_through_above_int64_works_end_to_end(tmp_path):
    big = [2**64 - 1, 2**63]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({**small_rows(2), "big": pa.array(big, pa.uint64())}), manifest)
    r = invoke("validate", str(manifest))
    assert r.exit_code == 0, r.stdout
    r = run_tiny(manifest)
    assert r.exit_code == 0, r.output
    assert "2 ok, 0 failed" in r.stdout
    table = results(tmp_path / "outputs" / "m")
    assert table.schema.field("big").type == pa.uint64()
    assert by_id(table, "big") == {"r0": big[0], "r1": big[1]}         # exact
    assert by_id(table, "status") == {"r0": "ok", "r1": "ok"}


# ----------------------------------------------------------------------------- 6: pass-through types

def typed_columns() -> dict[str, pa.Array]:
    return {
        "when": pa.array([dt.datetime(2024, 5, 6, 7, 8, 9, 123456), None], pa.timestamp("us")),
        "when_ns_tz": pa.array([dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc), None],
                               pa.timestamp("ns", tz="UTC")),
        "day": pa.array([dt.date(2024, 5, 6), None], pa.date32()),
        "price": pa.array([decimal.Decimal("12.345"), None], pa.decimal128(10, 3)),
        "blob": pa.array([b"a\x00b", None], pa.binary()),
        "tags": pa.array([["x", "y"], None], pa.list_(pa.string())),
        "meta": pa.array([{"k": 1, "v": "w"}, None], pa.struct([("k", pa.int64()), ("v", pa.string())])),
        "i8": pa.array([-8, None], pa.int8()),
        "i16": pa.array([300, None], pa.int16()),
        "i32": pa.array([70000, None], pa.int32()),
        "u8": pa.array([255, None], pa.uint8()),
        "f32": pa.array([0.5, None], pa.float32()),
        "cat": pa.array(["a", None]).dictionary_encode(),
    }


def test_parquet_pass_through_columns_keep_their_arrow_types(tmp_path):
    columns = typed_columns()
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({**small_rows(2), **columns}), manifest)
    m = read_manifest(manifest)
    assert m.problems == [] and m.extra_types == {name: arr.type for name, arr in columns.items()}
    r = run_tiny(manifest)
    assert r.exit_code == 0, r.output
    table = results(tmp_path / "outputs" / "m")
    for name, arr in columns.items():
        assert table.schema.field(name).type == arr.type, name
        assert table.column(name).combine_chunks().equals(arr), name     # values untouched, nulls kept
    assert by_id(table, "blob")["r0"] == b"a\x00b"                      # bytes, not "b'a\\x00b'"


def test_view_typed_parquet_and_empty_json_objects_run_end_to_end(tmp_path):
    """Columns the results' writer could not take rows from (Arrow view types; a struct without
    fields, which Parquet cannot store) once stopped every run after its first image."""
    manifest = tmp_path / "v.parquet"
    pq.write_table(pa.table({**small_rows(2), "sv": pa.array(["s", None], pa.string_view()),
                             "lv": pa.array([[1], None], pa.list_view(pa.int64()))}), manifest)
    r = run_tiny(manifest)
    assert r.exit_code == 0, r.output
    table = results(tmp_path / "outputs" / "v")
    assert by_id(table, "sv") == {"r0": "s", "r1": None} and by_id(table, "lv") == {"r0": [1], "r1": None}
    jsonl = tmp_path / "e.jsonl"
    jsonl.write_text('{"id": "r0", "prompt": "a", "steps": 2, "width": 64, "height": 64, "x": {}}\n')
    r = run_tiny(jsonl)
    assert r.exit_code == 0, r.output
    assert by_id(results(tmp_path / "outputs" / "e"), "x") == {"r0": "{}"}


def test_csv_pass_through_cells_are_text_and_empty_cells_null(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,prompt,steps,width,height,note,code\n"
                        "a,x,2,64,64,,007\n"
                        "b,y,2,64,64, ,\n")
    m = read_manifest(manifest)
    assert m.extra_types == {"note": pa.string(), "code": pa.string()}
    assert [r.extra for r in m.rows] == [{"note": None, "code": "007"}, {"note": " ", "code": None}]
    r = run_tiny(manifest)
    assert r.exit_code == 0, r.output
    table = results(tmp_path / "outputs" / "m")
    assert by_id(table, "note") == {"a": None, "b": " "} and by_id(table, "code") == {"a": "007", "b": None}
    assert table.schema.field("code").type == pa.string()


def test_old_journal_parts_with_other_types_still_compact(tmp_path):
    # an older run journaled `when` as text and `n` as int64; the manifest now has them as timestamp / int8
    old_schema = results_schema({"when": pa.string(), "n": pa.int64(), "gone": pa.string()})
    old = Journal(tmp_path, old_schema, ["a", "b"])
    old.append([record("a", when="2024-05-06 07:08:09", n=5, gone="x")])
    extras = pa.table({"id": ["a", "b"], "when": pa.array([dt.datetime(2024, 5, 6, 7, 8, 9), None]),
                       "n": pa.array([5, 6], pa.int8())})
    new = Journal(tmp_path, results_schema(dict(zip(extras.column_names[1:], extras.schema.types[1:]))),
                  ["a", "b"], extras=extras)
    new.append([record("b", when=dt.datetime(2024, 1, 1), n=6)])
    assert new.compact() == 2
    table = pq.read_table(tmp_path / "results.parquet")
    assert table.schema.field("when").type == pa.timestamp("us") and table.schema.field("n").type == pa.int8()
    assert "gone" not in table.column_names
    assert by_id(table, "n") == {"a": 5, "b": 6}


def record(rid: str, **extra) -> dict:
    rec = {"id": rid, "prompt": "p", "negative_prompt": "", "seed": 1, "steps": 2, "cfg_scale": 7.5,
           "sampler": "euler", "width": 64, "height": 64, "init_image": None, "strength": None,
           "status": "ok", "error": None, "image_path": None, "image_sha256": None,   # no file to look for
           "latents_path": None, "model": "tiny-random", "model_sha256": None, "elapsed_s": 0.1,
           "finished_at": dt.datetime.now(dt.timezone.utc), "params_hash": "h", "prompt_truncated": False}
    rec.update(extra)
    return rec


def test_records_that_do_not_fit_their_type_are_kept_as_text(tmp_path):
    # a record made for another schema (an int journaled where the column is now a timestamp)
    j = Journal(tmp_path, results_schema({"when": pa.timestamp("us")}), ["a"])
    j.append([record("a", when=12345678901234567890)])
    assert j.compact() == 1
    assert by_id(pq.read_table(tmp_path / "results.parquet"), "when") == {"a": "12345678901234567890"}


# ----------------------------------------------------------------------------- 7: changed pass-through columns

def test_changed_and_added_pass_through_columns_show_in_results_without_remaking(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,prompt,steps,width,height,tag\na,x,2,64,64,old-a\nb,y,2,64,64,old-b\n")
    r = run_tiny(manifest)
    assert r.exit_code == 0, r.output
    out = tmp_path / "outputs" / "m"
    first = results(out)
    images = {p.name: p.read_bytes() for p in (out / "images").iterdir()}

    manifest.write_text("id,prompt,steps,width,height,tag,batch\na,x,2,64,64,new-a,7\nb,y,2,64,64,,8\n")
    r = run_tiny(manifest)
    assert r.exit_code == 0, r.output
    assert "0 to make, 2 already done" in r.stderr            # params_hash ignores pass-through columns
    now = results(out)
    assert by_id(now, "tag") == {"a": "new-a", "b": None}    # the manifest as it is now
    assert by_id(now, "batch") == {"a": "7", "b": "8"}       # the added column too
    assert by_id(now, "finished_at") == by_id(first, "finished_at")
    assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == images
    # the journal keeps what each record was written with
    parts = list(RunLayout(out).parts_dir.glob("part-*.parquet"))
    journaled = pa.concat_tables([pq.read_table(p, columns=["id", "tag"]) for p in parts])
    assert by_id(journaled, "tag") == {"a": "old-a", "b": "old-b"}


def test_overlay_is_by_id_for_a_shard_and_new_rows(tmp_path):
    extras = pa.table({"id": ["c", "a", "b"], "tag": ["C", "A", "B"], "n": pa.array([3, 1, 2], pa.int16())})
    j = Journal(tmp_path, results_schema({"tag": pa.string(), "n": pa.int16()}), ["a", "b"], extras=extras)
    j.append([record("b", tag="old", n=9), record("a", tag="old", n=9), record("zz", tag="x", n=0)])
    assert j.compact() == 2
    table = pq.read_table(tmp_path / "results.parquet")
    assert table.column("id").to_pylist() == ["a", "b"]
    assert by_id(table, "tag") == {"a": "A", "b": "B"} and by_id(table, "n") == {"a": 1, "b": 2}
    from batchsd.job.schema import MANIFEST_NAMES
    assert table.column_names[:11] == ["id", "prompt", "negative_prompt", "seed", "steps", "cfg_scale", "sampler",
                                       "width", "height", "init_image", "strength"]
    m = len(MANIFEST_NAMES)
    assert table.column_names[:m] == MANIFEST_NAMES
    assert table.column_names[m:m + 2] == ["tag", "n"] and table.column_names[-1] == "prompt_truncated"


def test_manifest_extras_are_the_valid_rows(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": ["x", "", "z"],
                             "n": pa.array([1, 2, 3], pa.int8())}), path)
    m = read_manifest(path)
    assert [p.row for p in m.problems] == [2]
    assert m.extras.to_pydict() == {"id": ["a", "c"], "n": [1, 3]} and m.extras.schema.field("n").type == pa.int8()
    assert m.extras is m.extras                               # built once


# ----------------------------------------------------------------------------- 8: cfg_scale and the limits' home

@pytest.mark.parametrize("value, ok", [("1e30", False), ("100.5", False), ("100", True), ("0", True)])
def test_cfg_scale_upper_limit(tmp_path, value, ok):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"prompt,cfg_scale\nfine,7\nthe row,{value}\n")
    r = invoke("validate", str(manifest))
    if ok:
        assert r.exit_code == 0, r.stdout
        return
    assert r.exit_code == 2
    assert "data row 2, column 'cfg_scale'" in r.stdout
    assert f"<= {request.MAX_CFG_SCALE:g}" in r.stdout and ">= 0" in r.stdout


def test_limits_and_defaults_come_from_request():
    for name in ("MIN_SIZE", "MAX_SIZE", "MAX_STEPS", "SEED_LIMIT", "MAX_CFG_SCALE", "DEFAULT_STEPS",
                 "DEFAULT_CFG_SCALE", "DEFAULT_SAMPLER", "DEFAULT_SIZE", "DEFAULT_STRENGTH"):
        for module in (manifest_mod, init_images, sys.modules["batchsd.job.rows"]):
            assert getattr(module, name, getattr(request, name)) is getattr(request, name), (module, name)
    row = JobRow(0, "a", "p", "", 1, 7, 7.5, "euler", 64, 64, "/x.png", 0.3, {})
    assert row.denoise_steps == request.img2img_steps(7, 0.3) == 2


def test_validating_a_manifest_does_not_import_torch(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("prompt,sampler\na,Euler a\n")
    code = ("import sys; from batchsd.job.manifest import read_manifest; m = read_manifest(sys.argv[1]); "
            "assert m.ok and m.rows[0].sampler == 'euler_a'; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(manifest)], cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- 9: init image replaced in place

def test_txt2img_params_hash_is_unchanged():
    # computed with the code before init images' content entered params_hash: text-to-image rows
    # must keep theirs, or every existing output would be remade after an upgrade
    row = JobRow(0, "a", "a cat", "blurry", 42, 25, 7.5, "euler_a", 512, 768, None, None, {"tag": "x"})
    assert row.params_hash() == "a04758a24e2303e25a4f4148179dd364f2c5c46e74a98267552fb2fb7ddc131e"
    assert dataclasses.replace(row, init_image_sha256="f" * 64).params_hash() == row.params_hash()


def test_txt2img_params_hash_from_a_manifest_is_unchanged(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("id,prompt,negative_prompt,seed,steps,cfg_scale,sampler,width,height,tag\n"
                    "r1,a cat,blurry,42,20,7,Euler a,512,768,x\nr2,a dog,,,,,,,,\n")
    rows, failures = resolve_image_sizes(read_manifest(path).rows)
    assert failures == {} and [r.params_hash() for r in rows] == [
        "26c7ee0729a554b53e244d696f4b022ec8eb027a2049c19efe2039136fb8e8a5",
        "6ef1a103674bfbd993b65fc0eca9948f01be09835affa146ed137883b2634bf5"]


def test_img2img_params_hash_covers_the_init_image_bytes(tmp_path):
    img = save_noise(tmp_path / "in.png")
    row = JobRow(0, "a", "p", "", 1, 4, 7.5, "euler", 64, 64, str(img), 0.5, {})
    (first,), _ = resolve_image_sizes([row])
    assert first.init_image_sha256 == inspect_init_image(str(img)).sha256
    save_noise(img, seed=1)                                   # same path, same size, other pixels
    (second,), _ = resolve_image_sizes([row])
    assert second.params_hash() != first.params_hash()


def test_init_image_replaced_in_place_is_made_again(tmp_path):
    save_noise(tmp_path / "in.png", seed=0)
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,prompt,steps,width,height,init_image,strength\n"
                        "t,text only,2,64,64,,\ni,from image,4,64,64,in.png,0.5\n")
    r = run_tiny(manifest)
    assert r.exit_code == 0, r.output
    out = tmp_path / "outputs" / "m"
    before = results(out)
    image_before = (out / "images" / "i.png").read_bytes()

    r = run_tiny(manifest)                                    # nothing changed: nothing made
    assert r.exit_code == 0 and "0 to make, 2 already done" in r.stderr

    save_noise(tmp_path / "in.png", seed=1)                   # replaced in place
    r = run_tiny(manifest)
    assert r.exit_code == 0, r.output
    assert "1 to make, 1 already done" in r.stderr
    after = results(out)
    assert by_id(after, "params_hash")["i"] != by_id(before, "params_hash")["i"]
    assert by_id(after, "finished_at")["t"] == by_id(before, "finished_at")["t"]
    assert (out / "images" / "i.png").read_bytes() != image_before


# ----------------------------------------------------------------------------- 10: FIFO, device, socket

@pytest.fixture
def short_dir():
    """A folder with a short path (a Unix socket's path is at most ~107 bytes)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def special_files(short_dir):
    """name -> path of non-regular files: a FIFO, a link to it, a character device, a socket."""
    fifo = short_dir / "pipe.png"
    os.mkfifo(fifo)
    (short_dir / "link.png").symlink_to(fifo)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(short_dir / "sock.png"))
        yield {"pipe": str(fifo), "link": str(short_dir / "link.png"), "dev": "/dev/zero",
               "sock": str(short_dir / "sock.png")}


def test_fifo_device_and_socket_init_images_fail_their_row_without_being_opened(special_files, monkeypatch, no_hang):
    paths = special_files
    opened = []
    real_os_open, real_open = os.open, builtins.open

    def os_open(path, *a, **kw):
        opened.append(str(path))
        return real_os_open(path, *a, **kw)

    def py_open(file, *a, **kw):
        opened.append(str(file))
        return real_open(file, *a, **kw)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", py_open)
    rows = [JobRow(i, name, "p", "", 1, 4, 7.5, "euler", 64, 64, path, 0.5, {})
            for i, (name, path) in enumerate(paths.items())]
    resolved, failures = resolve_image_sizes(rows)
    monkeypatch.undo()
    assert resolved == [] and not set(opened) & set(paths.values())
    kinds = {"pipe": "a FIFO", "link": "a FIFO", "dev": "a character device", "sock": "a socket"}
    for i, name in enumerate(paths):
        assert f"is not a regular file ({kinds[name]}" in failures[i], failures[i]
    with pytest.raises(Exception, match="not a regular file"):
        load_init_image(paths["pipe"])


def test_fifo_init_image_through_validate_and_run(short_dir, no_hang):
    os.mkfifo(short_dir / "pipe.png")
    manifest = short_dir / "m.csv"
    manifest.write_text("id,prompt,steps,width,height,init_image,strength\n"
                        "ok,x,2,64,64,,\nfifo,y,4,64,64,pipe.png,0.5\n")
    r = invoke("validate", str(manifest))
    assert r.exit_code == 1 and "data row 2 (id 'fifo'), column 'init_image'" in r.stdout
    assert "is not a regular file (a FIFO" in r.stdout
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(short_dir / "out"))
    assert r.exit_code == 1 and "1 ok, 1 failed" in r.stdout
    assert "not a regular file (a FIFO" in by_id(results(short_dir / "out"), "error")["fifo"]


# ----------------------------------------------------------------------------- 16: a foreign part file

def test_foreign_part_file_is_quarantined_and_the_run_goes_on(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,prompt,steps,width,height\na,x,2,64,64\nb,y,2,64,64\n")
    assert run_tiny(manifest).exit_code == 0
    out = tmp_path / "outputs" / "m"
    parts = RunLayout(out).parts_dir
    foreign = parts / "part-00000005.parquet"
    pq.write_table(pa.table({"x": [1, 2], "y": ["u", "v"]}), foreign)
    before = results(out)

    r = run_tiny(manifest)
    assert r.exit_code == 0, r.output
    assert "0 to make, 2 already done" in r.stderr
    assert "part-00000005.parquet" in r.stderr and "not a batchsd journal part" in r.stderr
    assert not foreign.exists() and (parts / "part-00000005.parquet.not-batchsd").is_file()
    assert results(out).select(["id", "status", "finished_at"]).equals(before.select(["id", "status", "finished_at"]))
    r = run_tiny(manifest)                                     # once is enough: no warning again
    assert r.exit_code == 0 and "not a batchsd journal part" not in r.stderr


def test_read_prior_and_compaction_skip_foreign_parts(tmp_path):
    schema = results_schema({})
    j = Journal(tmp_path, schema, ["a"])
    j.append([record("a")])
    parts = j.parts_dir
    pq.write_table(pa.table({"x": [1]}), parts / "part-00000007.parquet")
    pq.write_table(pa.table({"id": [1], "status": ["ok"]}), parts / "part-00000008.parquet")   # id not text
    assert set(read_prior(tmp_path)) == {"a"}                  # read only: skipped, left in place
    assert (parts / "part-00000007.parquet").exists()
    assert j.compact() == 1                                    # a part that appeared after the journal opened
    assert sorted(str(q.path.name) for q in j.quarantined) == ["part-00000007.parquet", "part-00000008.parquet"]
    assert "'id' column is int64" in str(j.quarantined[1])
    reopened = Journal(tmp_path, schema, ["a"])
    assert reopened.quarantined == [] and set(read_prior(tmp_path)) == {"a"}


def test_journal_quarantines_foreign_parts_when_it_opens(tmp_path):
    parts = RunLayout(tmp_path).parts_dir
    parts.mkdir(parents=True)
    pq.write_table(pa.table({"x": [1]}), parts / "part-00000001.parquet")
    (parts / "part-00000001.parquet.not-batchsd").write_text("an earlier one")
    j = Journal(tmp_path, results_schema({}), ["a"])
    (q,) = j.quarantined
    assert q.moved_to == parts / "part-00000001.parquet.not-batchsd.1" and q.moved_to.is_file()
    assert "no 'id' or 'status' column" in str(q) and j.part_files() == {}


# ----------------------------------------------------------------------------- 20: a CSV field larger than a block

def test_csv_with_a_50_mb_field_reads(tmp_path):
    big = "word " * (10 * 2**20)                               # 50 MiB in one cell
    manifest = tmp_path / "m.csv"
    manifest.write_text(f'prompt,steps,width,height,notes\na cat,2,64,64,"{big}"\na dog,2,64,64,short\n')
    m = read_manifest(manifest)
    assert m.problems == [] and [len(r.extra["notes"]) for r in m.rows] == [len(big), 5]
    r = invoke("validate", str(manifest))
    assert r.exit_code == 0 and "ready to run" in r.stdout


def test_csv_row_over_the_block_limit_names_the_row_and_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_mod, "CSV_MAX_BLOCK_SIZE", 2**20)
    manifest = tmp_path / "m.csv"
    rows = "".join(f"p{i},x\n" for i in range(5))
    manifest.write_text(f'prompt,notes\n{rows}big,"{"y" * (2 * 2**20)}"\nafter,z\n')
    problem, = read_manifest(manifest).problems
    assert "data row " in problem.message and f"{2**20:,} bytes" in problem.message
    assert "Parquet" in problem.message
    assert int(problem.message.split("data row ")[1].split()[0]) <= 6


def test_malformed_csv_rows_are_listed_by_row(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text('prompt,steps\na,1\n"two\nlines",2\nb,1,2\nc\nd,3\n')
    m = read_manifest(manifest)
    assert [(p.row, p.column) for p in m.problems] == [(3, None), (4, None)]
    assert "has 3 field(s) but the header has 2" in m.problems[0].message and "'b,1,2'" in m.problems[0].message
    r = invoke("validate", str(manifest))
    assert r.exit_code == 2 and "data row 3" in r.stdout and "data row 4" in r.stdout


# ----------------------------------------------------------------------------- 21a: library warnings

def corrupt_exif_jpeg(path: Path) -> Path:
    # an EXIF IFD that says 5 entries and holds 1: PIL warns "Corrupt EXIF data"
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 5) + struct.pack("<HHI4s", 0x0112, 3, 1, b"\x01\0\0\0")
    Image.new("RGB", (80, 72), (10, 20, 30)).save(path, exif=b"Exif\x00\x00" + tiff)
    return path


def test_corrupt_exif_warning_is_not_printed(tmp_path):
    img = str(corrupt_exif_jpeg(tmp_path / "in.jpg"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = inspect_init_image(img)
        image = load_init_image(img)
    assert caught == [] and (info.width, info.height) == (80, 72) and image.size == (80, 72)

    manifest = tmp_path / "m.csv"
    manifest.write_text("id,prompt,steps,init_image,strength\ni,x,4,in.jpg,0.5\n")
    r = invoke("validate", str(manifest))
    assert r.exit_code == 0 and "EXIF" not in r.output
    r = run_tiny(manifest)
    assert r.exit_code == 0 and "EXIF" not in r.output, r.output


def test_16_bit_grayscale_init_images_are_scaled_and_32_bit_ones_refused(tmp_path):
    """PIL's convert("RGB") clips 16-bit grayscale to white; batchsd scales it to 8 bits. 32-bit
    integer or float pixels have no range to rely on: the row fails from the header, naming the fix."""
    ramp = (np.arange(4096).reshape(64, 64) * 16).astype(np.uint16)       # 0 .. 65520
    for name in ("g16.png", "g16.tif"):
        Image.fromarray(ramp).save(tmp_path / name)
        pixels = np.asarray(load_init_image(str(tmp_path / name)))
        assert pixels.shape == (64, 64, 3) and (pixels[..., 0] == pixels[..., 2]).all()
        assert np.abs(pixels[..., 0].astype(int) - np.round(ramp / 257.0)).max() == 0
        from batchsd.model.pipeline import image_to_tensor   # the Python API reads it the same way
        import torch
        with Image.open(tmp_path / name) as im:
            assert torch.equal(image_to_tensor(im, 64, 64), image_to_tensor(Image.fromarray(pixels), 64, 64))
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "f32.tif")
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "i32.tif")
    for name, kind in (("f32.tif", "32-bit float"), ("i32.tif", "32-bit integer")):
        with pytest.raises(InputError, match=f"has {kind} pixels.*save it as an 8- or 16-bit PNG"):
            inspect_init_image(str(tmp_path / name))


def test_part_named_fifo_or_folder_is_ignored(tmp_path, no_hang):
    j = Journal(tmp_path, results_schema({}), ["a"])
    j.append([record("a")])
    os.mkfifo(j.parts_dir / "part-00000009.parquet")
    (j.parts_dir / "part-00000010.parquet").mkdir()
    reopened = Journal(tmp_path, results_schema({}), ["a"])
    assert set(reopened.part_files()) == {0} and set(read_prior(tmp_path)) == {"a"}
    reopened.append([record("b")])                            # a new part never lands on them
    assert reopened.compact() == 1 and set(read_prior(tmp_path)) == {"a", "b"}


def test_init_image_urls_nul_characters_and_tiny_strengths_are_row_problems(tmp_path):
    """No traceback and no endless loop: each is a problem of its row, with a fix that works."""
    from batchsd.job.manifest import read_manifest
    from batchsd.model.request import img2img_steps

    table = pa.table({"id": ["zero", "url", "tiny", "denormal", "close", "ok"],
                      "prompt": ["p"] * 6,
                      "init_image": ["a\0.png", "https://example.com/a.png", "a.png", "a.png", "a.png", None],
                      "strength": [0.5, 0.5, 1e-300, 5e-324, 0.3333, None],
                      "steps": [2, 2, 2, 2, 3, 2]})
    pq.write_table(table, tmp_path / "m.parquet")
    m = read_manifest(tmp_path / "m.parquet")
    found = {(p.row, p.column): p.message for p in m.problems}
    assert set(found) == {(1, "init_image"), (2, "init_image"), (3, "strength"), (4, "strength"), (5, "strength")}
    assert "NUL" in found[(1, "init_image")] and "is a URL" in found[(2, "init_image")]
    assert "raise strength to at least 0.5" in found[(3, "strength")] and "steps to" not in found[(3, "strength")]
    assert "raise strength to at least 0.3334 or steps to at least 4" in found[(5, "strength")]
    assert img2img_steps(3, 0.3334) == 1 and img2img_steps(4, 0.3333) == 1
    assert [r.id for r in m.rows] == ["ok"]


def test_an_image_embedded_in_init_image_is_shown_short(tmp_path):
    from batchsd.job.manifest import read_manifest

    png = b"\x89PNG" + bytes(range(256)) * 40
    pq.write_table(pa.table({"prompt": ["x", "y"], "init_image": pa.array([{"bytes": png, "path": None}] * 2)}),
                   tmp_path / "m.parquet")
    m = read_manifest(tmp_path / "m.parquet")
    assert [(p.row, p.column) for p in m.problems] == [(1, "init_image"), (2, "init_image")]
    assert all(len(p.message) < 400 and "save each to a file" in p.message for p in m.problems)


@pytest.mark.parametrize("text, row, closed", [
    ('id,seed,prompt\na,1,a cat\nb,2,"a dog\n', 2, False),
    ('id,seed,prompt\na,1,a cat\nb,2,"a dog', 2, False),
    ('id,seed,prompt\na,1,"a cat\nb,2,a dog\n', 1, False),          # would swallow row b without a word
    ('id,seed,prompt\na,1,a cat\nb,2,"a ""dog"""\n', None, True),
    ('id,seed,prompt\na,1,a cat\nb,2,a 5" dog\n', None, True),
    ('id,seed,prompt\na,1,a cat\nb,2,"two\nlines"', None, True),
])
def test_a_quote_never_closed_at_the_end_of_a_csv_is_a_problem(tmp_path, text, row, closed):
    from batchsd.job.manifest import read_manifest

    path = tmp_path / "m.csv"
    path.write_text(text)
    m = read_manifest(path)
    if closed:
        assert not m.problems and len(m.rows) == 2
    else:
        assert [(p.row, p.column) for p in m.problems] == [(row, "prompt")]
        assert "never closed" in m.problems[0].message
