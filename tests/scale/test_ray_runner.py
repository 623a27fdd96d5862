"""The Ray engine end to end on a local Ray instance (2 CPUs) with the tiny model: the same rows,
images (within 1/255) and output layout as a one-process run, and resume across engines."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'batchsd[ray]' to test the Ray engine")

from batchsd.scale.ray_engine import run_ray  # noqa: E402
from batchsd.job.options import RunOptions  # noqa: E402
from batchsd.job.run import run

HEADER = "id,prompt,negative_prompt,seed,steps,cfg_scale,sampler,width,height,init_image,strength,tag"


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    if started:
        ray.shutdown()


def write_manifest(folder: Path) -> Path:
    rows = [f"r{i:02d},prompt number {i % 3},,{100 + i},2,7.5,{'euler_a' if i % 2 else 'ddim'},64,64,,,t{i}"
            for i in range(7)]
    rows.append("bad,an img2img row whose init image is missing,,1,2,7.5,euler,64,64,missing.png,0.5,tb")
    path = folder / "m.csv"
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def table(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet").set_index("id")


def test_ray_engine_matches_one_process_run_and_resumes(tmp_path, local_ray):
    manifest = write_manifest(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = run(RunOptions(manifest=manifest, model="tiny", out_dir=tmp_path / "one", batch_size=2, device="cpu"),
                  rich_bar=False)
    finally:
        torch.set_num_threads(threads)
    assert (ref.ok, ref.failed) == (7, 1)

    out = tmp_path / "ray"
    s = run_ray(RunOptions(manifest=manifest, model="tiny", out_dir=out, batch_size=2, device="cpu"),
                workers=2, rich_bar=False, rows_per_call=3)
    assert (s.total, s.ok, s.failed, s.pending, s.exit_code) == (8, 7, 1, 0, 1)
    assert (out / "summary.json").is_file()

    a, b = table(tmp_path / "one"), table(out)
    assert list(a.index) == list(b.index)  # manifest order, every row
    same = ["prompt", "seed", "steps", "sampler", "width", "height", "tag", "status", "params_hash", "model", "image_path"]
    pd.testing.assert_frame_equal(a[same], b[same])
    assert "missing.png" in b.loc["bad", "error"]
    for rid in a.index[a["status"] == "ok"]:
        diff = np.abs(pixels(tmp_path / "one" / a.loc[rid, "image_path"]) - pixels(out / b.loc[rid, "image_path"]))
        assert diff.max() <= 1, (rid, diff.max())

    # resume: nothing to do; then a lost image is made again, and only that one
    again = run_ray(RunOptions(manifest=manifest, model="tiny", out_dir=out, batch_size=2, device="cpu"),
                    workers=2, rich_bar=False)
    assert (again.ok, again.skipped, again.previously_failed) == (0, 7, 1)
    (out / "images" / "r03.png").unlink()
    again = run_ray(RunOptions(manifest=manifest, model="tiny", out_dir=out, batch_size=2, device="cpu"),
                    workers=1, rich_bar=False)
    assert (again.ok, again.skipped) == (1, 6)
    assert np.abs(pixels(out / "images" / "r03.png") - pixels(tmp_path / "one" / "images" / "r03.png")).max() <= 1

    # the one-process engine resumes a Ray run's output: nothing left to make
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = run(RunOptions(manifest=manifest, model="tiny", out_dir=out, batch_size=2, device="cpu"),
                    rich_bar=False)
    finally:
        torch.set_num_threads(threads)
    assert (local.ok, local.skipped, local.previously_failed) == (0, 7, 1)


def test_ray_engine_with_a_checkpoint_holds_parts_in_turn_and_makes_the_same_bytes(tmp_path, local_ray):
    """A checkpoint file on the CPU: Ray's actors run with --low-memory's default (text encoders and UNet
    held in turn, the prompts of the batches to come encoded ahead, residency.py); their bytes equal a
    local run that holds every part."""
    from safetensors.torch import save_file

    from batchsd.model.config import TINY
    from batchsd.model.stable_diffusion import StableDiffusionModel

    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in StableDiffusionModel.random(TINY, seed=2).state_dict().items()}, str(ckpt))
    manifest = write_manifest(tmp_path)
    held = run(RunOptions(manifest=manifest, model=str(ckpt), out_dir=tmp_path / "held", batch_size=2, device="cpu",
                          low_memory=False), rich_bar=False)
    s = run_ray(RunOptions(manifest=manifest, model=str(ckpt), out_dir=tmp_path / "ray", batch_size=2, device="cpu"),
                workers=2, rich_bar=False, rows_per_call=4)
    assert (held.ok, s.ok) == (7, 7)
    a, b = table(tmp_path / "held"), table(tmp_path / "ray")
    done = a.index[a["status"] == "ok"]
    assert a.loc[done, "image_sha256"].tolist() == b.loc[done, "image_sha256"].tolist()
