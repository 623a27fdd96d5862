"""`batchsd run / validate / inspect` end to end through the typer app, with the real tiny model (CPU).

The tiny pipeline is loaded once per module and handed out by a patched Pipeline.load, so every
run goes through the real model, sampler and VAE without paying the load each time.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from batchsd.model.pipeline import GenerationRow
from batchsd.job.init_images import load_init_image
from batchsd.job.model_choice import resolve_model
from batchsd.job.options import UsageError
from cli_support import invoke

HEADER = "id,prompt,negative_prompt,seed,steps,cfg_scale,sampler,width,height,init_image,strength,tag"


pytestmark = pytest.mark.usefixtures("cached_tiny")   # tests/job/conftest.py


def write_csv(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def make_init_image(path: Path, w: int = 80, h: int = 72) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


# ----------------------------------------------------------------------------- end to end

def test_run_end_to_end(tmp_path, tiny_pipe):
    make_init_image(tmp_path / "init.png")
    manifest = write_csv(tmp_path / "jobs.csv", [
        "cat,a cat,,11,2,7.5,euler,64,64,,,1",
        "dog,a dog,blurry,12,2,5,Euler a,64,64,,,2",
        "cow,a cow,,13,2,7.5,euler,64,64,,,",
        "img,a painting,ugly,14,4,7.5,ddim,,,init.png,0.5,3",
    ])
    r = invoke("run", str(manifest), "--model", "tiny", "--batch-size", "2", "--save-latents")
    assert r.exit_code == 0, r.output
    assert "4 ok, 0 failed" in r.stdout and "images are noise" in r.stderr
    out = tmp_path / "outputs" / "jobs"           # default --out: outputs/<manifest stem>/
    assert sorted(p.name for p in (out / "images").iterdir()) == ["cat.png", "cow.png", "dog.png", "img.png"]

    # PNG metadata, A1111 style, read back with PIL
    with Image.open(out / "images" / "dog.png") as im:
        assert im.size == (64, 64)
        assert im.text["parameters"] == ("a dog\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 5, "
                                         "Seed: 12, Size: 64x64, Model: tiny-random")
        meta = json.loads(im.text["batchsd"])
        assert meta["id"] == "dog" and meta["seed"] == 12 and meta["sampler"] == "euler_a" and meta["tag"] == "2"
    with Image.open(out / "images" / "img.png") as im:
        assert im.size == (80, 72)                   # img2img size from the init image
        assert im.text["parameters"].endswith("Sampler: DDIM, CFG scale: 7.5, Seed: 14, Size: 80x72, "
                                              "Model: tiny-random, Denoising strength: 0.5")
    with Image.open(out / "images" / "cat.png") as im:
        assert "Negative prompt" not in im.text["parameters"]

    # results.parquet: explicit schema, readable by pyarrow and pandas, one row per manifest row
    t = pq.read_table(out / "results.parquet")
    want = {"id": pa.string(), "seed": pa.int64(), "steps": pa.int64(), "cfg_scale": pa.float64(),
            "width": pa.int64(), "strength": pa.float64(), "tag": pa.string(), "status": pa.string(),
            "error": pa.string(), "image_path": pa.string(), "image_sha256": pa.string(), "model": pa.string(),
            "model_sha256": pa.string(), "elapsed_s": pa.float64(), "finished_at": pa.timestamp("us", tz="UTC"),
            "params_hash": pa.string()}
    for name, typ in want.items():
        assert t.schema.field(name).type == typ, name
    df = pd.read_parquet(out / "results.parquet")
    assert list(df["id"]) == ["cat", "dog", "cow", "img"] and set(df["status"]) == {"ok"}
    assert list(df["width"]) == [64, 64, 64, 80] and list(df["height"]) == [64, 64, 64, 72]
    assert df["init_image"].iloc[3] == "init.png" and df["strength"].iloc[3] == 0.5 and pd.isna(df["strength"].iloc[0])
    assert set(df["model"]) == {"tiny-random"} and df["model_sha256"].isna().all()
    assert (df["elapsed_s"] > 0).all()
    for _, row in df.iterrows():
        assert hashlib.sha256((out / row["image_path"]).read_bytes()).hexdigest() == row["image_sha256"]
    lat = np.load(out / "latents" / "img.npy")
    assert lat.dtype == np.float32 and lat.shape == (4, 9, 10)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["ok"] == 4 and summary["exit_code"] == 0
    assert summary["winograd"] is False      # fp32 default; TINY has no convolution wide enough anyway

    # each image equals a direct one-row generate() (batching does not change a row's image)
    direct = tiny_pipe.generate([GenerationRow("a dog", "blurry", 12, 2, 5.0, "euler_a", 64, 64)])
    assert np.abs(pixels(out / "images" / "dog.png") - np.asarray(direct.images[0], np.int16)).max() <= 1
    direct = tiny_pipe.generate([GenerationRow("a painting", "ugly", 14, 4, 7.5, "ddim", 80, 72,
                                               load_init_image(str(tmp_path / "init.png")), 0.5)])
    assert np.abs(pixels(out / "images" / "img.png") - np.asarray(direct.images[0], np.int16)).max() <= 1
    assert np.allclose(lat, direct.latents[0].numpy(), atol=1e-3)


# ----------------------------------------------------------------------------- bad input

def test_manifest_problems_exit_2_naming_row_and_column(tmp_path, cached_tiny):
    manifest = write_csv(tmp_path / "bad.csv", [
        "a,ok,,1,2,7.5,euler,64,64,,,",
        "b,ok,,1,abc,7.5,euler,64,64,,,",
        "c,ok,,1,2,7.5,euler,65,64,,,",
        "d,,,1,2,7.5,warp,64,64,,,",
    ])
    r = invoke("run", str(manifest), "--model", "tiny")
    assert r.exit_code == 2
    for text in ["data row 2, column 'steps'", "data row 3, column 'width'", "use 64 or 72",
                 "data row 4, column 'prompt'", "data row 4, column 'sampler'", "nothing was run"]:
        assert text in r.output
    assert not (tmp_path / "outputs").exists() and cached_tiny == []   # no model loaded, nothing written
    r = invoke("validate", str(manifest))
    assert r.exit_code == 2 and "data row 4, column 'sampler'" in r.output
    r = invoke("run", str(tmp_path / "missing.csv"), "--model", "tiny")
    assert r.exit_code == 2 and "file not found" in r.output


def test_messages_print_user_text_as_written(tmp_path, cached_tiny):
    """The console neither turns `:name:` into emoji nor reads `[...]` as markup in a user's values."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,prompt,sampler\na,x,:cat: [bold]s\n")
    r = invoke("validate", str(manifest))
    assert r.exit_code == 2 and "unknown sampler ':cat: [bold]s'" in r.output


