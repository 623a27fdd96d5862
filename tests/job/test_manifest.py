"""Manifest reading and validation: defaults, CSV/Parquet equivalence, every bad-input case."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchsd.job.manifest import read_manifest
from batchsd.model.request import DEFAULT_SAMPLER
from batchsd.job.rows import JobRow, ManifestProblem, default_id, id_problem, seed_from_id

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "jobs"


def write_csv(tmp_path: Path, text: str, name: str = "m.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def write_parquet(tmp_path: Path, columns: dict, name: str = "m.parquet") -> Path:
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return path


def problems_of(path) -> list[tuple]:
    return [(p.row, p.column) for p in read_manifest(path).problems]


def only_problem(path) -> ManifestProblem:
    m = read_manifest(path)
    assert len(m.problems) == 1, [str(p) for p in m.problems]
    return m.problems[0]


# ----------------------------------------------------------------------------- defaults

def test_defaults_from_prompt_only(tmp_path):
    m = read_manifest(write_csv(tmp_path, "prompt\na cat\na dog\n"))
    assert m.problems == [] and m.columns == ["prompt"] and m.extra_columns == []
    first, second = m.rows
    assert first == JobRow(index=0, id="00000", prompt="a cat", negative_prompt="", seed=seed_from_id("00000"),
                           steps=25, cfg_scale=7.5, sampler=DEFAULT_SAMPLER, width=512, height=512,
                           init_image=None, strength=None, extra={})
    assert second.id == "00001" and second.seed == seed_from_id("00001") and second.seed != first.seed


def test_empty_cells_mean_default(tmp_path):
    path = write_csv(tmp_path, "id,prompt,negative_prompt,seed,steps,cfg_scale,sampler,width,height\n"
                               ",a cat,,,,,, ,\n")
    (row,) = read_manifest(path).rows
    assert (row.id, row.negative_prompt, row.seed, row.steps, row.cfg_scale, row.sampler, row.width, row.height) \
        == ("00000", "", seed_from_id("00000"), 25, 7.5, "dpmpp_2m_karras", 512, 512)


def test_default_id_width():
    assert default_id(0, 12) == "00000"
    assert default_id(7, 99_999) == "00007"
    assert default_id(7, 100_000) == "000007"   # width of the row count
    assert default_id(123_456, 1_000_000) == "0123456"


def test_seed_derivation_is_stable():
    # pinned: changing it would change every default-seeded image
    assert seed_from_id("fox_forest") == 5011701831158760342
    assert seed_from_id("00000") == 7423105123500194756
    digest = hashlib.sha256(b"anything").digest()
    assert seed_from_id("anything") == int.from_bytes(digest[:8], "big") & (2**63 - 1)
    assert all(0 <= seed_from_id(str(i)) < 2**63 for i in range(1000))


def test_mixed_given_and_default_ids(tmp_path):
    m = read_manifest(write_csv(tmp_path, "id,prompt\nfirst,a\n,b\nthird,c\n"))
    assert [r.id for r in m.rows] == ["first", "00001", "third"]


def test_img2img_defaults_and_paths(tmp_path):
    absolute = str(tmp_path / "elsewhere" / "b.png")
    path = write_csv(tmp_path, f"prompt,init_image,strength,width\nx,sub/a.png,,\ny,{absolute},0.5,256\n")
    a, b = read_manifest(path).rows
    assert a.init_image == str(tmp_path / "sub" / "a.png") and os.path.isabs(a.init_image)
    assert a.init_image_given == "sub/a.png" and a.strength == 0.75 and a.denoise_steps == 18
    assert (a.width, a.height) == (None, None)          # from the image, resolved by the planner
    assert b.init_image == absolute and b.strength == 0.5 and (b.width, b.height) == (256, None)
    assert a.to_record()["init_image"] == "sub/a.png"   # as given


def test_manifest_relative_paths_use_the_manifest_folder(tmp_path, monkeypatch):
    (tmp_path / "jobs").mkdir()
    write_csv(tmp_path / "jobs", "prompt,init_image\nx,a.png\n")
    monkeypatch.chdir(tmp_path)
    (row,) = read_manifest(Path("jobs/m.csv")).rows
    assert row.init_image == str(tmp_path / "jobs" / "a.png")


def test_samplers_canonical_and_a1111(tmp_path):
    names = ["ddpm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras",
             "DDPM", "DDIM", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "dpm++ 2m karras"]
    text = "prompt,sampler\n" + "".join(f"p,{n}\n" for n in names)
    rows = read_manifest(write_csv(tmp_path, text)).rows
    assert [r.sampler for r in rows] == ["ddpm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras",
                                         "ddpm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras",
                                         "dpmpp_2m_karras"]


def test_whole_floats_accepted(tmp_path):
    path = write_csv(tmp_path, "prompt,seed,steps,width,height,cfg_scale\nx,12.0,25.0,5.12e2,64,7\n"
                               "y,9007199254740993.0, 4 ,64,64,1e1\n")
    a, b = read_manifest(path).rows
    assert (a.seed, a.steps, a.width, a.height, a.cfg_scale) == (12, 25, 512, 64, 7.0)
    assert type(a.steps) is int and type(a.seed) is int and type(a.cfg_scale) is float
    assert (b.seed, b.steps, b.cfg_scale) == (2**53 + 1, 4, 10.0)   # text is parsed exactly



def test_utf16_and_semicolon_csv_get_the_fix(tmp_path):
    (tmp_path / "u16.csv").write_bytes("prompt,seed\na,1\n".encode("utf-16"))           # with a BOM
    (tmp_path / "u16le.csv").write_bytes("prompt,seed\na,1\n".encode("utf-16-le"))     # without
    for name in ("u16.csv", "u16le.csv"):
        problem, = read_manifest(tmp_path / name).problems
        assert "it looks like UTF-16" in problem.message and "save it as UTF-8" in problem.message
    problem, = read_manifest(write_csv(tmp_path, "prompt;seed\na;1\n")).problems
    assert "separated by ';', but a .csv manifest is comma-separated" in problem.message


def test_parquet_decimal_columns_are_numbers(tmp_path):
    from decimal import Decimal

    path = write_parquet(tmp_path, {"prompt": pa.array(["x"]), "cfg_scale": pa.array([Decimal("7.5")], pa.decimal128(4, 2)),
                                    "steps": pa.array([Decimal("20")], pa.decimal128(5, 0))})
    row, = read_manifest(path).rows
    assert (row.cfg_scale, row.steps) == (7.5, 20) and type(row.steps) is int


def test_parquet_types_and_nan_means_default(tmp_path):
    # what pandas writes for a numeric column with gaps: float64 with NaN
    path = write_parquet(tmp_path, {
        "id": pa.array([1, 2, 3]),                         # integer ids become text
        "prompt": pa.array(["a", "b", "c"]).dictionary_encode(),
        "seed": pa.array([5.0, float("nan"), None]),
        "steps": pa.array([30.0, float("nan"), 10.0]),
        "cfg_scale": pa.array([None, 3, 0], type=pa.int32()),
        "width": pa.array([None, 128, 64], type=pa.int64()),
        "sampler": pa.array(["Euler a", None, "ddim"]),
    })
    m = read_manifest(path)
    assert m.problems == []
    assert [r.id for r in m.rows] == ["1", "2", "3"]
    assert [r.seed for r in m.rows] == [5, seed_from_id("2"), seed_from_id("3")]
    assert [r.steps for r in m.rows] == [30, 25, 10]
    assert [r.cfg_scale for r in m.rows] == [7.5, 3.0, 0.0]
    assert [r.width for r in m.rows] == [512, 128, 64]
    assert [r.sampler for r in m.rows] == ["euler_a", "dpmpp_2m_karras", "ddim"]


def test_arrow_string_kinds_and_row_groups(tmp_path):
    columns = {"id": ["a", "b", "c"], "prompt": ["x", "y", "z"], "negative_prompt": ["n", "n", None],
               "seed": [1, 2, None], "sampler": ["ddim", "Euler a", None], "init_image": [None, "a.png", ""],
               "strength": [None, 0.5, None], "tag": ["t", "t", "u"]}
    results = []
    for kind in ("plain", "dictionary", "large_string"):
        table = {}
        for name, values in columns.items():
            array = pa.array(values)
            if pa.types.is_string(array.type) and kind == "dictionary":
                array = array.dictionary_encode()
            elif pa.types.is_string(array.type) and kind == "large_string":
                array = array.cast(pa.large_string())
            table[name] = array
        path = tmp_path / f"{kind}.parquet"
        pq.write_table(pa.table(table), path, row_group_size=2)   # two chunks per column
        m = read_manifest(path)
        assert m.problems == []
        results.append(m.rows)
    assert results[0] == results[1] == results[2]
    assert [(r.sampler, r.init_image_given, r.strength, r.extra["tag"]) for r in results[0]] == [
        ("ddim", None, None, "t"), ("euler_a", "a.png", 0.5, "t"), ("dpmpp_2m_karras", None, None, "u")]


def test_row_with_several_problems_lists_them_all(tmp_path):
    path = write_csv(tmp_path, "id,prompt,steps,width,sampler\nok,a,4,64,ddim\na/b, ,0,65,nope\n")
    m = read_manifest(path)
    assert [(p.row, p.column) for p in m.problems] == [(2, "id"), (2, "prompt"), (2, "steps"), (2, "sampler"),
                                                       (2, "width")]


def test_pass_through_columns(tmp_path):
    path = write_csv(tmp_path, "tag,prompt,note,steps\nfoo,a,007,4\n,b,x y,5\n")
    m = read_manifest(path)
    assert m.columns == ["tag", "prompt", "note", "steps"] and m.extra_columns == ["tag", "note"]
    a, b = m.rows
    assert a.extra == {"tag": "foo", "note": "007"}            # CSV cells as text, untouched
    assert b.extra == {"tag": None, "note": "x y"}             # an empty cell is null
    record = a.to_record()
    assert list(record)[:11] == ["id", "prompt", "negative_prompt", "seed", "steps", "cfg_scale", "sampler",
                                 "width", "height", "init_image", "strength"]
    assert record["tag"] == "foo" and record["note"] == "007" and record["steps"] == 4

    ppath = write_parquet(tmp_path, {"prompt": ["a"], "score": [0.5], "flag": [True]})
    (row,) = read_manifest(ppath).rows
    assert row.extra == {"score": 0.5, "flag": True}           # Parquet values with their types


def test_csv_quoting_newlines_and_bom(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes('\ufeffid,prompt\nq1,"a, b\nsecond line ""quoted"""\n'.encode())
    (row,) = read_manifest(path).rows
    assert row.id == "q1" and row.prompt == 'a, b\nsecond line "quoted"'
    path.write_bytes(b'id,prompt,steps\r\nq1,"x\r\ny",4\r\nq2,z,\r\n')     # Windows line ends
    assert [(r.id, r.prompt, r.steps) for r in read_manifest(path).rows] == [("q1", "x\r\ny", 4), ("q2", "z", 25)]


