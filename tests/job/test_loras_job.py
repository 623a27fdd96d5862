"""Per-row LoRA sets in a job (job/loras.py): the `loras` column and <lora:...> tags under the a1111
syntax, found in --lora-dir, problems before any model loads, rows grouped by set, results and PNG
metadata naming the set, and the base model restored for rows without one."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from batchsd.job.loras import LoraProblem, parse_lora_list, prompt_loras
from batchsd.job.manifest import read_manifest
from batchsd.job.plan import plan_batches
from batchsd.job.rows import ManifestOptions
from batchsd.model.config import TINY

from cli_support import invoke, serve_tiny

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from ref_clip import build_reference_clip  # noqa: E402
from ref_lora import write_kohya_lora  # noqa: E402
from ref_unet import build_reference_unet  # noqa: E402


@pytest.fixture
def lora_dir(tmp_path) -> Path:
    folder = tmp_path / "lora"
    (folder / "sub").mkdir(parents=True)
    unet, clip = build_reference_unet(TINY.unet, 1), build_reference_clip(TINY.clip, 2)
    write_kohya_lora(folder / "style.safetensors", unet, {"te": clip}, seed=3)
    write_kohya_lora(folder / "sub" / "detail.safetensors", unet, {"te": clip}, seed=4)
    return folder


def test_parsing():
    assert parse_lora_list("style:0.8; detail ;x:-1") == [("style", 0.8), ("detail", 1.0), ("x", -1.0)]
    assert prompt_loras("a cat <lora:style:0.5> in <LORA:detail>") == [("style", 0.5), ("detail", 1.0)]
    for bad in ("style:abc", "style:nan", ":0.5"):
        with pytest.raises(LoraProblem):
            parse_lora_list(bad)
    with pytest.raises(LoraProblem, match="separate text-encoder and UNet multipliers .* give one"):
        prompt_loras("<lora:style:0.8:0.5>")        # A1111's two-multiplier form


def test_manifest_resolves_and_groups(tmp_path, lora_dir):
    path = tmp_path / "m.parquet"
    pd.DataFrame([dict(id="a", prompt="a cat", seed=1), dict(id="b", prompt="a cat", loras="style:0.8", seed=1),
                  dict(id="c", prompt="a cat <lora:detail:0.5>", prompt_syntax="a1111", seed=1),
                  dict(id="d", prompt="a cat", loras="style:0.8", seed=1),
                  dict(id="e", prompt="a cat", loras="missing"),
                  dict(id="f", prompt="a cat <lora:missing>", prompt_syntax="a1111")]).to_parquet(path)
    m = read_manifest(path, ManifestOptions(lora_dir=lora_dir))
    assert {(p.row, p.column) for p in m.problems} == {(5, "loras"), (6, "prompt")}
    assert all("no LoRA named 'missing'" in p.message and "--lora-dir" in p.message for p in m.problems)
    fixed = path.with_name("ok.parquet")
    pd.read_parquet(path).iloc[:4].to_parquet(fixed)
    rows = read_manifest(fixed, ManifestOptions(lora_dir=lora_dir)).rows
    a, b, c, d = rows
    assert a.conditioning == {} and b.conditioning["loras"][0][:2] == (str((lora_dir / "style.safetensors").resolve()), 0.8)
    assert c.conditioning["loras"][0][0].endswith("sub/detail.safetensors")
    assert len({a.params_hash(), b.params_hash(), c.params_hash()}) == 3 and b.params_hash() == d.params_hash()
    batches = plan_batches(rows, 8)
    assert [[r.id for r in batch.rows] for batch in batches] == [["a"], ["b", "d"], ["c"]]
    assert b.to_record()["loras"].startswith("style:0.8:")


def test_run_applies_each_set_and_restores_the_base(monkeypatch, tiny_pipe, tmp_path, lora_dir):
    serve_tiny(monkeypatch, tiny_pipe)
    monkeypatch.delenv("BATCHSD_MODEL", raising=False)
    path = tmp_path / "m.parquet"
    common = dict(seed=1, steps=2, width=64, height=64)
    pd.DataFrame([dict(id="base", prompt="a cat", **common), dict(id="styled", prompt="a cat", loras="style", **common),
                  dict(id="base2", prompt="a cat", **common)]).to_parquet(path)
    result = invoke("run", str(path), "--model", "tiny", "--out", str(tmp_path / "out"), "--lora-dir", str(lora_dir))
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "out" / "results.parquet").to_pandas().set_index("id")
    assert table.loc["base", "image_sha256"] != table.loc["styled", "image_sha256"]
    assert (table["status"] == "ok").all()
    assert table.loc["styled", "loras"].startswith("style:1:") and pd.isna(table.loc["base", "loras"])
    parameters = Image.open(tmp_path / "out" / "images" / "styled.png").text["parameters"]
    assert 'Lora hashes: "style: ' in parameters
    # the next rows without a set run on the exact base model again
    from batchsd import GenerationRow
    before = tiny_pipe.generate([GenerationRow("a dog", seed=2, steps=1, width=64, height=64)]).latents
    tiny_pipe._use_loras(((str(lora_dir / "style.safetensors"), 1.0),))
    assert tiny_pipe.generate([GenerationRow("a dog", seed=2, steps=1, width=64, height=64)]).latents.equal(before)


def test_results_format_reads_back_and_checks_the_hash(tmp_path, lora_dir):
    """`name:multiplier:hash12` (results, expanded manifests) reads back; a hash that is not the file's is
    a problem naming the row."""
    from batchsd.job.loras import LoraFolder

    digest = LoraFolder(lora_dir).sha256((lora_dir / "style.safetensors").resolve())
    path = tmp_path / "m.parquet"
    pd.DataFrame([dict(id="a", prompt="x", loras=f"style:0.8:{digest[:12]}"),
                  dict(id="b", prompt="x", loras="style:0.8:0123456789ab")]).to_parquet(path)
    m = read_manifest(path, ManifestOptions(lora_dir=lora_dir))
    assert [(p.row, p.column) for p in m.problems] == [(2, "loras")] and "file changed" in m.problems[0].message
    pd.read_parquet(path).iloc[:1].to_parquet(path)
    (row,) = read_manifest(path, ManifestOptions(lora_dir=lora_dir)).rows
    assert row.conditioning["loras"][0][1:] == (0.8, digest) and row.to_record()["loras"] == f"style:0.8:{digest[:12]}"


def test_a_lora_for_another_family_is_a_problem_before_any_model_loads(tmp_path, lora_dir, cached_tiny):
    """The row's model is known before loading (--model, or the row's model cell): a LoRA trained for
    another family, or a file that is no LoRA batchsd reads, is the manifest's problem, naming the row,
    the column the LoRA came from and the fix; `validate` reports it for rows that name their model."""
    import torch
    from safetensors.torch import save_file

    pair = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"   # SDXL's first text encoder (kohya)
    save_file({f"{pair}.lora_down.weight": torch.zeros(4, 32), f"{pair}.lora_up.weight": torch.zeros(32, 4)},
              str(lora_dir / "xl.safetensors"))
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(lora_dir / "loha.safetensors"))
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,prompt,prompt_syntax,loras,model,steps,width,height\n"
                        "a,a cat,,style,tiny,2,64,64\n"                    # fits the tiny (SD 1.x) model
                        "b,a cat,,xl:0.5,,2,64,64\n"
                        "c,a cat <lora:xl>,a1111,,tiny,2,64,64\n"
                        "d,a cat,,loha,tiny,2,64,64\n")
    opts = ["--lora-dir", str(lora_dir)]
    r = invoke("validate", str(manifest), *opts)   # row b has no model cell: unknown in validate, not checked
    assert r.exit_code == 2
    assert "data row 3, column 'prompt'" in r.stdout and "'xl'" in r.stdout and "is for SDXL" in r.stdout
    assert "this row's model is SD 1.x" in r.stdout and "use a SD 1.x LoRA" in r.stdout
    assert "data row 4, column 'loras'" in r.stdout and "LyCORIS LoHa" in r.stdout
    assert "data row 1" not in r.stdout and "data row 2" not in r.stdout
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(tmp_path / "o"), *opts)
    assert r.exit_code == 2 and "nothing was run" in r.output and cached_tiny == []
    assert "data row 2, column 'loras'" in r.output   # --model tiny: row b is checked too


def test_lora_tags_follow_the_prompt_each_row_draws_and_the_expanded_file_makes_the_same_rows(tmp_path, lora_dir):
    """Tags are read from each row's final prompt (a template may draw one or not), and an expanded
    manifest keeps them in its prompts only: run again, it gives the same LoRA sets (not the tags twice)."""
    from batchsd.job.expand import write_expanded

    manifest = tmp_path / "m.csv"
    manifest.write_text("id,prompt,loras,n_images,prompt_syntax\n"
                        "k,a cat {<lora:style:0.8>|plain},,8,a1111\n"
                        "t,a dog <lora:style:0.5>,detail:0.3,,a1111\n"
                        "e,a [cat|dog] {here|there},,,a1111\n")
    m = read_manifest(manifest, ManifestOptions(lora_dir=lora_dir))
    assert [(p.row, p.column) for p in m.problems] == [(3, "prompt")] and "alternation" in m.problems[0].message
    sets = {r.id: [(Path(p).stem, w) for p, w, _ in r.conditioning.get("loras", ())] for r in m.rows}
    drawn = {r.id: r.prompt for r in m.rows}
    assert {drawn[i] for i in sets if i.startswith("k")} == {"a cat <lora:style:0.8>", "a cat plain"}
    for i in sets:
        if i.startswith("k"):
            assert sets[i] == ([("style", 0.8)] if "<lora:" in drawn[i] else []), (i, drawn[i])
    assert sets["t"] == [("detail", 0.3), ("style", 0.5)]
    write_expanded(m, tmp_path / "expanded.parquet")
    again = read_manifest(tmp_path / "expanded.parquet", ManifestOptions(lora_dir=lora_dir))
    assert again.problems == []
    assert {r.id: r.conditioning.get("loras") for r in again.rows} == {r.id: r.conditioning.get("loras") for r in m.rows}
    assert {r.id: r.params_hash() for r in again.rows} == {r.id: r.params_hash() for r in m.rows}


@pytest.mark.parametrize("kind", ["lora", "embedding"])
def test_a_file_replaced_at_its_path_is_read_again(tmp_path, kind):
    """A long-lived Pipeline keeps a LoRA set applied and text encodings cached between calls; a file
    saved over the old one at the same path (a retrained LoRA or embedding) is read anew, as a fresh
    Pipeline would."""
    import os

    from safetensors.torch import save_file

    from batchsd import GenerationRow, Pipeline

    path = tmp_path / "mine.safetensors"
    for version, seed in (("v1", 5), ("v2", 6)):
        if kind == "lora":
            unet, clip = build_reference_unet(TINY.unet, 1), build_reference_clip(TINY.clip, 2)
            write_kohya_lora(tmp_path / f"{version}.safetensors", unet, {"te": clip}, seed=seed)
        else:
            vectors = torch.randn(2, TINY.clip.width, generator=torch.Generator().manual_seed(seed))
            save_file({"emb_params": vectors}, str(tmp_path / f"{version}.safetensors"))
    given = dict(loras=((str(path), 1.0),)) if kind == "lora" else dict(embeddings=(str(path),))
    row = GenerationRow("a photo of mine", seed=1, steps=2, width=64, height=64, sampler="euler", **given)
    pipe = Pipeline.load("tiny", device="cpu")
    os.replace(tmp_path / "v1.safetensors", path)
    first = pipe.generate([row]).latents
    os.replace(tmp_path / "v2.safetensors", path)
    second = pipe.generate([row]).latents
    fresh = Pipeline.load("tiny", device="cpu").generate([row]).latents
    assert not torch.equal(first, second) and torch.equal(second, fresh)


def test_a_lora_tag_in_negative_prompt_is_warned_about(tmp_path, lora_dir):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,prompt,negative_prompt,prompt_syntax\na,a cat,<lora:style:0.8> ugly,a1111\n")
    m = read_manifest(manifest, ManifestOptions(lora_dir=lora_dir))
    assert m.problems == [] and "loras" not in m.rows[0].conditioning
    assert any("<lora:...> tag in negative_prompt (e.g. data row 1)" in str(w) and "not applied" in str(w)
               for w in m.warnings)


def test_a_job_moved_to_another_folder_makes_the_same_bytes(monkeypatch, tiny_pipe, tmp_path, lora_dir):
    """An img2img row with a LoRA, regenerated from a copy of the project in another folder: the same
    image bytes and params_hash (the files count by content, not by where they are)."""
    import shutil

    serve_tiny(monkeypatch, tiny_pipe)
    monkeypatch.delenv("BATCHSD_MODEL", raising=False)
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(lora_dir, project / "lora")
    Image.new("RGB", (64, 64), (200, 90, 30)).save(project / "init.png")
    pd.DataFrame([dict(id="i", prompt="a cat", seed=1, steps=4, init_image="init.png", strength=0.5, loras="style"),
                  dict(id="t", prompt="a dog", seed=2, steps=2, width=64, height=64, loras="detail:0.5")]
                 ).to_parquet(project / "m.parquet")
    moved = tmp_path / "elsewhere" / "deeper" / "project"
    shutil.copytree(project, moved)
    outputs = []
    for folder in (project, moved):
        monkeypatch.chdir(folder)
        r = invoke("run", "m.parquet", "--model", "tiny", "--out", "out", "--lora-dir", "lora")
        assert r.exit_code == 0, r.output
        outputs.append({p.name: p.read_bytes() for p in (folder / "out" / "images").iterdir()})
        table = pq.read_table(folder / "out" / "results.parquet").to_pandas().set_index("id")
        outputs.append(table["params_hash"].to_dict())
    assert outputs[0] == outputs[2] and outputs[1] == outputs[3] and len(outputs[0]) == 2


def test_loras_with_the_same_tensors_and_another_alpha_are_other_parameters(tmp_path):
    """A PEFT file keeps its alpha in the safetensors header, which A1111's LoRA hash leaves out: the
    resume key reads the header too."""
    from ref_lora import write_peft_lora

    folder = tmp_path / "lora"
    folder.mkdir()
    unet, clip = build_reference_unet(TINY.unet, 1), build_reference_clip(TINY.clip, 2)
    write_peft_lora(folder / "soft.safetensors", unet, {"text_encoder": clip}, alpha=1.0, seed=3)
    write_peft_lora(folder / "strong.safetensors", unet, {"text_encoder": clip}, alpha=64.0, seed=3)
    path = tmp_path / "m.csv"
    path.write_text("id,prompt,seed,steps,width,height,loras\nsoft,a cat,1,2,64,64,soft\nstrong,a cat,1,2,64,64,strong\n")
    m = read_manifest(path, ManifestOptions(lora_dir=folder))
    assert not m.problems
    soft, strong = m.rows
    assert soft.conditioning["loras"][0][2] == strong.conditioning["loras"][0][2]      # the same A1111 hash
    assert soft.params_hash() != strong.params_hash()
