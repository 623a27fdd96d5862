"""Manifests as people have them: .txt (one prompt a line; A1111 "Prompts from file or textbox"),
.jsonl, `--map` column renames, warnings for columns that look like parameters, and other tools'
sampler names (batchsd/job/manifest_formats.py, column_map.py, batchsd/model/sampler_names.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from batchsd.errors import InputError
from batchsd.job.column_map import parse_column_map
from batchsd.job.manifest import read_manifest
from batchsd.job.rows import ManifestOptions, seed_from_id
from batchsd.model.sampler_names import resolve_sampler
from cli_support import invoke


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def read_ok(path: Path, column_map=()):
    m = read_manifest(path, ManifestOptions(tuple(column_map)))
    assert m.problems == [], [str(p) for p in m.problems]
    return m


# ----------------------------------------------------------------------------- .txt

def test_plain_txt_is_one_prompt_a_line(tmp_path):
    m = read_ok(write(tmp_path / "p.txt", "a cat\n\n  a dog, --style 5  \n(word:1.2) {red}\n"))
    assert [(r.id, r.prompt) for r in m.rows] == [("00000", "a cat"), ("00001", "a dog, --style 5"),
                                                  ("00002", "(word:1.2) {red}")]
    assert m.columns == ["prompt"]


def test_a1111_prompts_file(tmp_path):
    m = read_ok(write(tmp_path / "a.txt",
                      '--prompt "a cat" --steps 20 --cfg_scale 7 --seed 5 --sampler_name "Euler a" '
                      '--negative_prompt "blurry, bad" --width 512 --height 768\n'
                      "\n"
                      "--prompt a dog in the rain --n_iter 2 --batch_size 2 --seed 10 --sampler_name k_dpmpp_2m\n"
                      "--prompt 'it''s \"quoted\"' --seed -1\n"))
    first, *dogs, last = m.rows
    assert (first.prompt, first.negative_prompt, first.steps, first.cfg_scale, first.seed, first.sampler,
            first.width, first.height) == ("a cat", "blurry, bad", 20, 7.0, 5, "euler_a", 512, 768)
    assert [(r.id, r.prompt, r.seed, r.sampler) for r in dogs] == [
        (f"00001-{k}", "a dog in the rain", 10 + k, "dpmpp_2m") for k in range(4)]   # n_iter * batch_size
    assert last.prompt == 'its "quoted"' and last.seed == seed_from_id(last.id)
    assert last.steps == 25 and last.sampler == "dpmpp_2m_karras"       # defaults; --seed -1: from the id


def test_a1111_value_problems_name_the_line(tmp_path):
    m = read_manifest(write(tmp_path / "a.txt", '--prompt "a"\n\n--prompt "b" --steps 5000\n'))
    assert [(p.line, p.row, p.column) for p in m.problems] == [(3, 2, "steps")]
    assert str(m.problems[0]).startswith("line 3 (data row 2), column 'steps': ")


@pytest.mark.parametrize("line, words", [
    ('--prompt "a" --restore_faces true', "--restore_faces is an A1111 option batchsd has no setting for"),
    ('--prompt "a" --cfg 7', "unknown option --cfg"),
    ('--prompt "a" --steps', "--steps has no value"),
    ('--prompt "a', "No closing quotation"),
    ('--steps 4', "has no --prompt"),
    ('--prompt "a" --n_iter two', "--n_iter 'two' is not a whole number"),
    ('--prompt "a" --steps 4 --steps 5', "--steps is given twice"),
    ('--prompt "a" --seed -1 --seed 3', "--seed is given twice"),
    ('--prompt "a" --negative_prompt --steps 2', "--negative_prompt has no value (the next word is the option --steps)"),
    ('--prompt --negative_prompt x', "--prompt has no value (the next word is the option --negative_prompt)"),
    ("plain prompt", "does not start with '--', but line 1 does"),
])
def test_a1111_option_problems_name_the_line(tmp_path, line, words):
    text = '--prompt "ok" --steps 2\n\n' + line + "\n"
    m = read_manifest(write(tmp_path / "a.txt", text))
    assert [p.line for p in m.problems] == [3] and words in m.problems[0].message
    r = invoke("validate", str(tmp_path / "a.txt"))
    assert r.exit_code == 2 and "line 3: " in r.stdout


# ----------------------------------------------------------------------------- .jsonl

def test_jsonl_rows_with_typed_and_mixed_columns(tmp_path):
    m = read_ok(write(tmp_path / "m.jsonl",
                      '{"prompt": "a cat", "seed": 5, "steps": 20, "labels": ["x", "y"], "score": 0.5}\n'
                      "\n"
                      '{"prompt": "a dog", "seed": "100-101", "cfg_scale": 6}\n'))
    assert [(r.prompt, r.seed, r.steps, r.cfg_scale) for r in m.rows] == [
        ("a cat", 5, 20, 7.5), ("a dog", 100, 25, 6.0), ("a dog", 101, 25, 6.0)]
    assert str(m.extra_types["labels"]) == "list<item: string>" and str(m.extra_types["score"]) == "double"
    assert m.rows[0].extra == {"labels": ["x", "y"], "score": 0.5}
    assert m.rows[1].extra == {"labels": None, "score": None}


@pytest.mark.parametrize("text, words", [
    ('{"prompt": "a"}\n{"prompt": \n', "is not valid JSON"),
    ('{"prompt": "a"}\n["a"]\n', "is a JSON list, not an object"),
    ('{"prompt": "a"}\n{"prompt": "b", "prompt": "c"}\n', "key 'prompt' is given twice in one object"),
    ('{"prompt": "a"}\n{"prompt": "b", "seed": NaN}\n', "NaN is not a JSON value"),
])
def test_jsonl_problems_name_the_line(tmp_path, text, words):
    m = read_manifest(write(tmp_path / "m.jsonl", text))
    assert [p.line for p in m.problems] == [2] and words in m.problems[0].message


def test_jsonl_values_keep_line_separators_and_empty_objects_pass_through_as_text(tmp_path):
    """Lines end at line feeds only (U+2028 and U+0085 are a string's characters in JSON); an empty
    object (Parquet has no struct without fields) is read as its JSON text, so the results can be written."""
    text = '{"prompt": "a cat\u2028on a mat\u0085", "x": {}, "y": [{}], "z": {"k": 1}}\n{"prompt": "b"}\n'
    m = read_ok(write(tmp_path / "m.jsonl", text))
    assert [(r.prompt, r.extra["x"], r.extra["y"]) for r in m.rows] == [
        ("a cat\u2028on a mat\u0085", "{}", "[{}]"), ("b", None, None)]
    assert str(m.extra_types["z"]) == "struct<k: int64>"
    txt = read_ok(write(tmp_path / "p.txt", "x\u2028y\r\nz\n"))
    assert [r.prompt for r in txt.rows] == ["x\u2028y", "z"]


def test_parquet_view_types_pass_through_and_repeated_names_are_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"prompt": ["a"], "sv": pa.array(["s"], pa.string_view()), "bv": pa.array([b"b"], pa.binary_view()),
                      "lv": pa.array([[1, 2]], pa.list_view(pa.int64())),
                      "nested": pa.array([[{"k": "v"}]], pa.list_(pa.struct([("k", pa.string_view())])))})
    pq.write_table(table, tmp_path / "v.parquet")
    m = read_ok(tmp_path / "v.parquet")
    assert {c: str(t) for c, t in m.extra_types.items()} == {
        "sv": "string", "bv": "binary", "lv": "list<element: int64>", "nested": "list<element: struct<k: string>>"}
    assert m.rows[0].extra == {"sv": "s", "bv": b"b", "lv": [1, 2], "nested": [{"k": "v"}]}
    pq.write_table(pa.table([pa.array(["a"]), pa.array(["b"])], names=["prompt", "prompt"]), tmp_path / "d.parquet")
    m = read_manifest(tmp_path / "d.parquet")
    assert [(p.column, p.message) for p in m.problems] == [("prompt", "appears twice in the file's columns; keep one")]


def test_jsonl_bad_value_names_line_and_column(tmp_path):
    m = read_manifest(write(tmp_path / "m.jsonl", '{"prompt": "a"}\n\n{"prompt": "b", "steps": true}\n'))
    assert [(p.line, p.row, p.column) for p in m.problems] == [(3, 2, "steps")]


# ----------------------------------------------------------------------------- --map

def test_map_renames_diffusiondb_columns(tmp_path):
    path = write(tmp_path / "ddb.csv", "image_name,prompt,seed,step,cfg,sampler,width,height\n"
                                       "f3501e05.png,a castle,42,30,7.0,k_euler_ancestral,512,640\n")
    m = read_ok(path, [("image_name", "id"), ("step", "steps"), ("cfg", "cfg_scale"), ("sampler", "sampler")])
    (row,) = m.rows
    assert (row.id, row.steps, row.cfg_scale, row.sampler, row.height) == ("f3501e05.png", 30, 7.0, "euler_a", 640)
    assert m.extra_columns == [] and m.warnings == []
    r = invoke("validate", str(path), "--map", "image_name=id,step=steps,cfg=cfg_scale")
    assert r.exit_code == 0 and "warning" not in r.stdout


@pytest.mark.parametrize("pairs, words", [
    ([("stepz", "steps")], "the manifest has no column 'stepz' (did you mean 'step'?)"),
    ([("step", "stepz")], "'stepz' is not a column batchsd reads (did you mean 'steps'?)"),
    ([("step", "steps"), ("cfg", "steps")], "both rename to 'steps'; keep one"),
    ([("step", "prompt")], "the manifest already has a column 'prompt'; drop this rename"),
])
def test_map_problems(tmp_path, pairs, words):
    m = read_manifest(write(tmp_path / "m.csv", "prompt,step,cfg\na,2,3\n"), ManifestOptions(tuple(pairs)))
    assert len(m.problems) == 1 and m.problems[0].row is None and words in m.problems[0].message
    assert m.rows == []


def test_map_may_swap_names_and_renaming_to_itself_is_a_no_op(tmp_path):
    m = read_ok(write(tmp_path / "m.csv", "prompt,negative_prompt,tag\na,b,c\n"),
                [("prompt", "negative_prompt"), ("negative_prompt", "prompt")])
    assert (m.rows[0].prompt, m.rows[0].negative_prompt, m.rows[0].extra) == ("b", "a", {"tag": "c"})
    assert read_ok(write(tmp_path / "n.csv", "prompt\na\n"), [("prompt", "prompt")]).rows[0].prompt == "a"


@pytest.mark.parametrize("text, words", [("step", "is not SOURCE=TARGET"), ("a=b,=c", "is not SOURCE=TARGET"),
                                         ("a=b,a=c", "renamed twice")])
def test_map_syntax(text, words):
    with pytest.raises(InputError, match=words):
        parse_column_map(text)
    assert parse_column_map(" step = steps , cfg=cfg_scale") == (("step", "steps"), ("cfg", "cfg_scale"))


def test_map_syntax_is_a_usage_error_on_the_command_line(tmp_path):
    path = write(tmp_path / "m.csv", "prompt\na\n")
    for command in ("validate", "run"):
        r = invoke(command, str(path), "--map", "step")
        assert r.exit_code == 2 and "is not SOURCE=TARGET" in r.output


# ----------------------------------------------------------------------------- look-alike warnings

@pytest.mark.parametrize("column, means", [
    ("step", "steps"), ("cfg", "cfg_scale"), ("guidance_scale", "cfg_scale"), ("negative", "negative_prompt"),
    ("num_inference_steps", "steps"), ("scale", "cfg_scale"), ("neg_prompt", "negative_prompt"),
    ("sampler_name", "sampler"), ("widht", "width"), ("heigth", "height"), ("Guidance Scale", "cfg_scale"),
    ("denoising_strength", "strength"), ("num_images", "n_images"),
])
def test_columns_that_look_like_parameters_get_a_warning(tmp_path, column, means):
    m = read_ok(write(tmp_path / "m.csv", f'prompt,"{column}"\na,1\n'))
    (w,) = m.warnings
    assert w.column == column and f"looks like {means!r}" in w.message and f"--map {column}={means}" in w.message
    r = invoke("validate", str(tmp_path / "m.csv"))
    assert r.exit_code == 0 and f"column {column!r}: is passed through unused" in r.stdout


def test_a_name_with_spaces_around_it_is_not_offered_a_map_that_cannot_work(tmp_path):
    """`prompt, seed` (a space after the comma) names ' seed'; --map trims its names, so the warning
    says to fix the header instead."""
    m = read_manifest(write(tmp_path / "n.csv", "prompt,x, steps_\na,1,2\n"))
    (w,) = m.warnings
    assert w.column == " steps_" and "remove the spaces around the name" in w.message and "--map" not in w.message


def test_no_warning_when_the_parameter_is_set_or_the_column_is_unrelated(tmp_path):
    assert read_ok(write(tmp_path / "a.csv", "prompt,steps,step\na,2,3\n")).warnings == []
    assert read_ok(write(tmp_path / "b.csv", "prompt,tag,source,user_name\na,1,2,3\n")).warnings == []


# ----------------------------------------------------------------------------- sampler names

@pytest.mark.parametrize("name, canonical", [
    ("k_euler", "euler"), ("k_euler_ancestral", "euler_a"), ("k_euler_a", "euler_a"), ("k_dpmpp_2m", "dpmpp_2m"),
    ("k_dpmpp_2m_ka", "dpmpp_2m_karras"), ("ddim", "ddim"), ("DDIM", "ddim"), ("Euler a", "euler_a"),
    ("DPM++ 2M Karras", "dpmpp_2m_karras"), ("sample_euler_ancestral", "euler_a"),
    ("EulerAncestralDiscreteScheduler", "euler_a"), ("DPMSolverMultistepScheduler", "dpmpp_2m"),
])
def test_other_tools_sampler_names(name, canonical):
    assert resolve_sampler(name) == canonical


@pytest.mark.parametrize("name, nearest", [
    ("k_lms", None), ("plms", None), ("k_heun", None), ("k_dpm_2", "k_dpmpp_2m"),
    ("k_dpm_2_ancestral", "k_euler_ancestral"), ("DPM++ SDE", "dpm++ 2m"), ("k_eular", "k_euler"),
])
def test_samplers_batchsd_does_not_have_are_refused_naming_the_nearest(name, nearest):
    with pytest.raises(InputError, match="unknown sampler") as e:
        resolve_sampler(name)
    message = str(e.value)
    assert "valid names: ddpm, ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras" in message
    if nearest is not None:
        assert f"nearest: {nearest!r}" in message.lower() or f"'{nearest}'" in message.lower()
    if name != "k_eular":
        assert "a sampler batchsd does not have" in message


def test_unknown_sampler_in_a_manifest_names_row_column_and_nearest(tmp_path):
    m = read_manifest(write(tmp_path / "m.csv", "prompt,sampler\na,k_euler\nb,k_lms\n"))
    assert [(p.row, p.column) for p in m.problems] == [(2, "sampler")]
    assert "'k_lms' (a sampler batchsd does not have)" in m.problems[0].message