def test_csv_and_parquet_parse_the_same(tmp_path):
    csv_path = write_csv(tmp_path, "id,prompt,seed,steps,cfg_scale,sampler,width,height,init_image,strength,tag\n"
                                   "a,x,1,20,7.5,Euler a,64,128,,,t1\n"
                                   "b,y,,25,,,,,in.png,0.5,t2\n")
    pq_path = write_parquet(tmp_path, {
        "id": ["a", "b"], "prompt": ["x", "y"], "seed": pa.array([1, None], pa.int64()), "steps": [20, 25],
        "cfg_scale": [7.5, None], "sampler": ["Euler a", None], "width": pa.array([64, None], pa.int64()),
        "height": pa.array([128, None], pa.int64()), "init_image": [None, "in.png"], "strength": [None, 0.5],
        "tag": ["t1", "t2"]})
    from_csv, from_pq = read_manifest(csv_path), read_manifest(pq_path)
    assert from_csv.problems == from_pq.problems == []
    assert from_csv.rows == from_pq.rows and from_csv.columns == from_pq.columns
    assert [r.params_hash() for r in from_csv.rows] == [r.params_hash() for r in from_pq.rows]


def test_example_manifests(tmp_path):
    from_csv, from_pq = read_manifest(JOBS / "prompts.csv"), read_manifest(JOBS / "prompts.parquet")
    assert from_csv.problems == from_pq.problems == []
    assert from_csv.rows == from_pq.rows and len(from_csv.rows) == 12
    rows = from_csv.rows
    assert from_csv.extra_columns == ["tag"]
    assert {r.sampler for r in rows} >= {"euler_a", "ddim", "dpmpp_2m_karras", "ddpm", "euler", "dpmpp_2m"}
    assert any(r.width != r.height for r in rows if r.width)
    img2img = [r for r in rows if r.init_image]
    assert len(img2img) == 2 and all(Path(r.init_image) == JOBS / "init_landscape.png" for r in img2img)
    assert (JOBS / "init_landscape.png").stat().st_size < 20_000
    # make_examples.py reproduces the shipped files
    sys.path.insert(0, str(JOBS))
    try:
        import make_examples
    finally:
        sys.path.remove(str(JOBS))
    make_examples.write_manifests(tmp_path / "p.csv", tmp_path / "p.parquet")
    assert (tmp_path / "p.csv").read_bytes() == (JOBS / "prompts.csv").read_bytes()
    assert pq.read_table(tmp_path / "p.parquet").equals(pq.read_table(JOBS / "prompts.parquet"))


