"""Per-row models: a manifest `model` column names the checkpoint of each row (model_choice.py).

The run groups rows by model, loads each once in order of first use (releasing the one before), records and names the model
of each row (results, PNG), and resume compares each row with its own model. Checked on tiny
random-weight SD 1.x files (and the tiny model itself) with the real pipeline; in exact mode (the
CPU default) a row's bytes do not depend on what else is in the run, so the mixed run must equal the
runs split by model byte for byte.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from batchsd.job.options import RunOptions, UsageError
from cli_support import invoke

HEADER = "id,prompt,seed,steps,width,height,model"


@pytest.fixture
def loads(cached_tiny):
    """The models Pipeline.load is asked for, in order (the tiny one served from the module's pipe)."""
    return cached_tiny


def write_checkpoint(path: Path, seed: int) -> str:
    """A tiny SD 1.x single file with random weights; returns its sha256."""
    from safetensors.torch import save_file

    from batchsd.model.config import TINY
    from batchsd.model.stable_diffusion import StableDiffusionModel

    path.parent.mkdir(parents=True, exist_ok=True)
    model = StableDiffusionModel.random(TINY, seed=seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_csv(path: Path, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


ROWS = ["r0,a cat,1,2,64,64,a",                       # a name in weights/ (.safetensors added)
        "r1,a dog,2,2,64,64,",                        # no cell: the run's model (--model tiny)
        "r2,a fox,3,2,64,96,b.safetensors",           # a name with its suffix
        "r3,a cow,4,2,64,64,weights/a.safetensors",   # a path from the working folder: the same model as r0
        "r4,an owl,5,2,64,64,tiny"]                   # the tiny model by name: the same as r1's


def results(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet").set_index("id")


def test_rows_are_made_by_their_own_model_each_loaded_once(tmp_path, loads):
    sha = {name: write_checkpoint(tmp_path / "weights" / f"{name}.safetensors", seed)
           for name, seed in (("a", 1), ("b", 2))}
    manifest = write_csv(tmp_path / "jobs" / "mixed.csv", ROWS)
    out = tmp_path / "mixed"
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out), "--batch-size", "4")
    assert r.exit_code == 0, r.output
    a, b = (str((tmp_path / "weights" / f"{n}.safetensors").resolve()) for n in "ab")
    assert loads == [a, "tiny", b]                  # each model once, in order of first use
    df = results(out)
    assert list(df["model"]) == ["a", "tiny-random", "b", "a", "tiny-random"]
    assert list(df["model_sha256"].fillna("")) == [sha["a"], "", sha["b"], sha["a"], ""]
    with Image.open(out / "images" / "r2.png") as im:
        assert im.size == (64, 96)
        assert im.text["parameters"].endswith(f"Model hash: {sha['b'][:10]}, Model: b")
    with Image.open(out / "images" / "r1.png") as im:
        assert "Model hash" not in im.text["parameters"] and im.text["parameters"].endswith("Model: tiny-random")
    meta = json.loads((out / "summary.json").read_text())
    assert [m["name"] for m in meta["models"]] == ["a", "tiny-random", "b"] and meta["model"] is None

    # the same rows, split by model into three runs with --model: the same bytes, row by row
    split = {"a": (["r0,a cat,1,2,64,64,", "r3,a cow,4,2,64,64,"], "weights/a.safetensors"),
             "t": (["r1,a dog,2,2,64,64,", "r4,an owl,5,2,64,64,"], "tiny"),
             "b": (["r2,a fox,3,2,64,96,"], "weights/b.safetensors")}
    for name, (rows, model) in split.items():
        part = write_csv(tmp_path / "jobs" / f"{name}.csv", rows)
        r = invoke("run", str(part), "--model", model, "--out", str(tmp_path / name), "--batch-size", "1")
        assert r.exit_code == 0, r.output
        for rid, got in results(tmp_path / name)["image_sha256"].items():
            assert got == df.loc[rid, "image_sha256"], (name, rid)

    # resume: nothing to make, no model loaded; the status counts each model's rows
    del loads[:]
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out))
    assert r.exit_code == 0 and "0 to make, 5 already done" in r.output and loads == [], r.output
    r = invoke("status", str(out))
    assert r.exit_code == 0 and "a (2), tiny-random (2), b (1)" in r.stdout

    # another b: only b's row is made again, and only b is loaded
    sha["b"] = write_checkpoint(tmp_path / "weights" / "b.safetensors", 3)
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(out))
    assert r.exit_code == 0 and "1 to make, 4 already done" in r.output and loads == [b]
    assert results(out).loc["r2", "model_sha256"] == sha["b"]


