"""Writer and results journal, without a model: PNG metadata, atomic files, journal/compaction, schema."""
from __future__ import annotations

import json
import threading

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchsd.job import atomic, journal as journal_mod, layout, schema as schema_mod
from batchsd.errors import InputError
from batchsd.job.atomic import atomic_write_bytes
from batchsd.job.journal import Journal, read_prior
from batchsd.job.schema import extra_types_for, results_schema
from batchsd.job.layout import safe_output_path
from batchsd.job.outputs.files import encode_npy
from batchsd.job.png_metadata import a1111_parameters, encode_png
from batchsd.job.writer import BatchResult, ResultWriter


def record(rid: str, **kw) -> dict:
    rec = dict(id=rid, prompt=f"prompt {rid}", negative_prompt="", seed=1, steps=25, cfg_scale=7.5,
               sampler="dpmpp_2m_karras", width=64, height=64, init_image=None, strength=None,
               params_hash="h-" + rid)
    rec.update(kw)
    return rec


def result(rid: str, status="ok", **kw) -> dict:
    # no image named: compaction leaves out ok records whose files are not in place (tested below)
    rec = record(rid, status=status, error=None if status == "ok" else "boom", image_path=None,
                 model="m", model_sha256="abc", elapsed_s=0.5, finished_at=schema_mod.now_utc())
    rec.update(kw)
    return rec


# ----------------------------------------------------------------------------- PNG metadata

def test_a1111_parameters_txt2img_and_img2img():
    rec = record("a", prompt="a cat, oil", negative_prompt="blurry", seed=123, steps=25, cfg_scale=7.5,
                 sampler="dpmpp_2m_karras", width=512, height=768)
    rec.update(model="v1-5-pruned-emaonly", model_sha256="6ce0161689" + "0" * 54)   # the record's own model
    assert a1111_parameters(rec) == (
        "a cat, oil\nNegative prompt: blurry\n"
        "Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 123, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly")
    # empty negative prompt: no line (as A1111); img2img: denoising strength; A1111 sampler names
    rec = record("b", prompt="p", sampler="euler_a", cfg_scale=7.0, init_image="in.png", strength=0.6,
                 model="tiny-random", model_sha256=None)
    text = a1111_parameters(rec)
    assert text == "p\nSteps: 25, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, Model: tiny-random, " \
                   "Denoising strength: 0.6"
    for name, shown in [("ddim", "DDIM"), ("ddpm", "DDPM"), ("euler", "Euler"), ("dpmpp_2m", "DPM++ 2M")]:
        assert f"Sampler: {shown}," in a1111_parameters(record("c", sampler=name, model="m"))


def test_png_text_chunks_round_trip_including_non_latin1(tmp_path):
    image = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))
    params = "un chat \u732b \U0001F431\nSteps: 2"
    data = encode_png(image, params, json.dumps({"id": "x", "prompt": "\u732b"}))
    (tmp_path / "x.png").write_bytes(data)
    with Image.open(tmp_path / "x.png") as im:
        assert im.text["parameters"] == params
        assert json.loads(im.text["batchsd"]) == {"id": "x", "prompt": "\u732b"}
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(image))
    assert encode_png(image, params, "{}") == encode_png(image, params, "{}")  # deterministic bytes


def test_encode_npy_float32(tmp_path):
    latent = np.random.default_rng(0).standard_normal((4, 8, 12))
    (tmp_path / "l.npy").write_bytes(encode_npy(latent))
    back = np.load(tmp_path / "l.npy")
    assert back.dtype == np.float32 and back.shape == (4, 8, 12)
    assert np.allclose(back, latent, atol=1e-6)


def test_safe_output_path_refuses_escapes(tmp_path):
    (tmp_path / "images").mkdir()
    assert safe_output_path(tmp_path, "images", "ok-1.a", ".png") == tmp_path / "images" / "ok-1.a.png"
    for bad in ["../x", "..", "a/b", "/etc/passwd", "", ".", "a\\b"]:
        with pytest.raises(InputError):
            safe_output_path(tmp_path, "images", bad, ".png")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "latents").symlink_to(tmp_path / "elsewhere")       # a linked folder is never written into
    with pytest.raises(InputError, match="not a plain folder"):
        safe_output_path(tmp_path, "latents", "ok", ".npy")


# ----------------------------------------------------------------------------- atomic files

