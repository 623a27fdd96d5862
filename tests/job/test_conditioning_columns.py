"""The conditioning columns (job/conditioning_columns.py): SDXL's original_width/height and
crop_top/left, clip_skip and prompt_syntax; the family's default size for unsized rows; the warning
for A1111-looking prompts read as plain text."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchsd.job.manifest import read_manifest
from batchsd.job.model_choice import ModelFacts, model_facts
from batchsd.job.rows import ManifestOptions

from cli_support import invoke

LONG = "a photo of a cat, " * 30


def _write(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "m.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_columns_parse_into_the_row_and_only_given_ones_change_the_hash(tmp_path):
    path = _write(tmp_path, [
        dict(id="a", prompt="a cat", seed=1, steps=2),
        dict(id="b", prompt="a cat", seed=1, steps=2, original_width=1024, crop_top=16, clip_skip=2,
             prompt_syntax="a1111"),
        dict(id="c", prompt="a cat", seed=1, steps=2, prompt_syntax="plain"),
    ])
    m = read_manifest(path)
    assert not m.problems
    a, b, c = m.rows
    assert a.conditioning == {} == c.conditioning          # "plain" is the default: not recorded
    assert b.conditioning == {"original_width": 1024, "crop_top": 16, "clip_skip": 2, "prompt_syntax": "a1111"}
    # rows without these columns keep the key they had before the columns existed (v1)
    v1 = ["batchsd-params-v1", "a cat", "", 1, 2, 7.5, "dpmpp_2m_karras", 512, 512, None, None]
    assert a.params_hash() == hashlib.sha256(json.dumps(v1, ensure_ascii=False).encode()).hexdigest()
    assert a.params_hash() == c.params_hash() != b.params_hash()
    record = b.to_record()
    assert record["original_width"] == 1024 and record["clip_skip"] == 2 and record["prompt_syntax"] == "a1111"
    assert a.to_record()["prompt_syntax"] == "plain" and a.to_record()["original_height"] is None


def test_problems_and_warnings(tmp_path):
    path = _write(tmp_path, [
        dict(id="a", prompt="a [cat:dog:0.5]", prompt_syntax="a1111"),
        dict(id="b", prompt="x", clip_skip=13),
        dict(id="c", prompt="x", crop_left=-1),
        dict(id="d", prompt="x", prompt_syntax="compel"),
        dict(id="e", prompt="a (cat:1.2)"),
    ])
    m = read_manifest(path)
    found = {(p.row, p.column) for p in m.problems}
    assert found == {(1, "prompt"), (2, "clip_skip"), (3, "crop_left"), (4, "prompt_syntax")}
    assert any("prompt editing" in p.message for p in m.problems)
    assert any("read as plain text" in w and "--prompt-syntax a1111" in w for w in m.warnings)
    quiet = read_manifest(path, ManifestOptions(prompt_syntax="a1111"))
    assert not any("read as plain text" in w for w in quiet.warnings)


def test_default_size_follows_the_option(tmp_path):
    path = _write(tmp_path, [dict(id="a", prompt="a cat"), dict(id="b", prompt="a cat", width=64, height=64)])
    assert [(r.width, r.height) for r in read_manifest(path).rows] == [(512, 512), (64, 64)]
    sized = read_manifest(path, ManifestOptions(default_size=1024)).rows
    assert [(r.width, r.height) for r in sized] == [(1024, 1024), (64, 64)]
    assert ManifestOptions.from_json(ManifestOptions(default_size=768, prompt_syntax="a1111").to_json()) == \
        ManifestOptions(default_size=768, prompt_syntax="a1111")


def test_model_facts_read_the_family(tmp_path):
    pytest.importorskip("diffusers")
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
    from ref_sdxl import SDXL_TEST, build_reference_sdxl, write_sdxl_single_file

    path = write_sdxl_single_file(tmp_path / "xl.safetensors", build_reference_sdxl(SDXL_TEST))
    assert model_facts(str(path)) == (ModelFacts(1024, "SDXL"), None)
    assert model_facts("tiny") == (ModelFacts(None, "SD 1.x"), None)
    manifest = _write(tmp_path, [dict(id="a", prompt="a cat", steps=2)])
    result = invoke("run", str(manifest), "--model", str(path), "--dry-run", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert "1024" in result.output
    # validate reads the same model's header: its plan and its expanded manifest are what run makes
    expanded = tmp_path / "expanded.parquet"
    result = invoke("validate", str(manifest), "--model", str(path), "--expanded", str(expanded))
    assert result.exit_code == 0 and "1024x1024" in result.stdout and "note:" not in result.stdout
    assert pq.read_table(expanded).to_pylist()[0]["width"] == 1024
    result = invoke("validate", str(manifest))
    assert result.exit_code == 0 and "512x512" in result.stdout and "no model given" in result.stdout


def test_run_with_the_columns(cached_tiny, tmp_path):
    path = _write(tmp_path, [
        dict(id="w", prompt="a (cat:1.3)", seed=1, steps=2, width=64, height=64, clip_skip=2, prompt_syntax="a1111"),
        dict(id="long", prompt=LONG, seed=2, steps=2, width=64, height=64, prompt_syntax="a1111"),
        dict(id="xl", prompt="a cat", seed=3, steps=2, width=64, height=64, original_width=1024),
    ])
    result = invoke("run", str(path), "--model", "tiny", "--out", str(tmp_path / "out"))
    assert result.exit_code == 1, result.output           # one row failed, the others are made
    table = pq.read_table(tmp_path / "out" / "results.parquet").to_pandas().set_index("id")
    assert table.loc["w", "status"] == "ok" and table.loc["long", "status"] == "ok"
    assert table.loc["xl", "status"] == "error" and "SDXL" in table.loc["xl", "error"]
    assert table.loc["w", "clip_skip"] == 2 and table.loc["long", "prompt_syntax"] == "a1111"
    assert not table.loc["long", "prompt_truncated"]
    assert "Clip skip: 2" in Image.open(tmp_path / "out" / "images" / "w.png").text["parameters"]