def test_missing_init_image_fails_that_row_only(tmp_path):
    make_init_image(tmp_path / "there.png", 64, 64)
    manifest = write_csv(tmp_path / "jobs.csv", [
        "a,a cat,,1,2,7.5,euler,64,64,,,",
        "b,a dog,,2,4,7.5,euler,,,nothere.png,0.5,",
        "c,a cow,,3,4,7.5,euler,,,there.png,0.5,",
    ])
    r = invoke("validate", str(manifest))
    assert r.exit_code == 1 and "data row 2 (id 'b'), column 'init_image'" in r.output and "not found" in r.output
    r = invoke("run", str(manifest), "--model", "tiny")
    assert r.exit_code == 1, r.output
    assert "2 ok, 1 failed" in r.stdout
    df = pd.read_parquet(tmp_path / "outputs/jobs/results.parquet").set_index("id")
    assert list(df["status"]) == ["ok", "error", "ok"]
    assert "init image not found" in df.loc["b", "error"] and "nothere.png" in df.loc["b", "error"]
    assert pd.isna(df.loc["b", "image_path"]) and pd.isna(df.loc["a", "error"])
    assert not (tmp_path / "outputs/jobs/images/b.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size"),
    (["--dtype", "fp8"], "fp8"),
    (["--device", "tpu"], "use auto, cpu, cuda or cuda:N"),
    (["--limit", "-1"], "--limit"),
    (["--compile", "fastest"], "fastest"),
    (["--winograd", "maybe"], "maybe"),
    (["--model", "nowhere/model.safetensors"], "does not exist"),
    (["--out", ""], "is empty"),
    (["--model", "dangling.safetensors"], "a link to nowhere/x.safetensors, which does not exist"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA is not available")]))
def test_bad_cli_values_exit_2(tmp_path, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dangling.safetensors").symlink_to("nowhere/x.safetensors")
    manifest = write_csv(tmp_path / "jobs.csv", ["a,a cat,,1,2,7.5,euler,64,64,,,"])
    r = invoke("run", str(manifest), *(["--model", "tiny"] if "--model" not in args else []), *args)
    assert r.exit_code == 2
    assert message in re.sub(r"[\s│╭╮╰╯─]+", " ", r.output)   # typer may box and wrap the message
    assert not (tmp_path / "outputs" / "jobs" / "images").exists()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
def test_epilogues_flag_is_recorded_per_row_and_in_the_summary(tmp_path):
    """--epilogues fused|torch (bf16 on the CPU) runs what it says, in the results and summary.json;
    fused with fp32 is refused with the fix named, and the rows are left unmade, not failed."""
    manifest = write_csv(tmp_path / "jobs.csv", ["a,a cat,,1,2,7.5,euler,64,64,,,"])
    for flag, expected in (("fused", True), ("torch", False)):
        out = tmp_path / flag
        r = invoke("run", str(manifest), "--model", "tiny", "--dtype", "bf16", "--epilogues", flag, "--out", str(out))
        assert r.exit_code == 0, r.output
        assert pd.read_parquet(out / "results.parquet")["fused_epilogues"].tolist() == [expected]
        assert json.loads((out / "summary.json").read_text())["fused_epilogues"] is expected
    r = invoke("run", str(manifest), "--model", "tiny", "--dtype", "fp32", "--epilogues", "fused",
               "--out", str(tmp_path / "fp32"))
    assert r.exit_code != 0 and "--epilogues auto" in re.sub(r"\s+", " ", r.output)


def test_run_with_a_loaded_pipeline(tmp_path, tiny_pipe, cached_tiny):
    """runner.run(opts, pipe=...) (Python API, benchmarks) makes the job with that pipeline, loads nothing."""
    from batchsd.job.options import RunOptions
    from batchsd.job.run import run

    manifest = write_csv(tmp_path / "jobs.csv", ["a,a cat,,1,2,7.5,euler,64,64,,,", "b,a dog,,2,2,7.5,euler,64,64,,,"])
    summary = run(RunOptions(manifest=manifest, out_dir=tmp_path / "o", model="nowhere/x.safetensors"),
                  rich_bar=False, pipe=tiny_pipe)
    assert (summary.ok, summary.failed, summary.exit_code, summary.model) == (2, 0, 0, "tiny-random")
    assert cached_tiny == []   # Pipeline.load was never called, and --model was not looked at
    assert sorted(p.name for p in (tmp_path / "o" / "images").iterdir()) == ["a.png", "b.png"]


def test_model_resolution(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="--model tiny") as e:
        resolve_model(None, tmp_path)
    assert "weights" in str(e.value)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "README.md").write_text("put a checkpoint here")
    (tmp_path / "weights" / "a.safetensors").write_bytes(b"x")
    assert resolve_model(None, tmp_path) == str(tmp_path / "weights" / "a.safetensors")
    (tmp_path / "weights" / "b.ckpt").write_bytes(b"x")
    with pytest.raises(UsageError, match="holds 2 checkpoints") as e:
        resolve_model(None, tmp_path)
    assert "a.safetensors" in str(e.value) and "b.ckpt" in str(e.value)
    (tmp_path / "weights" / "b.ckpt").unlink()
    (tmp_path / "weights" / "sd").mkdir()
    (tmp_path / "weights" / "sd" / "model_index.json").write_text("{}")
    with pytest.raises(UsageError, match="holds 2 checkpoints"):
        resolve_model(None, tmp_path)
    assert resolve_model("tiny", tmp_path) == "tiny"
    monkeypatch.setenv("BATCHSD_MODEL", "tiny")
    assert resolve_model(None, tmp_path) == "tiny"          # env beats weights/
    assert resolve_model(str(tmp_path / "weights" / "a.safetensors"), tmp_path).endswith("a.safetensors")

    # through the CLI: nothing given, no weights/ here -> exit 2 saying where to put one
    monkeypatch.delenv("BATCHSD_MODEL")
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    manifest = write_csv(other / "jobs.csv", ["a,a cat,,1,2,7.5,euler,64,64,,,"])
    r = invoke("run", str(manifest))
    assert r.exit_code == 2 and "--model tiny" in r.output and "weights" in r.output
    monkeypatch.setenv("BATCHSD_MODEL", "tiny")
    r = invoke("run", str(manifest))
    assert r.exit_code == 0, r.output


def test_dry_run_and_limit(tmp_path, cached_tiny):
    manifest = write_csv(tmp_path / "jobs.csv", [f"r{i},p{i},,{i},2,7.5,euler,64,64,,," for i in range(5)]
                         + ["w,wide,,9,2,7.5,euler,128,64,,,"])
    r = invoke("run", str(manifest), "--dry-run", "--batch-size", "2", "--out", "o")
    assert r.exit_code == 0 and cached_tiny == [] and not (tmp_path / "o").exists()
    assert "batch plan: 4 batch(es) of at most 2 rows" in r.stdout and "128x64" in r.stdout
    r = invoke("run", str(manifest), "--model", "tiny", "--limit", "2", "--out", "o")
    assert r.exit_code == 0 and "2 ok, 0 failed" in r.stdout
    assert sorted(p.name for p in (tmp_path / "o/images").iterdir()) == ["r0.png", "r1.png"]
    summary = json.loads((tmp_path / "o/summary.json").read_text())   # the manifest is not done
    assert (summary["complete"], summary["limit"], summary["beyond_limit"]) == (False, 2, 4)
    assert "4 more manifest row(s) beyond --limit" in r.stdout
    r = invoke("status", "o")
    assert "--limit 2: 4 more manifest row(s)" in r.stdout and "every row of the limited job is done" in r.stdout
    assert list(pd.read_parquet(tmp_path / "o/results.parquet")["id"]) == ["r0", "r1"]
    r = invoke("run", str(manifest), "--dry-run", "--out", "o")
    assert "2 row(s) already made with these parameters are left out" in r.stdout


# ----------------------------------------------------------------------------- engine failures

def test_out_of_memory_halves_the_batch(tmp_path, tiny_pipe, monkeypatch):
    sizes = []
    real_generate = tiny_pipe.generate

    def generate(rows):
        sizes.append(len(rows))
        if len(rows) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_generate(rows)

    monkeypatch.setattr(tiny_pipe, "generate", generate)
    manifest = write_csv(tmp_path / "jobs.csv", [f"r{i},p{i},,{i},2,7.5,euler,64,64,,," for i in range(5)])
    r = invoke("run", str(manifest), "--model", "tiny", "--batch-size", "4")
    assert r.exit_code == 0, r.output
    assert "out of memory at batch size 4: retrying at 2" in r.output
    assert sizes == [4, 2, 1, 1, 1, 1, 1]     # 4 -> 2 -> 1, and the smaller size is kept for the rest
    assert (pd.read_parquet(tmp_path / "outputs/jobs/results.parquet")["status"] == "ok").all()

    # a single row that still does not fit fails alone, with the reason
    sizes.clear()
    monkeypatch.setattr(tiny_pipe, "generate", lambda rows: (_ for _ in ()).throw(RuntimeError("out of memory")))
    r = invoke("run", str(manifest), "--model", "tiny", "--overwrite", "--limit", "1")
    assert r.exit_code == 1
    df = pd.read_parquet(tmp_path / "outputs/jobs/results.parquet").set_index("id")
    assert "out of memory at batch size 1" in df.loc["r0", "error"]


def test_a_write_failure_stops_the_run_with_exit_3_and_a_rerun_resumes(tmp_path, tiny_pipe, monkeypatch):
    """Exit 1 means rows failed (recorded); a run stopped by its surroundings (a full disk) is exit 3,
    which a scheduler may retry: the next run makes what is missing."""
    from batchsd.job.outputs.files import LooseFiles

    manifest = write_csv(tmp_path / "jobs.csv", [f"r{i},p {i},,{i},2,7.5,euler,64,64,,," for i in range(3)])
    real_write = LooseFiles.write_row

    def disk_fills(self, rec, image, latent):
        if rec["id"] == "r1":
            raise OSError(28, "No space left on device")
        return real_write(self, rec, image, latent)

    monkeypatch.setattr(LooseFiles, "write_row", disk_fills)
    r = invoke("run", str(manifest), "--model", "tiny", "--batch-size", "1")
    assert r.exit_code == 3 and "No space left on device" in r.output and "finished rows are kept" in r.output
    monkeypatch.setattr(LooseFiles, "write_row", real_write)
    r = invoke("run", str(manifest), "--model", "tiny", "--batch-size", "1")
    assert r.exit_code == 0 and "1 skipped" in r.output, r.output


def test_row_exception_fails_only_that_row(tmp_path, tiny_pipe, monkeypatch):
    real_generate = tiny_pipe.generate

    def generate(rows):
        if any(r.prompt == "explode" for r in rows):
            raise ValueError("cannot do this row")
        return real_generate(rows)

    monkeypatch.setattr(tiny_pipe, "generate", generate)
    manifest = write_csv(tmp_path / "jobs.csv", ["a,fine,,1,2,7.5,euler,64,64,,,", "b,explode,,2,2,7.5,euler,64,64,,,",
                                                 "c,fine too,,3,2,7.5,euler,64,64,,,"])
    r = invoke("run", str(manifest), "--model", "tiny", "--batch-size", "3")
    assert r.exit_code == 1
    df = pd.read_parquet(tmp_path / "outputs/jobs/results.parquet").set_index("id")
    assert list(df["status"]) == ["ok", "error", "ok"]
    assert df.loc["b", "error"] == "ValueError: cannot do this row"


def test_inspect_missing_model_exit_2(tmp_path):
    r = invoke("inspect", str(tmp_path / "nope.safetensors"))
    assert r.exit_code == 2 and "does not exist" in r.output


def test_checkpoint_file_from_weights_folder_hash_in_png_and_results(tmp_path):
    from safetensors.torch import save_file

    from batchsd.model.config import TINY
    from batchsd.model.stable_diffusion import StableDiffusionModel

    (tmp_path / "weights").mkdir()
    ckpt = tmp_path / "weights" / "tiny-ckpt.safetensors"
    model = StableDiffusionModel.random(TINY, seed=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()

    r = invoke("inspect", str(ckpt))
    assert r.exit_code == 0 and sha[:10] in r.stdout and "safetensors" in r.stdout

    manifest = write_csv(tmp_path / "jobs.csv", ["a,a cat,,1,2,7.5,dpmpp_2m_karras,64,64,,,"])
    r = invoke("run", str(manifest))                  # no --model: the one checkpoint in ./weights/
    assert r.exit_code == 0, r.output
    out = tmp_path / "outputs" / "jobs"
    with Image.open(out / "images" / "a.png") as im:
        assert im.text["parameters"].endswith(f"Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1, Size: 64x64, "
                                              f"Model hash: {sha[:10]}, Model: tiny-ckpt")
    df = pd.read_parquet(out / "results.parquet")
    assert df["model"].iloc[0] == "tiny-ckpt" and df["model_sha256"].iloc[0] == sha
    r = invoke("run", str(manifest))
    assert "0 ok, 0 failed, 1 skipped" in r.stdout
    r = invoke("run", str(manifest), "--model", "tiny")  # another model: the row is made again
    assert r.exit_code == 0 and "1 ok, 0 failed, 0 skipped" in r.stdout
    assert pd.read_parquet(out / "results.parquet")["model"].iloc[0] == "tiny-random"


def test_default_batch_size_rule(monkeypatch):
    from types import SimpleNamespace

    from batchsd.job import worker

    cpu = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    assert worker.default_batch_size(cpu, 512, 512) == worker.DEFAULT_CPU_BATCH == 4
    gib = 1024**3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (24 * gib, 80 * gib))
    gpu = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float16)
    assert worker.default_batch_size(gpu, 512, 512) == 14          # (24 - 2) GiB / 1.5 GiB
    assert worker.default_batch_size(gpu, 768, 768) == 6           # 2.25x the pixels
    assert worker.default_batch_size(SimpleNamespace(device=gpu.device, dtype=torch.float32), 512, 512) == 7
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * gib, 80 * gib))
    assert worker.default_batch_size(gpu, 512, 512) == 1           # never below 1
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (200 * gib, 200 * gib))
    assert worker.default_batch_size(gpu, 64, 64) == worker.MAX_AUTO_BATCH