def test_atomic_write_leaves_no_temp_and_respects_umask(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]
    assert (path.stat().st_mode & 0o777) == atomic.FILE_MODE
    # a stale temp from a killed run is removed by remove_stale_temps, real files are not
    (path.parent / ".g.png.abc123.tmp").write_bytes(b"half")
    assert atomic.remove_stale_temps(path.parent) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]


# ----------------------------------------------------------------------------- journal

def test_extra_column_types_inferred_over_whole_manifest():
    recs = [{"a": 1, "b": 1, "c": "x", "d": True, "e": None, "f": [1]},
            {"a": 2, "b": 2.5, "c": 3, "d": False, "e": None, "f": None}]
    types = extra_types_for(recs, ["a", "b", "c", "d", "e", "f"])
    assert types == {"a": pa.int64(), "b": pa.float64(), "c": pa.string(), "d": pa.bool_(), "e": pa.string(),
                     "f": pa.string()}
    table = schema_mod.records_to_table([result("x", **recs[0]), result("y", **recs[1])], results_schema(types))
    assert table.column("c").to_pylist() == ["x", "3"]
    assert table.column("f").to_pylist() == ["[1]", None]
    assert table.column("b").to_pylist() == [1.0, 2.5]


def test_append_writes_one_file_and_touches_nothing_else(tmp_path):
    schema = results_schema({})
    j = Journal(tmp_path, schema, ["a", "b", "c"])
    j.append([result("a")])
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    j.append([result("b"), result("c")])
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    new = set(after) - set(before)
    assert len(new) == 1 and next(iter(new)).parent == layout.RunLayout(tmp_path).parts_dir
    assert all(after[p] == t for p, t in before.items())          # old parts untouched
    assert not (tmp_path / layout.RESULTS_FILE).exists()          # not rewritten per batch
    assert set(read_prior(tmp_path)) == {"a", "b", "c"}


def test_compaction_interval_doubles(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_mod, "COMPACT_MIN_ROWS", 4)
    ids = [f"r{i}" for i in range(64)]
    j = Journal(tmp_path, results_schema({}), ids)
    compactions = []
    for i in range(0, 64, 2):
        j.append([result(ids[i]), result(ids[i + 1])])
        if j.should_compact():
            compactions.append(j.compact())
    assert compactions == [4, 8, 16, 32, 64]   # rows in results.parquet at each compaction
    assert len(j.part_files()) == 1


@pytest.mark.parametrize("earlier", ["finished", "killed", "unreadable part"])
def test_reopened_journal_keeps_the_doubled_interval(tmp_path, monkeypatch, earlier):
    """A resumed run over 64 earlier rows compacts first after 64 new rows, not after
    COMPACT_MIN_ROWS: also when the earlier run was killed after its last compaction (parts
    appended since, not folded) or an unreadable part older than its compacted one is left."""
    monkeypatch.setattr(journal_mod, "COMPACT_MIN_ROWS", 4)
    ids = [f"r{i}" for i in range(160)]
    first = Journal(tmp_path, results_schema({}), ids)
    first.append([result(i) for i in ids[:32]])
    first.append([result(i) for i in ids[32:64]])
    first.compact()                                    # one part of 64 rows, as a finished run leaves it
    if earlier == "killed":
        first.append([result(i) for i in ids[64:70]])
        first.append([result(i) for i in ids[70:72]])
    elif earlier == "unreadable part":
        (layout.RunLayout(tmp_path).parts_dir / "part-00000000.parquet").write_bytes(b"not parquet")
    parts_before = len(first.part_files())
    j = Journal(tmp_path, results_schema({}), ids)
    assert j.rows_at_compaction == 64
    new = ids[72:]
    compacted_after = None
    for n in range(2, len(new) + 1, 2):
        j.append([result(new[n - 2]), result(new[n - 1])])
        if j.should_compact():
            compacted_after = n
            break
    assert compacted_after == 64                       # was 4: all 64 earlier rows folded after 4 new ones
    assert len(j.part_files()) == parts_before + 32    # nothing folded before then


