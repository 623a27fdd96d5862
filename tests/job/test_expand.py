"""Expansion (batchsd/job/expand.py, prompt_template.py): n_images, seed ranges, prompt templates and
wildcards, before any model loads; the expanded manifest; shards; problems naming row, column and fix.
The runs with the tiny model are in test_expand_run.py."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchsd.job.expand import MAX_N_IMAGES, expanded_table, write_expanded
from batchsd.job.manifest import read_manifest
from batchsd.job.prompt_template import PromptTemplates, TemplateError
from batchsd.job.reader import read_rows
from batchsd.job.rows import ManifestOptions, seed_from_id
from batchsd.job.shards import ShardSpec
from cli_support import invoke


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def rows_of(path: Path, wildcards: Path | None = None):
    m = read_manifest(path, ManifestOptions(wildcards=wildcards))
    assert m.problems == [], [str(p) for p in m.problems]
    return m.rows


def problems_of(path: Path, wildcards: Path | None = None) -> list[str]:
    return [str(p) for p in read_manifest(path, ManifestOptions(wildcards=wildcards)).problems]


# ----------------------------------------------------------------------------- n_images and seed ranges

def test_n_images_ids_padded_to_the_width_of_n_minus_1_and_seeds_consecutive(tmp_path):
    rows = rows_of(write(tmp_path / "m.csv", "id,prompt,seed,n_images,tag\ncat,a cat,100,11,x\ndog,a dog,7,,y\n"))
    assert [r.id for r in rows] == [f"cat-{k:02d}" for k in range(11)] + ["dog"]
    assert [r.seed for r in rows] == list(range(100, 111)) + [7]
    assert {r.extra["tag"] for r in rows[:11]} == {"x"} and rows[11].extra == {"tag": "y"}
    assert [r.index for r in rows] == list(range(12)) and [r.data_row for r in rows] == [1] * 11 + [2]
    ten = rows_of(write(tmp_path / "t.csv", "id,prompt,n_images\na,p,10\n"))
    assert [r.id for r in ten] == [f"a-{k}" for k in range(10)]          # width of 9: one digit


def test_n_images_without_a_seed_gives_each_image_its_own_ids_default_seed(tmp_path):
    rows = rows_of(write(tmp_path / "m.csv", "prompt,n_images\na cat,3\na dog,1\n"))
    assert [r.id for r in rows] == ["00000-0", "00000-1", "00000-2", "00001"]
    assert [r.seed for r in rows] == [seed_from_id(r.id) for r in rows]


def test_seed_range_makes_one_row_per_seed(tmp_path):
    rows = rows_of(write(tmp_path / "m.csv", "id,prompt,seed\nr,a cat,100-103\ns,a dog, 5 - 5 \n"))
    assert [(r.id, r.seed) for r in rows] == [("r-0", 100), ("r-1", 101), ("r-2", 102), ("r-3", 103), ("s", 5)]


def test_seed_range_with_n_images_equal_is_accepted_other_values_are_problems(tmp_path):
    rows = rows_of(write(tmp_path / "ok.csv", "id,prompt,seed,n_images\nr,p,10-12,3\n"))
    assert [r.seed for r in rows] == [10, 11, 12]
    problems = problems_of(write(tmp_path / "bad.csv", "id,prompt,seed,n_images\nr,p,10-12,4\ns,p,1,1\n"))
    assert problems == ["data row 1, column 'n_images': n_images is 4 but the seed range 10-12 makes 3 images; "
                        "leave n_images empty (or 3), or write the range 10-13"]


@pytest.mark.parametrize("cell, words", [
    ("199-100", "runs backwards; write the smaller seed first (100-199)"),
    (f"0-{MAX_N_IMAGES}", f"more than {MAX_N_IMAGES:,} from one row; split it"),
    (f"1-{2**63}", "ends above 2**63-1"),
    ("100-", "is not a number"),
    ("-5", "out of range"),
])
def test_bad_seed_ranges_name_row_column_and_fix(tmp_path, cell, words):
    m = read_manifest(write(tmp_path / "m.csv", f"prompt,seed\nok,1\nbad,{cell}\n"))
    assert [(p.row, p.column) for p in m.problems] == [(2, "seed")] and words in m.problems[0].message
    assert [r.id for r in m.rows] == ["00000"]


def test_seed_plus_n_images_past_the_limit_is_a_problem(tmp_path):
    m = read_manifest(write(tmp_path / "m.csv", f"prompt,seed,n_images\np,{2**63 - 2},3\n"))
    assert [(p.row, p.column) for p in m.problems] == [(1, "seed")]
    assert f"use a seed of at most {2**63 - 3}" in m.problems[0].message


@pytest.mark.parametrize("cell, words", [("0", "from 1 to 100,000"), ("2.5", "not a whole number"),
                                         (str(MAX_N_IMAGES + 1), "out of range")])
def test_bad_n_images(tmp_path, cell, words):
    m = read_manifest(write(tmp_path / "m.csv", f"prompt,n_images\np,{cell}\n"))
    assert [(p.row, p.column) for p in m.problems] == [(1, "n_images")] and words in m.problems[0].message


def test_expanded_ids_that_clash_are_a_problem_on_the_later_row(tmp_path):
    m = read_manifest(write(tmp_path / "m.csv", "id,prompt,n_images\na,p,2\nA-1,q,1\nb,r,1\n"))
    assert [(p.row, p.column) for p in m.problems] == [(2, "id")]
    assert "also the id of an image of data row 1 ('a-1')" in m.problems[0].message
    assert [r.id for r in m.rows] == ["a-0", "a-1", "b"]


def test_expanded_ids_longer_than_the_limit(tmp_path):
    m = read_manifest(write(tmp_path / "m.csv", f"id,prompt,n_images\n{'x' * 199},p,2\n"))
    assert [(p.row, p.column) for p in m.problems] == [(1, "id")] and "shorten the id" in m.problems[0].message


# ----------------------------------------------------------------------------- prompt templates

def test_alternatives_are_drawn_from_the_row_id_not_its_position(tmp_path):
    text = "id,prompt,n_images\nfox,a {red|green|blue} {fox|owl},8\nplain,a plain prompt,1\n"
    rows = rows_of(write(tmp_path / "m.csv", text))
    again = rows_of(write(tmp_path / "again.csv", text))
    moved = rows_of(write(tmp_path / "moved.csv", "id,prompt,n_images\nfirst,x,1\n" + text.split("\n", 1)[1]))
    prompts = {r.id: r.prompt for r in rows}
    assert prompts == {r.id: r.prompt for r in again} == {r.id: r.prompt for r in moved if r.id != "first"}
    drawn = [prompts[f"fox-{k}"] for k in range(8)]
    assert all(p.split()[1] in ("red", "green", "blue") and p.split()[2] in ("fox", "owl") for p in drawn)
    assert len(set(drawn)) > 1                                    # 8 rows all alike: 6 * (1/6)**8
    assert {r.extra["prompt_template"] for r in rows} == {"a {red|green|blue} {fox|owl}", "a plain prompt"}


def test_the_draw_is_the_documented_sha256_stream():
    import hashlib

    nodes = PromptTemplates().compile("{a|b|c} {x|y}")
    for row_id in ("r-0", "r-1", "cat", "00017"):
        digests = [hashlib.sha256(f"batchsd-prompt-v1\0{row_id}\0{j}".encode()).digest() for j in (0, 1)]
        first, second = (int.from_bytes(d[:8], "big") for d in digests)
        assert PromptTemplates().render(nodes, row_id) == f"{'abc'[first % 3]} {'xy'[second % 2]}"


@pytest.mark.parametrize("template, prompt", [
    ("a {red} car", "a {red} car"),                         # braces without '|': kept as written
    ("(word:1.2), [cat|dog], a|b, ((x))", "(word:1.2), [cat|dog], a|b, ((x))"),  # A1111 syntax untouched
    (r"a \{x\|y\} \(lit\) \_\_init__", r"a {x|y} \(lit\) __init__"),
    ("{only}", "{only}"),
    ("__ a __ b", "__ a __ b"),                             # not a wildcard name: text
])
def test_text_that_is_not_a_choice_is_kept(template, prompt):
    templates = PromptTemplates()
    assert templates.render(templates.compile(template), "any") == prompt


def test_nested_and_empty_alternatives():
    templates = PromptTemplates()
    nodes = templates.compile("a {{big|small} cat|dog}{!|}")
    seen = {templates.render(nodes, f"r{k}") for k in range(200)}
    assert seen == {"a big cat!", "a small cat!", "a dog!", "a big cat", "a small cat", "a dog"}



def test_a1111_alternation_inside_a_group_is_not_a_separator():
    templates = PromptTemplates()
    nodes = templates.compile("a {[cat|dog] photo|owl} [x|y]")
    seen = {templates.render(nodes, f"r{k}") for k in range(100)}
    assert seen == {"a [cat|dog] photo [x|y]", "a owl [x|y]"}
    nodes = templates.compile("{[a|[b|c]]|d|e}")                      # nested brackets
    assert {templates.render(nodes, f"r{k}") for k in range(100)} == {"[a|[b|c]]", "d", "e"}
    nodes = templates.compile(r"{\[x|y\]|z}")                         # A1111's literal brackets open nothing
    assert {templates.render(nodes, f"r{k}") for k in range(100)} == {r"\[x", r"y\]", "z"}
    nodes = templates.compile("{[{red|blue}|green]|owl}")              # a group inside the brackets still draws
    assert {templates.render(nodes, f"r{k}") for k in range(200)} == {"[red|green]", "[blue|green]", "owl"}

@pytest.mark.parametrize("template, words", [
    ("a {red|blue", "'{' at character 3 is never closed"),
    ("a red} car", "'}' at character 6 closes no '{'"),
    ("{2$$a|b|c}", "several alternatives at once"),
    ("{0.5::a|b}", "weighted alternatives"),
    ("__colors*__", "globs"),
    ("a __color__ cat", "no --wildcards DIR was given"),
])
def test_template_problems(tmp_path, template, words):
    m = read_manifest(write(tmp_path / "m.csv", f'prompt\nok\n"{template}"\n'))
    assert [(p.row, p.column) for p in m.problems] == [(2, "prompt")] and words in m.problems[0].message
    assert [r.prompt for r in m.rows] == ["ok"]


def test_a_template_that_draws_an_empty_prompt_is_a_problem(tmp_path):
    m = read_manifest(write(tmp_path / "m.csv", "id,prompt,n_images\na,{|},1\n"))
    assert [(p.row, p.column) for p in m.problems] == [(1, "prompt")] and "is empty" in m.problems[0].message


def test_wildcards_from_files_nested_comments_and_subfolders(tmp_path):
    wc = tmp_path / "wc"
    (wc / "colors").mkdir(parents=True)
    write(wc / "animal.txt", "# animals\n\nfox\n__colors/warm__ owl\n  \n")
    write(wc / "colors" / "warm.txt", "red\n{orange|amber}\n")
    rows = rows_of(write(tmp_path / "m.csv", "id,prompt,n_images\nw,a __animal__,40\n"), wildcards=wc)
    assert {r.prompt for r in rows} == {"a fox", "a red owl", "a orange owl", "a amber owl"}
    assert {r.extra["prompt_template"] for r in rows} == {"a __animal__"}


@pytest.mark.parametrize("files, template, words", [
    ({}, "__missing__", "there is no file"),
    ({"empty.txt": "# nothing\n\n"}, "__empty__", "has no options"),
    ({"a.txt": "__b__\n", "b.txt": "x __a__\n"}, "__a__", "uses itself (a -> b -> a)"),
    ({"bad.txt": "{x|y\n"}, "__bad__", "is never closed"),
    ({}, "__a/../../secret__", "not a plain name inside the --wildcards folder"),
])
def test_wildcard_problems(tmp_path, files, template, words):
    wc = tmp_path / "wc"
    wc.mkdir()
    for name, text in files.items():
        write(wc / name, text)
    write(tmp_path / "secret.txt", "x\n")
    with pytest.raises(TemplateError) as e:
        PromptTemplates(wc).compile(template)
    assert words in str(e.value)
    m = read_manifest(write(tmp_path / "m.csv", f"prompt\n{template}\n"), ManifestOptions(wildcards=wc))
    assert [(p.row, p.column) for p in m.problems] == [(1, "prompt")] and words in m.problems[0].message


def test_a_prompt_template_column_means_already_expanded(tmp_path):
    rows = rows_of(write(tmp_path / "m.csv", "prompt,prompt_template\na {x|y},a {x|y}\n"))
    assert rows[0].prompt == "a {x|y}" and rows[0].extra == {"prompt_template": "a {x|y}"}


def test_no_expansion_leaves_rows_and_extras_as_read(tmp_path):
    m = read_manifest(write(tmp_path / "m.csv", "id,prompt,tag\na,p,1\nb,q,\n"))
    assert [(r.index, r.source_row, r.extra) for r in m.rows] == [(0, None, {"tag": "1"}), (1, None, {"tag": None})]
    assert "prompt_template" not in m.extra_columns


# ----------------------------------------------------------------------------- the expanded manifest

def _template_job(tmp_path: Path) -> tuple[Path, Path]:
    wc = tmp_path / "wc"
    wc.mkdir()
    write(wc / "style.txt", "ink\noil\nwatercolor\n")
    manifest = write(tmp_path / "m.csv", "id,prompt,seed,n_images,steps,tag\n"
                                         "cat,a {big|small} cat in __style__,100-102,,2,x\n"
                                         "dog,a dog,,2,2,\n"
                                         ",plain {kept},5,,2,z\n")
    return manifest, wc


def test_validate_expanded_writes_the_job_rows_and_reading_it_gives_the_same_rows(tmp_path):
    manifest, wc = _template_job(tmp_path)
    r = invoke("validate", str(manifest), "--wildcards", str(wc), "--expanded", str(tmp_path / "x.parquet"))
    assert r.exit_code == 0, r.output
    assert "6 row(s) from 3 data row(s)" in r.stdout and "expanded manifest" in r.stdout
    table = pq.read_table(tmp_path / "x.parquet")
    from batchsd.job.schema import MANIFEST_NAMES
    assert table.column_names[:11] == ["id", "prompt", "negative_prompt", "seed", "steps", "cfg_scale", "sampler",
                                       "width", "height", "init_image", "strength"]
    assert table.column_names[:len(MANIFEST_NAMES) + 1] == [*MANIFEST_NAMES, "prompt_template"]
    assert table.column("id").to_pylist() == ["cat-0", "cat-1", "cat-2", "dog-0", "dog-1", "00002"]
    assert table.column("seed").to_pylist()[:3] == [100, 101, 102]
    assert table.column("seed").to_pylist()[3:5] == [seed_from_id("dog-0"), seed_from_id("dog-1")]
    assert table.column("tag").to_pylist() == ["x", "x", "x", None, None, "z"]
    original = read_manifest(manifest, ManifestOptions(wildcards=wc))
    expanded = read_manifest(tmp_path / "x.parquet")          # no --wildcards needed: prompts as written
    assert expanded.problems == []
    key = lambda r: (r.id, r.prompt, r.seed, r.steps, r.sampler, r.params_hash(), r.extra)  # noqa: E731
    assert [key(r) for r in expanded.rows] == [key(r) for r in original.rows]
    assert expanded_table(expanded, tmp_path / "y.parquet").equals(table)     # expanding again changes nothing


def test_expanded_manifest_elsewhere_writes_init_images_as_absolute_paths(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    manifest = write(tmp_path / "m.csv", "id,prompt,init_image,n_images\na,p,init.png,2\n")
    m = read_manifest(manifest)
    (tmp_path / "elsewhere").mkdir()
    write_expanded(m, tmp_path / "elsewhere" / "x.parquet")
    write_expanded(m, tmp_path / "here.parquet")
    assert pq.read_table(tmp_path / "elsewhere" / "x.parquet").column("init_image").to_pylist() == \
        [str(tmp_path / "init.png")] * 2
    assert pq.read_table(tmp_path / "here.parquet").column("init_image").to_pylist() == ["init.png"] * 2
    from batchsd.job.init_images import resolve_image_sizes

    def hashes(rows):    # as runs hash rows: after the init images are read (their content is in the key)
        return [r.params_hash() for r in resolve_image_sizes(rows)[0]]

    for path in (tmp_path / "elsewhere" / "x.parquet", tmp_path / "here.parquet"):
        assert hashes(read_manifest(path).rows) == hashes(m.rows)


def test_pass_through_types_survive_expansion(tmp_path):
    import datetime as dt

    columns = {
        "prompt": pa.array(["a {x|y}", "b"]),
        "n_images": pa.array([2, 1], pa.int8()),
        "when": pa.array([dt.datetime(2024, 5, 6, 7, 8, 9), None], pa.timestamp("us")),
        "day": pa.array([dt.date(2024, 5, 6), dt.date(2024, 5, 7)], pa.date32()),
        "tags": pa.array([["a", "b"], []], pa.list_(pa.string())),
        "small": pa.array([-3, 4], pa.int8()),
    }
    pq.write_table(pa.table(columns), tmp_path / "m.parquet")
    m = read_manifest(tmp_path / "m.parquet")
    assert m.problems == [] and len(m.rows) == 3
    extras = m.extras
    for name in ("when", "day", "tags", "small"):
        assert extras.schema.field(name).type == columns[name].type, name
    assert extras.column("small").to_pylist() == [-3, -3, 4]
    assert extras.column("tags").to_pylist() == [["a", "b"], ["a", "b"], []]
    assert extras.column("prompt_template").to_pylist() == ["a {x|y}", "a {x|y}", "b"]


# ----------------------------------------------------------------------------- scale, shards, limit

def _big_manifest(tmp_path: Path, rows: int, n_images: int) -> tuple[Path, Path]:
    wc = tmp_path / "wc"
    wc.mkdir()
    write(wc / "style.txt", "\n".join(f"style {k}" for k in range(10)) + "\n")
    pq.write_table(pa.table({
        "id": [f"job-{i:04d}" for i in range(rows)],
        "prompt": [f"a {{red|green|blue}} {{fox|owl}}, __style__, {i}" for i in range(rows)],
        "seed": pa.array([1000 * i for i in range(rows)], pa.int64()),
        "n_images": pa.array([n_images] * rows, pa.int64()),
    }), tmp_path / "big.parquet")
    return tmp_path / "big.parquet", wc


def test_1000_rows_times_100_images_expand_to_100000_rows_deterministically(tmp_path):
    manifest, wc = _big_manifest(tmp_path, 1000, 100)
    first = read_manifest(manifest, ManifestOptions(wildcards=wc))
    assert first.problems == [] and len(first.rows) == 100_000 and first.num_rows == 1000
    assert len({r.id for r in first.rows}) == 100_000
    assert first.rows[12_345].id == "job-0123-45" and first.rows[12_345].seed == 123_045
    second = read_manifest(manifest, ManifestOptions(wildcards=wc))
    assert [(r.id, r.seed, r.prompt) for r in second.rows] == [(r.id, r.seed, r.prompt) for r in first.rows]


def test_four_shards_make_the_same_ids_seeds_and_prompts_as_unsharded(tmp_path):
    manifest, wc = _big_manifest(tmp_path, 200, 20)
    options = ManifestOptions(wildcards=wc)
    _, whole, _ = read_rows(manifest, None, None, options)
    parts = [read_rows(manifest, None, ShardSpec(i, 4, "test"), options)[1] for i in range(4)]
    assert all(parts) and sum(len(p) for p in parts) == len(whole) == 4000
    assert sorted((r.id, r.seed, r.prompt) for p in parts for r in p) == sorted((r.id, r.seed, r.prompt) for r in whole)


def test_limit_takes_the_first_expanded_rows(tmp_path):
    manifest = write(tmp_path / "m.csv", "id,prompt,n_images\na,p,3\nb,q,3\n")
    _, rows, _ = read_rows(manifest, 4)
    assert [r.id for r in rows] == ["a-0", "a-1", "a-2", "b-0"]


def test_the_example_job_makes_8_rows():
    jobs = Path(__file__).resolve().parents[2] / "jobs"
    rows = rows_of(jobs / "expand_example.csv", wildcards=jobs / "wildcards")
    assert [r.id for r in rows] == ["fox-0", "fox-1", "fox-2", "fox-3", "lighthouse-0", "lighthouse-1",
                                    "lighthouse-2", "teapot"]
    assert rows[-1].prompt == "a porcelain teapot, (detailed:1.2), {red} glaze stays as written"


def test_a_template_in_negative_prompt_is_used_as_written_with_a_warning(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,prompt,negative_prompt\na,a {cat|dog},{ugly|blurry}\nb,a cow,plain\n")
    m = read_manifest(manifest)
    assert m.problems == [] and {r.negative_prompt for r in m.rows} == {"{ugly|blurry}", "plain"}
    assert any("negative_prompt that looks like a prompt template (e.g. data row 1" in str(w) for w in m.warnings)