def test_shards_load_the_models_their_rows_use_and_merge_to_the_same_job(tmp_path, loads):
    from batchsd.job.shards import shard_of

    sha_a = write_checkpoint(tmp_path / "weights" / "a.safetensors", 1)
    manifest = write_csv(tmp_path / "m.csv", [f"r{i},a cat {i},{i},2,64,64,{'a' if i % 2 else ''}" for i in range(6)])
    whole = tmp_path / "whole"
    assert invoke("run", str(manifest), "--model", "tiny", "--out", str(whole)).exit_code == 0
    sharded = tmp_path / "sharded"
    for k in range(2):
        del loads[:]
        r = invoke("run", str(manifest), "--model", "tiny", "--out", str(sharded), "--shard", f"{k}/2")
        assert r.exit_code == 0, r.output
        mine = [i for i in range(6) if shard_of(f"r{i}", 2) == k]
        expected = ["tiny" if i % 2 == 0 else str((tmp_path / "weights" / "a.safetensors").resolve()) for i in mine]
        assert loads == list(dict.fromkeys(expected))          # only the models of its own rows
    assert results(sharded)["image_sha256"].to_dict() == results(whole)["image_sha256"].to_dict()
    merged = json.loads((sharded / "summary.json").read_text())
    assert {(m["name"], m["sha256"]) for m in merged["models"]} == {("tiny-random", None), ("a", sha_a)}


def test_rows_that_all_name_a_model_need_no_run_model(tmp_path, loads):
    write_checkpoint(tmp_path / "weights" / "a.safetensors", 1)
    write_checkpoint(tmp_path / "weights" / "b.safetensors", 2)   # two in weights/: no default model either
    manifest = write_csv(tmp_path / "m.csv", ["x,a cat,1,2,64,64,a", "y,a dog,2,2,64,64,tiny"])
    r = invoke("run", str(manifest), "--out", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    manifest = write_csv(tmp_path / "m2.csv", ["x,a cat,1,2,64,64,a", "y,a dog,2,2,64,64,"])
    r = invoke("run", str(manifest), "--out", str(tmp_path / "o2"))
    assert r.exit_code == 2 and "holds 2 checkpoints" in r.output and "--model" in r.output


def test_a_model_cell_that_cannot_be_run_is_a_problem_before_anything_loads(tmp_path, loads):
    from safetensors.torch import save_file
    import torch

    write_checkpoint(tmp_path / "weights" / "a.safetensors", 1)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4)},
              str(tmp_path / "weights" / "style.safetensors"))           # a LoRA, not a model
    (tmp_path / "jobs" / "weights").mkdir(parents=True)
    (tmp_path / "jobs" / "weights" / "a.safetensors").write_bytes(b"not this one")
    manifest = write_csv(tmp_path / "jobs" / "m.csv", ["x,a cat,1,2,64,64,style", "y,a dog,2,2,64,64,nothere",
                                                       "z,a cow,3,2,64,64,weights/a.safetensors"])
    r = invoke("validate", str(manifest))
    assert r.exit_code == 2
    assert "data row 1, column 'model'" in r.stdout and "LoRA" in r.stdout
    assert "data row 2, column 'model'" in r.stdout and "no checkpoint 'nothere'" in r.stdout
    # relative to the manifest's folder and to the working folder: two different files
    assert "data row 3, column 'model'" in r.stdout and "names 2 different checkpoints" in r.stdout
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "nothing was run" in r.output and loads == []


def test_a_model_that_fails_to_load_leaves_only_its_rows_unmade(tmp_path, loads, monkeypatch):
    from batchsd.model.pipeline import Pipeline

    write_checkpoint(tmp_path / "weights" / "a.safetensors", 1)
    manifest = write_csv(tmp_path / "m.csv", ["x,a cat,1,2,64,64,a", "y,a dog,2,2,64,64,tiny",
                                              "z,a cow,3,2,64,64,a"])
    served = Pipeline.load.__func__

    def load(cls, model, *args, **kw):
        if str(model).endswith("a.safetensors"):
            raise OSError(5, "Input/output error")
        return served(cls, model, *args, **kw)

    monkeypatch.setattr(Pipeline, "load", classmethod(load))
    out = tmp_path / "o"
    r = invoke("run", str(manifest), "--out", str(out))
    assert r.exit_code == 2 and "2 row(s) left unmade" in r.output and "Input/output error" in r.output
    assert "run the same command again" in r.output
    df = results(out)
    assert list(df.index) == ["y"] and df.loc["y", "status"] == "ok"   # y made; x and z have no record
    assert not (out / "summary.json").exists()                   # the job is not done
    monkeypatch.setattr(Pipeline, "load", classmethod(served))
    r = invoke("run", str(manifest), "--out", str(out))
    assert r.exit_code == 0 and "2 to make, 1 already done" in r.output and (out / "summary.json").exists()