# ----------------------------------------------------------------------------- params_hash

def test_params_hash():
    row = JobRow(0, "a", "p", "", 1, 25, 7.5, "euler", 512, 512, None, None, {})
    assert row.params_hash() == JobRow(5, "other_id", "p", "", 1, 25, 7.5, "euler", 512, 512, None, None,
                                       {"tag": "x"}).params_hash()   # not id, index or extras
    changed = [row.__class__(0, "a", "p2", "", 1, 25, 7.5, "euler", 512, 512, None, None, {}),
               JobRow(0, "a", "p", "n", 1, 25, 7.5, "euler", 512, 512, None, None, {}),
               JobRow(0, "a", "p", "", 2, 25, 7.5, "euler", 512, 512, None, None, {}),
               JobRow(0, "a", "p", "", 1, 26, 7.5, "euler", 512, 512, None, None, {}),
               JobRow(0, "a", "p", "", 1, 25, 7.0, "euler", 512, 512, None, None, {}),
               JobRow(0, "a", "p", "", 1, 25, 7.5, "ddim", 512, 512, None, None, {}),
               JobRow(0, "a", "p", "", 1, 25, 7.5, "euler", 512, 576, None, None, {}),
               JobRow(0, "a", "p", "", 1, 25, 7.5, "euler", 512, 512, "/x.png", 0.5, {}),
               JobRow(0, "a", "p", "", 1, 25, 7.5, "euler", 512, 512, "/x.png", 0.6, {})]
    hashes = {r.params_hash() for r in changed} | {row.params_hash()}
    assert len(hashes) == len(changed) + 1
    # pinned: the resume key must not change between versions by accident
    assert row.params_hash() == "cd6e42ef7acf913d100880156f7831b44e71b70ae8a38b24dacfdd8387b6cfe5"


