"""Textual-inversion embeddings in a job (job/embeddings.py): the files of --embeddings-dir that a row's
prompts name, problems before any model loads, the params_hash following the file, the results'
`embeddings` column and the PNG's `TI hashes`, an embedding of another width failing its row only, and one
with the other family's tables refused before any model loads."""
from __future__ import annotations

import hashlib

import pandas as pd
import pyarrow.parquet as pq
import torch
from PIL import Image
from safetensors.torch import save_file

from batchsd.job.embeddings import resolve_embeddings
from batchsd.job.manifest import read_manifest
from batchsd.job.plan import batch_key
from batchsd.job.rows import ManifestOptions
from batchsd.model.config import TINY

from cli_support import invoke, serve_tiny


def write_embeddings(folder, width=TINY.clip.width):
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    save_file({"emb_params": torch.randn(3, width, generator=gen)}, str(folder / "mystyle.safetensors"))
    torch.save({"string_to_param": {"*": torch.randn(2, width, generator=gen)}}, folder / "catdoll.pt")
    return folder


def sha12(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_manifest_finds_named_embeddings(tmp_path):
    folder = write_embeddings(tmp_path / "emb")
    (folder / "broken.pt").write_bytes(b"not a tensor file")
    path = tmp_path / "m.parquet"
    pd.DataFrame([dict(id="plain", prompt="a cat"), dict(id="styled", prompt="a MyStyle cat", negative_prompt="catdoll"),
                  dict(id="word", prompt="mystyles are not names"), dict(id="bad", prompt="a broken cat"),
                  dict(id="long", prompt="word " * 73 + "mystyle", prompt_syntax="a1111"),
                  dict(id="long0", prompt="word " * 73 + "cat", prompt_syntax="a1111")]).to_parquet(path)
    m = read_manifest(path, ManifestOptions(embeddings_dir=folder))
    assert [(p.row, p.column) for p in m.problems] == [(4, "prompt")]
    assert "broken" in m.problems[0].message and "move it out of" in m.problems[0].message
    rows = {r.id: r for r in m.rows}
    assert rows["plain"].conditioning == {} and rows["word"].conditioning == {}
    named = rows["styled"].conditioning["embeddings"]
    assert [(p.split("/")[-1], n) for p, n, _ in named] == [("mystyle.safetensors", 3), ("catdoll.pt", 2)]
    record = rows["styled"].to_record()
    assert "embeddings" not in record       # a result column, set when the row is recorded (worker.record)
    # the vectors count for A1111 chunks: 73 words + 3 vectors take two chunks, 73 + 1 word one
    assert batch_key(rows["long"])[5] == 2 and batch_key(rows["long0"])[5] == 1
    # without the folder the same rows are other rows (their params_hash), and nothing is named
    other = {r.id: r for r in read_manifest(path, ManifestOptions(embeddings_dir=tmp_path / "none")).rows}
    assert other["styled"].params_hash() != rows["styled"].params_hash()
    assert other["plain"].params_hash() == rows["plain"].params_hash()


def test_a_name_two_files_share_is_a_problem_of_the_rows_naming_it(tmp_path):
    folder = write_embeddings(tmp_path / "emb")
    torch.save({"string_to_param": {"*": torch.zeros(1, TINY.clip.width)}}, folder / "mystyle.pt")
    (tmp_path / "m.csv").write_text("id,prompt,negative_prompt\na,a cat,mystyle\nb,a catdoll,\n")
    m = read_manifest(tmp_path / "m.csv", ManifestOptions(embeddings_dir=folder))
    assert [(p.row, p.column) for p in m.problems] == [(1, "negative_prompt")]
    assert "matches 2 files" in m.problems[0].message and "rename one" in m.problems[0].message
    assert [r.id for r in m.rows] == ["b"]


def test_changed_file_changes_the_rows_hash(tmp_path):
    folder = write_embeddings(tmp_path / "emb")
    (tmp_path / "m.csv").write_text("id,prompt\na,a mystyle cat\nb,a cat\n")
    before = read_manifest(tmp_path / "m.csv", ManifestOptions(embeddings_dir=folder)).rows
    save_file({"emb_params": torch.zeros(3, TINY.clip.width)}, str(folder / "mystyle.safetensors"))
    after = read_manifest(tmp_path / "m.csv", ManifestOptions(embeddings_dir=folder)).rows
    assert before[0].params_hash() != after[0].params_hash()
    assert before[1].params_hash() == after[1].params_hash()
    rows, problems = resolve_embeddings(after, tmp_path / "no-such-folder")
    assert rows == after and problems == {}


def test_run_records_embeddings_and_fails_only_the_misfit_row(monkeypatch, tiny_pipe, tmp_path):
    serve_tiny(monkeypatch, tiny_pipe)
    monkeypatch.delenv("BATCHSD_MODEL", raising=False)
    folder = write_embeddings(tmp_path / "emb")
    save_file({"emb_params": torch.zeros(1, 768)}, str(folder / "wide.safetensors"))   # SD 1.x width, not tiny's
    path = tmp_path / "m.parquet"
    common = dict(seed=1, steps=2, width=64, height=64)
    pd.DataFrame([dict(id="plain", prompt="a cat", **common), dict(id="styled", prompt="a mystyle cat", **common),
                  dict(id="misfit", prompt="a wide cat", **common)]).to_parquet(path)
    result = invoke("run", str(path), "--model", "tiny", "--out", str(tmp_path / "out"),
                    "--embeddings-dir", str(folder))
    assert result.exit_code == 1, result.output
    table = pq.read_table(tmp_path / "out" / "results.parquet").to_pandas().set_index("id")
    assert list(table["status"]) == ["ok", "ok", "error"]
    assert f"768-wide vectors, the encoder is {TINY.clip.width}-wide" in table.loc["misfit", "error"]
    assert table.loc["styled", "embeddings"] == f"mystyle:{sha12(folder / 'mystyle.safetensors')}"
    assert pd.isna(table.loc["plain", "embeddings"])
    assert table.loc["plain", "image_sha256"] != table.loc["styled", "image_sha256"]
    parameters = Image.open(tmp_path / "out" / table.loc["styled", "image_path"]).text["parameters"]
    assert f'TI hashes: "mystyle: {sha12(folder / "mystyle.safetensors")}"' in parameters
    # resume: nothing to do for the finished rows; an embedding file changed in place makes its rows again
    save_file({"emb_params": torch.ones(3, TINY.clip.width)}, str(folder / "mystyle.safetensors"))
    again = invoke("run", str(path), "--model", "tiny", "--out", str(tmp_path / "out"),
                   "--embeddings-dir", str(folder))
    table2 = pq.read_table(tmp_path / "out" / "results.parquet").to_pandas().set_index("id")
    assert table2.loc["styled", "image_sha256"] != table.loc["styled", "image_sha256"], again.output
    assert table2.loc["plain", "finished_at"] == table.loc["plain", "finished_at"]


def test_an_sdxl_embedding_for_an_sd1_row_is_a_problem_before_any_model_loads(tmp_path, cached_tiny):
    """Where the row's model is known before loading (--model, a model cell), an embedding with the other
    family's tables (SDXL's clip_l + clip_g for an SD 1.x model) is the row's manifest problem, in the
    column that names it; its width is left to the Pipeline (the test above)."""
    folder = write_embeddings(tmp_path / "emb")
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(folder / "xlstyle.safetensors"))
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,prompt,negative_prompt,model\na,a mystyle cat,,tiny\nb,a cat,xlstyle,tiny\n"
                        "c,a xlstyle cat,,\n")
    r = invoke("validate", str(manifest), "--embeddings-dir", str(folder))
    assert r.exit_code == 2
    assert "data row 2, column 'negative_prompt'" in r.stdout and "'xlstyle'" in r.stdout
    assert "is for SDXL (clip_l + clip_g tables), and this row's model is SD 1.x" in r.stdout
    assert "data row 1" not in r.stdout and "data row 3" not in r.stdout   # row 3's model is not known here
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(tmp_path / "o"), "--embeddings-dir", str(folder))
    assert r.exit_code == 2 and "data row 3, column 'prompt'" in r.output and cached_tiny == []