def test_unsized_rows_take_their_own_models_size_and_expanded_manifests_keep_the_model(tmp_path, loads, tiny_pipe):
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
    from ref_sdxl import SDXL_TEST, build_reference_sdxl, write_sdxl_single_file

    (tmp_path / "weights").mkdir()
    xl = write_sdxl_single_file(tmp_path / "weights" / "xl.safetensors", build_reference_sdxl(SDXL_TEST))
    manifest = write_csv(tmp_path / "m.csv", ["x,a cat,1,2,,,xl", "y,a dog,2,2,,,"])
    from batchsd.job.manifest import read_manifest
    from batchsd.job.model_choice import with_model_defaults
    from batchsd.job.run import run

    opts = with_model_defaults(RunOptions(manifest=manifest, model="tiny", dry_run=True))
    rows = read_manifest(manifest, opts.manifest_options).rows
    assert [(r.width, r.model) for r in rows] == [(1024, str(xl.resolve())), (512, None)]
    r = invoke("validate", str(manifest), "--expanded", str(tmp_path / "expanded.parquet"))
    assert r.exit_code == 0, r.output
    import pyarrow.parquet as pq
    assert pq.read_table(tmp_path / "expanded.parquet").column("model").to_pylist() == [str(xl.resolve()), None]
    with pytest.raises(UsageError, match="name their model"):   # a loaded pipe runs one model
        run(RunOptions(manifest=manifest, out_dir=tmp_path / "o"), pipe=tiny_pipe)


def test_ray_engine_runs_each_model_in_turn_with_the_same_bytes(tmp_path, loads):
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'batchsd[ray]'")
    from batchsd.scale.ray_engine import run_ray

    write_checkpoint(tmp_path / "weights" / "a.safetensors", 1)
    manifest = write_csv(tmp_path / "m.csv", ["x,a cat,1,2,64,64,a", "y,a dog,2,2,64,64,",
                                              "z,a cow,3,2,64,64,a", "w,an owl,4,2,64,64,"])
    r = invoke("run", str(manifest), "--model", "tiny", "--out", str(tmp_path / "local"))
    assert r.exit_code == 0, r.output
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        s = run_ray(RunOptions(manifest=manifest, model="tiny", out_dir=tmp_path / "ray", batch_size=2, device="cpu"),
                    workers=1, rich_bar=False)
    finally:
        if started:
            ray.shutdown()
    assert (s.ok, s.failed, s.pending) == (4, 0, 0)
    local, far = results(tmp_path / "local"), results(tmp_path / "ray")
    assert list(far["model"]) == ["a", "tiny-random", "a", "tiny-random"]
    assert far["image_sha256"].to_dict() == local["image_sha256"].to_dict()


def test_the_example_manifest_validates_once_its_models_are_in_weights(tmp_path, loads):
    """jobs/per_row_models.csv (README 'Example jobs'), with tiny files standing for its sd15 and
    sdxl_base: no problem, each row planned with its own model at its family's size."""
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
    from ref_sdxl import SDXL_TEST, build_reference_sdxl, write_sdxl_single_file

    example = Path(__file__).resolve().parents[2] / "jobs" / "per_row_models.csv"
    r = invoke("validate", str(example), "--model", "tiny")
    assert r.exit_code == 2 and "no checkpoint 'sd15'" in r.stdout and "no checkpoint 'sdxl_base'" in r.stdout
    write_checkpoint(tmp_path / "weights" / "sd15.safetensors", 1)
    write_sdxl_single_file(tmp_path / "weights" / "sdxl_base.safetensors", build_reference_sdxl(SDXL_TEST))
    r = invoke("validate", str(example), "--model", "tiny", "--expanded", str(tmp_path / "x.parquet"))
    assert r.exit_code == 0, r.stdout
    import pyarrow.parquet as pq

    rows = {row["id"]: row for row in pq.read_table(tmp_path / "x.parquet").to_pylist()}
    assert {rid: (row["width"], Path(row["model"] or "--model").stem) for rid, row in rows.items()} == {
        "cat_sd15": (512, "sd15"), "cat_sdxl": (1024, "sdxl_base"), "dog_sdxl": (1024, "sdxl_base"),
        "dog_run_model": (512, "--model"), "noise_tiny": (512, "tiny")}
    assert loads == []


def test_each_model_is_released_before_the_next_one_loads(tmp_path, loads, monkeypatch):
    """README: the run releases one model before loading the next, so two are never held at once."""
    import weakref

    from batchsd.model.pipeline import Pipeline

    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        write_checkpoint(tmp_path / "weights" / f"{name}.safetensors", seed)
    manifest = write_csv(tmp_path / "m.csv", ["x,a cat,1,2,64,64,a", "y,a dog,2,2,64,64,b", "z,a cow,3,2,64,64,c"])
    served = Pipeline.load.__func__
    loaded: list = []

    def load(cls, model, *args, **kw):
        assert all(ref() is None for ref in loaded), "a model was still held when the next one loaded"
        pipe = served(cls, model, *args, **kw)
        loaded.append(weakref.ref(pipe))
        return pipe

    monkeypatch.setattr(Pipeline, "load", classmethod(load))
    r = invoke("run", str(manifest), "--out", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    assert len(loaded) == 3