# ----------------------------------------------------------------------------- bad rows

@pytest.mark.parametrize("cell, column, words", [
    ("steps=25.5", "steps", "whole number"),
    ("steps=abc", "steps", "not a number"),
    ("steps=0", "steps", "1 to 999"),
    ("steps=1000", "steps", "1 to 999"),
    ("steps=nan", "steps", "not a number"),
    ("steps=1_000", "steps", "not a number"),           # Python's int() reads these; a manifest must not
    ("steps=\u0663", "steps", "not a number"),           # ARABIC-INDIC DIGIT THREE
    ("seed=\u0e52", "seed", "not a number"),             # THAI DIGIT TWO
    ("seed=\u0663-\u0665", "seed", "not a number"),
    ("steps=0x10", "steps", "not a number"),
    ("steps=inf", "steps", "not finite"),
    ("seed=-1", "seed", "2**63-1"),
    (f"seed={2**63}", "seed", "2**63-1"),
    ("seed=1.5", "seed", "whole number"),
    ("cfg_scale=-1", "cfg_scale", ">= 0"),
    ("cfg_scale=inf", "cfg_scale", "not finite"),
    ("cfg_scale=NaN", "cfg_scale", "not a number"),
    ("sampler=heun", "sampler", "unknown sampler"),
    ("width=500", "width", "496 or 504"),
    ("height=60", "height", "multiple of 8 from 64 to 2048"),
    ("width=2056", "width", "out of range"),
    ("width=0", "width", "out of range"),
    ("strength=0.5", "strength", "give an init_image"),
    ("id=a/b", "id", "'/'"),
    ("id=a b", "id", "' '"),
    ("id=..", "id", "not a file name"),
    ("id=.", "id", "not a file name"),
    ("id=.hidden", "id", "starts with '.'"),
    ("id=-rf", "id", "starts with '-'"),
    ("id=CON", "id", "reserved"),
    ("id=lpt1.txt", "id", "reserved"),
    ("id=é", "id", "'é'"),
    ("id=" + "x" * 201, "id", "at most 200"),
    ("prompt= ", "prompt", "empty"),
])
def test_bad_cell(tmp_path, cell, column, words):
    name, value = cell.split("=", 1)
    header = ["prompt", "steps"] if name == "prompt" else ["prompt", name]
    good = "ok,4" if name == "prompt" else "ok,"
    row = f"{value},4" if name == "prompt" else f"ok,{value}"
    # a valid row first, so the bad one is data row 2
    path = write_csv(tmp_path, ",".join(header) + f"\n{good}\n{row}\n")
    m = read_manifest(path)
    assert [(p.row, p.column) for p in m.problems] == [(2, column)], [str(p) for p in m.problems]
    assert words in m.problems[0].message
    assert str(m.problems[0]).startswith(f"data row 2, column {column!r}: ")
    assert [r.index for r in m.rows] == [0]            # the bad row is left out