def test_results_leave_out_ok_rows_whose_files_are_gone(tmp_path):
    """An image deleted by hand after its row was made: the run makes the row again, and until it
    has, the results table (rewritten at an interrupt or a write failure too) does not call it ok."""
    (tmp_path / "images").mkdir()
    (tmp_path / "latents").mkdir()
    for name in ("images/a.png", "images/b.png", "latents/a.npy"):
        (tmp_path / name).write_bytes(b"x")
    j = Journal(tmp_path, results_schema({}), ["a", "b", "c", "d", "e"])
    j.append([result("a", image_path="images/a.png", latents_path="latents/a.npy"),
              result("b", image_path="images/b.png", latents_path="latents/b.npy"),   # its latents are gone
              result("c", image_path="images/c.png"),                                 # its image is gone
              result("d", status="error"), result("e")])
    assert j.compact() == 3
    assert pq.read_table(tmp_path / layout.RESULTS_FILE).column("id").to_pylist() == ["a", "d", "e"]
    assert set(read_prior(tmp_path)) == {"a", "b", "c", "d", "e"}      # the journal itself keeps them all


def test_latest_record_wins_and_results_follow_manifest_order(tmp_path):
    schema = results_schema({})
    j = Journal(tmp_path, schema, ["c", "a", "b"])
    j.append([result("a", status="error"), result("b"), result("zz")])
    j.append([result("a", params_hash="new")])
    prior = read_prior(tmp_path)
    assert prior["a"].status == "ok" and prior["a"].params_hash == "new"
    j.compact()
    t = pq.read_table(tmp_path / layout.RESULTS_FILE)
    assert t.column("id").to_pylist() == ["a", "b"]          # manifest order; unknown id "zz" left out
    assert t.column("params_hash").to_pylist() == ["new", "h-b"]
    assert t.schema.equals(schema)
    # the journal still knows "zz" (folded into one part), a resume reads the same state
    assert set(read_prior(tmp_path)) == {"a", "b", "zz"} and len(j.part_files()) == 1
    # a crash after the folded part was written but before old parts were deleted changes nothing
    j.append([result("c")])
    j2 = Journal(tmp_path, schema, ["c", "a", "b"])
    assert j2.next_seq == j.next_seq
    assert read_prior(tmp_path)["a"].params_hash == "new"


def test_compaction_across_runs_with_changed_extra_types(tmp_path):
    j1 = Journal(tmp_path, results_schema({"note": pa.int64(), "old": pa.string()}), ["a", "b"])
    j1.append([result("a", note=5, old="x")])
    j2 = Journal(tmp_path, results_schema({"note": pa.string()}), ["a", "b"])
    j2.append([result("b", note="hello")])
    j2.compact()
    df = pd.read_parquet(tmp_path / layout.RESULTS_FILE)
    assert list(df["id"]) == ["a", "b"] and list(df["note"]) == ["5", "hello"]
    assert "old" not in df.columns
    # int values met by a float column later are cast, not stringified
    other = tmp_path / "other"
    Journal(other, results_schema({"note": pa.int64()}), ["a", "b"]).append([result("a", note=5)])
    j3 = Journal(other, results_schema({"note": pa.float64()}), ["a", "b"])
    j3.append([result("b", note=1.5)])
    j3.compact()
    t = pq.read_table(other / layout.RESULTS_FILE)
    assert t.schema.field("note").type == pa.float64() and t.column("note").to_pylist() == [5.0, 1.5]


# ----------------------------------------------------------------------------- writer thread

def _image(v: int) -> Image.Image:
    return Image.fromarray(np.full((64, 64, 3), v, dtype=np.uint8))


def test_writer_writes_images_records_and_failures(tmp_path):
    j = Journal(tmp_path, results_schema({}), ["a", "b", "c"])
    seen = []
    w = ResultWriter(tmp_path, j, save_latents=True, on_written=lambda ok, bad: seen.append((ok, bad)))
    lat = np.zeros((2, 4, 8, 8), np.float32)
    mine = dict(model="m", model_sha256="f" * 64)
    w.submit(BatchResult(records=[record("a", **mine), record("b", **mine)], images=[_image(1), _image(2)], latents=lat,
                         errors=[None, None], elapsed_s=2.0))
    w.submit(BatchResult(records=[record("c", model="other", model_sha256="e" * 64)], images=[None],
                         errors=["init image not found: x.png"]))
    w.close()
    j.compact()
    assert seen == [(2, 0), (0, 1)]
    df = pd.read_parquet(tmp_path / layout.RESULTS_FILE).set_index("id")
    assert list(df["status"]) == ["ok", "ok", "error"]
    assert df.loc["c", "error"] == "init image not found: x.png" and pd.isna(df.loc["c", "image_path"])
    assert list(df["model"]) == ["m", "m", "other"]    # each record's own model: rows of a run may differ
    assert df.loc["a", "image_path"] == "images/a.png" and df.loc["a", "latents_path"] == "latents/a.npy"
    import hashlib
    assert df.loc["a", "image_sha256"] == hashlib.sha256((tmp_path / "images/a.png").read_bytes()).hexdigest()
    assert df.loc["a", "elapsed_s"] == pytest.approx(1.0)
    assert str(df["finished_at"].dtype) == "datetime64[us, UTC]"
    with Image.open(tmp_path / "images/b.png") as im:
        assert "Model hash: ffffffffff, Model: m" in im.text["parameters"]
        assert json.loads(im.text["batchsd"])["params_hash"] == "h-b"
    assert np.load(tmp_path / "latents/a.npy").shape == (4, 8, 8)


