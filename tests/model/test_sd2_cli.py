"""SD 2.x through `batchsd run` and `batchsd inspect`: a single file that does not say its prediction
type is refused before anything runs, naming --prediction-type; with it (or a yaml beside the file)
the job runs and the results equal the Pipeline's."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from batchsd import GenerationRow, Pipeline
from cli_support import invoke
from ref_sd2 import SD2_TEST, build_reference_sd2, write_ldm_yaml, write_sd2_single_file


@pytest.fixture(scope="module")
def sd2_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd2")
    return write_sd2_single_file(folder / "model.safetensors", build_reference_sd2(SD2_TEST, "v_prediction", seed=40))


def test_run_and_inspect_an_sd2_single_file(sd2_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.csv").write_text("id,prompt,seed,steps,sampler,width,height\na,a lighthouse,3,2,euler,64,64\n")
    r = invoke("run", "m.csv", "--model", str(sd2_file), "--out", "o")
    assert r.exit_code == 2 and "--prediction-type" in r.output and not (tmp_path / "o" / "images").exists()
    r = invoke("inspect", str(sd2_file), "--json")
    assert r.exit_code == 1 and "prediction type unknown" in json.loads(r.output)["family"]

    r = invoke("run", "m.csv", "--model", str(sd2_file), "--out", "o", "--prediction-type", "v_prediction")
    assert r.exit_code == 0, r.output
    pipe = Pipeline.load(sd2_file, device="cpu", dtype="fp32", prediction_type="v_prediction")
    expected = pipe.generate([GenerationRow("a lighthouse", seed=3, steps=2, sampler="euler", width=64, height=64)])
    with Image.open(tmp_path / "o" / "images" / "a.png") as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(expected.images[0]))
    assert pd.read_parquet(tmp_path / "o" / "results.parquet")["status"].tolist() == ["ok"]

    write_ldm_yaml(sd2_file.with_suffix(".yaml"), "v_prediction")
    report = json.loads(invoke("inspect", str(sd2_file), "--json").output)
    assert report["family"] == "SD 2.x-v" and report["prediction_type"] == "v_prediction"


def test_a_linked_sd2_file_is_read_with_the_yaml_beside_the_link(sd2_file, tmp_path, monkeypatch):
    """A weights/ folder of links (into a download cache): every command reads the file as the path
    given, its name and the A1111 .yaml beside it, not beside the link's target."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "model.safetensors"
    shutil.copyfile(sd2_file, target)
    write_ldm_yaml(target.with_suffix(".yaml"), "epsilon")
    (tmp_path / "weights").mkdir()
    link = tmp_path / "weights" / "mine-v.safetensors"
    link.symlink_to(target)
    write_ldm_yaml(link.with_suffix(".yaml"), "v_prediction")
    (tmp_path / "m.csv").write_text("id,prompt,seed,steps,sampler,width,height,model\n"
                                    "a,a lighthouse,3,2,euler,64,64,\nb,a lighthouse,3,2,euler,64,64,mine-v\n")
    assert json.loads(invoke("inspect", str(link), "--json").output)["prediction_type"] == "v_prediction"
    r = invoke("run", "m.csv", "--model", str(link), "--out", "o")
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(tmp_path / "o" / "results.parquet")
    assert df["prediction_type"].tolist() == ["v_prediction"] * 2 and df["model"].tolist() == ["mine-v"] * 2
    assert "1 model(s) to load" in r.output       # --model and the row's cell name one model


def test_prediction_type_option_that_overrides_what_the_model_says_is_warned(sd2_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "eps.safetensors"
    shutil.copyfile(sd2_file, model)
    write_ldm_yaml(model.with_suffix(".yaml"), "epsilon")
    (tmp_path / "m.csv").write_text("id,prompt,seed,steps,sampler,width,height\na,a lighthouse,3,1,euler,64,64\n")
    r = invoke("run", "m.csv", "--model", str(model), "--out", "o", "--prediction-type", "v_prediction")
    assert r.exit_code == 0 and "--prediction-type v_prediction overrides the epsilon that" in r.output
    r = invoke("run", "m.csv", "--model", str(model), "--out", "o2", "--prediction-type", "epsilon")
    assert r.exit_code == 0 and "overrides" not in r.output