def test_strength_out_of_range_and_zero_denoising_steps(tmp_path):
    path = write_csv(tmp_path, "prompt,init_image,strength,steps\n"
                               "a,x.png,0,10\nb,x.png,1.5,10\nc,x.png,0.1,4\nd,x.png,1,4\ne,x.png,-0.1,\n")
    m = read_manifest(path)
    assert [(p.row, p.column) for p in m.problems] == [(1, "strength"), (2, "strength"), (3, "strength"),
                                                       (5, "strength")]
    zero = m.problems[2].message
    assert "0 denoising steps" in zero and "strength to at least 0.25" in zero and "steps to at least 10" in zero
    assert [r.prompt for r in m.rows] == ["d"]


def test_duplicate_ids_including_case_and_defaults(tmp_path):
    path = write_csv(tmp_path, "id,prompt\nfox,a\nFOX,b\nfox,c\n00004,d\n,e\n")
    m = read_manifest(path)
    assert [(p.row, p.column) for p in m.problems] == [(2, "id"), (3, "id"), (5, "id")]
    assert "differs only by case" in m.problems[0].message and "data row 1" in m.problems[0].message
    assert "same id" in m.problems[1].message
    assert "'00004'" in m.problems[2].message and "default id" in m.problems[2].message  # row 5's default
    assert [r.id for r in m.rows] == ["fox", "00004"]


def test_every_bad_row_is_listed(tmp_path):
    lines = ["prompt,steps,width"] + [f"p{i},{'x' if i % 3 == 0 else 4},{'7' if i % 5 == 0 else 64}"
                                      for i in range(100)]
    m = read_manifest(write_csv(tmp_path, "\n".join(lines) + "\n"))
    expected = sorted([(i + 1, "steps") for i in range(100) if i % 3 == 0] +
                      [(i + 1, "width") for i in range(100) if i % 5 == 0])
    assert [(p.row, p.column) for p in m.problems] == expected
    assert len(m.rows) == sum(1 for i in range(100) if i % 3 and i % 5)
    report = m.format_problems(limit=20).splitlines()
    assert len(report) == 1 + 20 + 1 and f"{len(expected)} problems" in report[0]
    assert "counted from 1" in report[0] and report[-1] == f"  ... and {len(expected) - 20} more problems"


