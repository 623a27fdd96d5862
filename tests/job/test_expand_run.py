"""`batchsd run` on expanded manifests with the real tiny model (CPU): a manifest and its expansion
(`batchsd validate --expanded`) make the same images; the chosen prompt lands in the results and the
PNG metadata, the template in `prompt_template`; pass-through columns keep their Arrow types;
`batchsd status` reads the job with the run's --map and --wildcards."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cli_support import invoke


pytestmark = pytest.mark.usefixtures("cached_tiny")   # tests/job/conftest.py


def _job(tmp_path: Path) -> tuple[Path, Path]:
    wc = tmp_path / "wc"
    wc.mkdir()
    (wc / "style.txt").write_text("ink\noil, old: style\n")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "init.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,prompt,seed,n_images,step,sampler,width,height,init_image,strength,tag\n"
                        "cat,a {big|small} cat in __style__,100-101,,2,k_euler_ancestral,64,64,,,x\n"
                        "dog,a dog,7,2,2,k_euler,64,64,,,\n"
                        "img,a {red|blue} painting,9,,3,ddim,,,init.png,0.7,z\n")
    return manifest, wc


def test_a_manifest_and_its_expansion_make_the_same_images(tmp_path):
    manifest, wc = _job(tmp_path)
    common = ["--model", "tiny", "--batch-size", "2"]
    r = invoke("run", str(manifest), "--wildcards", str(wc), "--map", "step=steps", "--out", "a", *common)
    assert r.exit_code == 0, r.output
    assert "5 ok, 0 failed" in r.stdout
    r = invoke("validate", str(manifest), "--wildcards", str(wc), "--map", "step=steps",
               "--expanded", str(tmp_path / "expanded.parquet"))
    assert r.exit_code == 0, r.output
    r = invoke("run", str(tmp_path / "expanded.parquet"), "--out", "b", *common)
    assert r.exit_code == 0, r.output
    a, b = (pq.read_table(tmp_path / name / "results.parquet").to_pylist() for name in ("a", "b"))
    assert [row["id"] for row in a] == ["cat-0", "cat-1", "dog-0", "dog-1", "img"]
    assert [row["seed"] for row in a[:4]] == [100, 101, 7, 8] and [row["steps"] for row in a] == [2, 2, 2, 2, 3]
    assert [row["sampler"] for row in a] == ["euler_a", "euler_a", "euler", "euler", "ddim"]
    for x, y in zip(a, b):
        assert {k: x[k] for k in ("id", "prompt", "prompt_template", "seed", "params_hash", "image_sha256", "tag")} \
            == {k: y[k] for k in ("id", "prompt", "prompt_template", "seed", "params_hash", "image_sha256", "tag")}
    assert a[0]["prompt_template"] == "a {big|small} cat in __style__" and "{" not in a[0]["prompt"]
    assert a[0]["prompt"].split(" in ")[1] in ("ink", "oil, old: style")
    assert a[4]["prompt"] in ("a red painting", "a blue painting") and a[4]["init_image"] == "init.png"
    for row in a:                                 # the chosen prompt is what the PNG says
        with Image.open(tmp_path / "a" / row["image_path"]) as im:
            assert im.text["parameters"].split("\n")[0] == row["prompt"]
            meta = json.loads(im.text["batchsd"])
            assert meta["prompt"] == row["prompt"] and meta["prompt_template"] == row["prompt_template"]

    # status reads the job as the run read it (its --map and --wildcards are in run.json)
    r = invoke("status", str(tmp_path / "a"))
    assert r.exit_code == 0, r.output
    assert "5 row(s)" in r.stdout


def test_run_warns_of_columns_that_look_like_parameters(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("prompt,cfg,width,height,steps\na cat,3,64,64,2\n")
    r = invoke("run", str(manifest), "--model", "tiny", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "column 'cfg': is passed through unused, but looks like 'cfg_scale'" in r.stderr
    assert "--map cfg=cfg_scale" in r.stderr


def test_pass_through_columns_keep_their_arrow_types_in_results(tmp_path):
    columns = {
        "prompt": pa.array(["a {x|y}", "b"]),
        "n_images": pa.array([2, 1], pa.int64()),
        "steps": pa.array([2, 2], pa.int64()),
        "width": pa.array([64, 64], pa.int64()),
        "height": pa.array([64, 64], pa.int64()),
        "when": pa.array([dt.datetime(2024, 5, 6, 7, 8, 9), None], pa.timestamp("us")),
        "day": pa.array([dt.date(2024, 5, 6), None], pa.date32()),
        "labels": pa.array([["a", "b"], None], pa.list_(pa.string())),
        "small": pa.array([-3, None], pa.int8()),
        "unsigned": pa.array([2**64 - 1, 0], pa.uint64()),
    }
    pq.write_table(pa.table(columns), tmp_path / "m.parquet")
    r = invoke("run", str(tmp_path / "m.parquet"), "--model", "tiny", "--out", "p")
    assert r.exit_code == 0, r.output
    t = pq.read_table(tmp_path / "p" / "results.parquet")
    for name in ("when", "day", "labels", "small", "unsigned"):
        assert t.schema.field(name).type == columns[name].type, name
    assert t.column("small").to_pylist() == [-3, -3, None] and t.column("unsigned").to_pylist()[0] == 2**64 - 1
    assert t.column("labels").to_pylist() == [["a", "b"], ["a", "b"], None]

    csv = tmp_path / "m.csv"
    csv.write_text("prompt,steps,width,height,note,count\na,2,64,64,,5\nb,2,64,64,hi,\n")
    r = invoke("run", str(csv), "--model", "tiny", "--out", "c")
    assert r.exit_code == 0, r.output
    t = pq.read_table(tmp_path / "c" / "results.parquet")
    assert t.column("note").to_pylist() == [None, "hi"] and t.column("count").to_pylist() == ["5", None]


def test_four_shards_make_the_same_rows_and_images_as_one_run(tmp_path):
    manifest, wc = _job(tmp_path)
    common = ["--model", "tiny", "--batch-size", "2", "--wildcards", str(wc), "--map", "step=steps"]
    r = invoke("run", str(manifest), "--out", "whole", *common)
    assert r.exit_code == 0, r.output
    for i in range(4):
        r = invoke("run", str(manifest), "--out", "sharded", "--shard", f"{i}/4", *common)
        assert r.exit_code == 0, r.output
    key = ("id", "seed", "prompt", "prompt_template", "params_hash", "image_sha256")
    whole, sharded = ([tuple(row[k] for k in key) for row in pq.read_table(tmp_path / name / "results.parquet")
                       .to_pylist()] for name in ("whole", "sharded"))
    assert sorted(sharded) == sorted(whole) and len(whole) == 5