def test_writer_failure_reaches_the_main_thread(tmp_path):
    j = Journal(tmp_path, results_schema({}), ["a"])

    def broken(records):
        raise OSError(28, "No space left on device")

    j.append = broken
    w = ResultWriter(tmp_path, j, save_latents=False)
    w.submit(BatchResult(records=[record("a")], images=[_image(0)], errors=[None]))
    with pytest.raises(RuntimeError, match="No space left"):
        w.close()
    assert not any(t.name == "batchsd-writer" and t.is_alive() for t in threading.enumerate())
    # the image may be in place, but no record names it: a resume makes the row again
    assert read_prior(tmp_path) == {}


# ----------------------------------------------------------------------------- progress display

def test_progress_plain_lines_and_rich_bar():
    import io

    from rich.console import Console

    from batchsd.job.progress import RunProgress, format_duration

    stream = io.StringIO()
    with RunProgress(10, Console(file=stream), stream=stream) as p:   # not a terminal: one line per batch
        p.update(3, 0)
        p.update(2, 1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[1].startswith("[batchsd] batch 2: 6/10 rows (60.0%), 1 failed, ") and "img/s" in lines[1]
    assert "ETA " in lines[1]
    assert format_duration(3725) == "1:02:05" and format_duration(None) == "?"

    term = io.StringIO()
    console = Console(file=term, force_terminal=True, width=120)
    with RunProgress(4, console) as p:                                 # a terminal: the rich bar
        assert p.rich_bar
        p.update(4, 0)
    out = term.getvalue()
    assert "4/4" in out and "img/s" in out and "0 failed" in out


def test_unreadable_part_is_skipped_not_deleted(tmp_path):
    j = Journal(tmp_path, results_schema({}), ["a", "b"])
    j.append([result("a")])
    bad = layout.RunLayout(tmp_path).parts_dir / "part-00000001.parquet"
    bad.write_bytes(b"PAR1 not really")
    j2 = Journal(tmp_path, results_schema({}), ["a", "b"])
    assert [p for p, _ in j2.unreadable] == [bad]                  # for the run's warning
    j2.append([result("b")])
    assert set(read_prior(tmp_path)) == {"a", "b"}
    j2.compact()
    assert bad.exists()
    assert list(pd.read_parquet(tmp_path / layout.RESULTS_FILE)["id"]) == ["a", "b"]


def test_a_part_with_a_damaged_column_is_unreadable_everywhere(tmp_path):
    """Damage inside a column chunk that the resume columns do not read (the prompt's): the part is
    listed for the warning and skipped by read_prior as by compaction, so its rows are made again,
    never counted done with a record the results cannot hold."""
    j = Journal(tmp_path, results_schema({}), ["a", "b"])
    j.append([result("a", prompt="x" * 5000)])
    part = layout.RunLayout(tmp_path).parts_dir / "part-00000000.parquet"
    meta = pq.ParquetFile(part).metadata.row_group(0)
    prompt = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == "prompt")
    data = bytearray(part.read_bytes())
    start = prompt.data_page_offset + 20
    data[start:start + 40] = b"\xab" * 40
    part.write_bytes(bytes(data))
    with pytest.raises(Exception):
        pq.read_table(part)
    assert pq.read_table(part, columns=["id", "status"]).num_rows == 1      # the resume columns still read
    j2 = Journal(tmp_path, results_schema({}), ["a", "b"])
    assert [p for p, _ in j2.unreadable] == [part]
    assert read_prior(tmp_path) == {}