def test_wrong_types_in_parquet(tmp_path):
    path = write_parquet(tmp_path, {
        "prompt": pa.array([1, 2], pa.int64()),
        "steps": pa.array([True, False]),
        "negative_prompt": pa.array([1.0, None]),
        "id": pa.array([1.5, 2.0]),
    })
    m = read_manifest(path)
    assert [(p.row, p.column) for p in m.problems] == [(1, "id"), (1, "prompt"), (1, "negative_prompt"),
                                                       (1, "steps"), (2, "prompt"), (2, "steps")]
    assert "boolean" in m.problems[3].message and "not text" in m.problems[1].message


def test_nan_and_inf_in_parquet(tmp_path):
    path = write_parquet(tmp_path, {"prompt": ["a", "b", "c"], "cfg_scale": [float("nan"), float("inf"), 1.0],
                                    "seed": [float("-inf"), 1.0, 2.0 ** 60]})
    m = read_manifest(path)
    assert [(p.row, p.column) for p in m.problems] == [(1, "seed"), (2, "cfg_scale"), (3, "seed")]
    assert "2**53" in m.problems[2].message


# ----------------------------------------------------------------------------- bad files

def test_missing_prompt_column_and_near_miss_names(tmp_path):
    m = read_manifest(write_csv(tmp_path, "Prompt,Seed,negative prompt\na,1,b\n"))
    assert [(p.row, p.column) for p in m.problems] == [(None, "Prompt"), (None, "Seed"), (None, "negative prompt"),
                                                       (None, "prompt")]
    assert "rename it to 'prompt'" in m.problems[0].message
    assert "rename it to 'negative_prompt'" in m.problems[2].message
    assert "required column 'prompt' is missing" in m.problems[3].message and m.rows == []


def test_duplicate_and_unnamed_columns(tmp_path):
    m = read_manifest(write_csv(tmp_path, ",prompt,seed,seed\n0,a,1,2\n"))
    assert [(p.row, p.column) for p in m.problems] == [(None, None), (None, "seed")]
    assert "column 1 has no name" in m.problems[0].message and "index=False" in m.problems[0].message


@pytest.mark.parametrize("name, content, words", [
    ("m.tsv", b"prompt\na\n", "unsupported file type '.tsv'"),
    ("m", b"prompt\na\n", "(no extension)"),
    ("m.csv", b"", "cannot read"),
    ("m.csv", b"prompt,steps\n", "no rows"),
    ("m.csv", b"prompt\n\xff\xfe bad utf8\n", "cannot read"),
    ("m.parquet", b"this is not parquet", "cannot read the file as Parquet"),
])
def test_bad_files(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    problem = only_problem(path)
    assert problem.row is None and words in problem.message, str(problem)


def test_missing_file_and_folder(tmp_path):
    assert "not found" in only_problem(tmp_path / "nope.csv").message
    (tmp_path / "dir.csv").mkdir()
    assert "not a file" in only_problem(tmp_path / "dir.csv").message


def test_empty_parquet(tmp_path):
    path = write_parquet(tmp_path, {"prompt": pa.array([], pa.string())})
    assert "no rows" in only_problem(path).message


def test_id_problem_accepts_safe_ids():
    for ok in ["a", "A-1", "x.y_z", "0", "ab..c", "con2", "console"]:
        assert id_problem(ok) is None, ok


def test_problem_str():
    assert str(ManifestProblem(3, "steps", "bad")) == "data row 3, column 'steps': bad"
    assert str(ManifestProblem(None, "prompt", "missing")) == "column 'prompt': missing"
    assert str(ManifestProblem(None, None, "empty")) == "empty"
